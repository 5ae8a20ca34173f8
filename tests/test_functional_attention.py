"""scaled_dot_product_attention: masks (boolean, additive float, causal), scale,
broadcast batch axes, fully masked rows, dropout, stability."""

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy
from helpers import check_grad, compare_with_torch, requires_torch, torch

TF = torch.nn.functional if torch else None


def _qkv(seed=0, batch=(2, 3), length=4, source=6, e=5, ev=7):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(batch + (length, e)), rng.standard_normal(batch + (source, e)),
            rng.standard_normal(batch + (source, ev)))


def _reference(q, k, v, mask=None, scale=None, causal=False):
    """softmax(q k^T * scale + mask) v in float64 from its definition; a query that may
    attend to nothing gets zeros (distprop's rule; PyTorch gives NaN there)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = q @ np.swapaxes(k, -1, -2) * (scale if scale is not None else 1 / np.sqrt(q.shape[-1]))
    allowed = np.ones(scores.shape[-2:], bool) if mask is None else np.broadcast_to(mask, scores.shape)
    if causal:
        allowed = allowed & np.tril(np.ones(scores.shape[-2:], bool))
    scores = np.where(allowed, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0))
    total = weights.sum(axis=-1, keepdims=True)
    return np.where(total > 0, weights / np.where(total > 0, total, 1), 0) @ v


@pytest.mark.parametrize("kwargs", [{}, {"scale": 0.3}, {"is_causal": True}])
@pytest.mark.parametrize("length, source", [(4, 6), (5, 5), (6, 3)])
def test_attention_is_softmax_of_scaled_scores_times_values(device, kwargs, length, source):
    q, k, v = _qkv(length=length, source=source)
    y = F.scaled_dot_product_attention(*(dp.tensor(to_device(a, device)) for a in (q, k, v)), **kwargs)
    expected = _reference(q, k, v, scale=kwargs.get("scale"), causal=kwargs.get("is_causal", False))
    np.testing.assert_allclose(to_numpy(y.data), expected, rtol=1e-12, atol=1e-14)
    mask = _bool_mask(shape=(length, source))
    y = F.scaled_dot_product_attention(*(dp.tensor(to_device(a, device)) for a in (q, k, v)),
                                       attn_mask=to_device(mask, device))
    np.testing.assert_allclose(to_numpy(y.data), _reference(q, k, v, mask), rtol=1e-12, atol=1e-14)


def _bool_mask(seed=1, shape=(4, 6)):
    mask = np.random.default_rng(seed).random(shape) > 0.4
    mask[..., 0] = True  # every query sees at least one key here
    return mask


@requires_torch
@pytest.mark.parametrize("kwargs", [{}, {"scale": 0.3}, {"is_causal": True}])
@pytest.mark.parametrize("length, source", [(4, 6), (5, 5), (6, 3)])
def test_attention_matches_torch(device, kwargs, length, source):
    q, k, v = _qkv(length=length, source=source)
    compare_with_torch(lambda *t: F.scaled_dot_product_attention(*t, **kwargs),
                       lambda *t: TF.scaled_dot_product_attention(*t, **kwargs), q, k, v, device=device)


@requires_torch
@pytest.mark.parametrize("mask_shape", [(4, 6), (3, 4, 6), (2, 1, 4, 6)])
def test_boolean_mask_matches_torch(device, mask_shape):
    mask = _bool_mask(shape=mask_shape)
    compare_with_torch(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=to_device(mask, device)),
                       lambda *t: TF.scaled_dot_product_attention(*t, attn_mask=torch.as_tensor(mask)),
                       *_qkv(), device=device)


@requires_torch
@pytest.mark.parametrize("mask_shape", [(4, 6), (2, 3, 4, 6)])
def test_float_mask_matches_torch_and_is_differentiable(device, mask_shape):
    mask = np.random.default_rng(2).standard_normal(mask_shape)
    compare_with_torch(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                       lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m),
                       *_qkv(), mask, device=device)


def test_float64_mask_keeps_float32_attention_float32(device):
    q, k, v = (dp.tensor(to_device(a.astype(np.float32), device), requires_grad=True) for a in _qkv(seed=10))
    for mask in (np.zeros((4, 6)), dp.tensor(to_device(np.zeros((4, 6)), device), requires_grad=True)):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y.sum().backward()
        assert y.dtype == np.float32 and q.grad.dtype == k.grad.dtype == v.grad.dtype == np.float32
    assert mask.grad.dtype == np.float64  # a Tensor mask gets its gradient in its own dtype


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}])
def test_attention_gradients(device, kwargs):
    check_grad(lambda *t: F.scaled_dot_product_attention(*t, **kwargs), *_qkv(seed=3), device=device)


def test_attention_gradients_with_masks_and_broadcast_batch(device):
    q, k, v = _qkv(seed=4)
    mask = to_device(_bool_mask(), device)
    check_grad(lambda *t: F.scaled_dot_product_attention(*t, mask=mask), q, k, v, device=device)
    # keys and values shared by every head: their batch axes broadcast
    check_grad(lambda *t: F.scaled_dot_product_attention(*t), q, k[:, :1], v[:1], device=device)
    float_mask = np.random.default_rng(5).standard_normal((1, 4, 6))
    check_grad(lambda q_, k_, v_, m: F.scaled_dot_product_attention(q_, k_, v_, attn_mask=m), q, k, v,
               float_mask, device=device)


def test_fully_masked_rows_give_zeros(device):
    q, k, v = (dp.tensor(to_device(a, device), requires_grad=True) for a in _qkv(seed=6))
    mask = _bool_mask()
    mask[2] = False  # query 2 may attend to nothing
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=to_device(mask, device))
    y.sum().backward()
    out = to_numpy(y.data)
    assert np.all(out[..., 2, :] == 0)
    np.testing.assert_allclose(out, _reference(*_qkv(seed=6), mask), rtol=1e-12, atol=1e-14)
    assert np.all(to_numpy(q.grad)[..., 2, :] == 0) and np.all(np.isfinite(to_numpy(k.grad)))
    # the other rows' gradients are those of the same attention without the empty row
    rows = [0, 1, 3]
    q2, k2, v2 = (dp.tensor(to_device(a, device), requires_grad=True) for a in _qkv(seed=6))
    F.scaled_dot_product_attention(q2[..., rows, :], k2, v2, attn_mask=to_device(mask[rows], device)).sum().backward()
    for ours, theirs in ((q, q2), (k, k2), (v, v2)):
        np.testing.assert_allclose(to_numpy(ours.grad), to_numpy(theirs.grad), rtol=1e-12, atol=1e-14)


def test_attention_is_stable_for_huge_scores(device):
    # Scores of about 1e6: exp overflows float32 unless the row's maximum is taken out first.
    q, k, v = (a.astype(np.float32) for a in _qkv(seed=7))
    y = F.scaled_dot_product_attention(*(dp.tensor(to_device(a, device)) for a in (q * 1e3, k * 1e3, v)))
    assert y.dtype == np.float32
    expected = _reference(q.astype(np.float64) * 1e3, k.astype(np.float64) * 1e3, v)
    np.testing.assert_allclose(to_numpy(y.data), expected, rtol=1e-5, atol=1e-5)


def test_attention_dropout_is_seeded(device):
    q, k, v = (dp.tensor(to_device(a, device)) for a in _qkv(seed=8))
    runs = [F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=np.random.default_rng(s)).data
            for s in (1, 1, 2)]
    np.testing.assert_array_equal(to_numpy(runs[0]), to_numpy(runs[1]))
    assert np.any(to_numpy(runs[0]) != to_numpy(runs[2]))


def test_attention_dropout_gradients(device):
    # The same generator seed gives the same mask in every evaluation of check_grad.
    def attend(*t):
        return F.scaled_dot_product_attention(*t, dropout_p=0.3, generator=np.random.default_rng(9))

    check_grad(attend, *_qkv(seed=9), device=device)


def test_attention_rejects_conflicting_masks():
    q, k, v = (dp.tensor(a) for a in _qkv())
    with pytest.raises(ValueError, match="is_causal"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_mask(), is_causal=True)
    with pytest.raises(ValueError, match="not both"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_mask(), mask=_bool_mask())


def test_attention_with_an_additive_mask_and_one_sided_gradients():
    q, k, v = _qkv(seed=11)
    mask = np.random.default_rng(12).standard_normal((4, 6))
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(5) + mask
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    y = F.scaled_dot_product_attention(dp.tensor(q), dp.tensor(k), dp.tensor(v), attn_mask=mask)
    np.testing.assert_allclose(y.data, p @ v, rtol=1e-12)
    every = [dp.tensor(a, requires_grad=True) for a in (q, k, v, mask)]
    F.scaled_dot_product_attention(*every[:3], attn_mask=every[3]).sum().backward()
    for wanted in range(4):
        some = [dp.tensor(a, requires_grad=i == wanted) for i, a in enumerate((q, k, v, mask))]
        F.scaled_dot_product_attention(*some[:3], attn_mask=some[3]).sum().backward()
        for i, (t, reference) in enumerate(zip(some, every)):
            if i == wanted:
                np.testing.assert_allclose(t.grad, reference.grad, rtol=1e-12, atol=1e-15)
            else:
                assert t.grad is None


class _Draws:
    def __init__(self, draws):
        self.draws = np.asarray(draws, np.float64)

    def random(self, shape):
        return np.broadcast_to(self.draws, shape).copy()


def test_attention_dropout_keeps_weights_whose_draw_is_at_least_p_and_rescales():
    q, k, v = _qkv(seed=13, batch=(1,), length=2, source=4)
    draws = np.array([0.25 - 1e-12, 0.25, 0.9, 0.0])  # per key, the same for both queries
    y = F.scaled_dot_product_attention(dp.tensor(q), dp.tensor(k), dp.tensor(v), dropout_p=0.25,
                                       generator=_Draws(draws))
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(5)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    expected = (weights * (draws >= 0.25) / 0.75) @ v
    np.testing.assert_allclose(y.data, expected, rtol=1e-12)
    everything = F.scaled_dot_product_attention(dp.tensor(q), dp.tensor(k), dp.tensor(v), dropout_p=1.0,
                                                generator=_Draws(draws))
    np.testing.assert_array_equal(everything.data, np.zeros_like(everything.data))


def test_attention_argument_errors_say_what():
    q, k, v = (dp.tensor(a) for a in _qkv())
    with pytest.raises(ValueError, match=r"^scaled_dot_product_attention: give attn_mask or mask, not both$"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_mask(), mask=_bool_mask())
    with pytest.raises(ValueError, match=r"^scaled_dot_product_attention: is_causal and attn_mask cannot both "
                                         r"be set$"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_mask(), is_causal=True)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^dropout_p must be in \[0, 1\], got {p}$"):
            F.scaled_dot_product_attention(q, k, v, dropout_p=p)


@pytest.mark.parametrize("batch", [(), (3,)])  # no batch axis, and one
@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}])
def test_attention_without_or_with_one_batch_axis(batch, kwargs):
    q, k, v = _qkv(seed=14, batch=batch, length=5, source=5)
    y = F.scaled_dot_product_attention(dp.tensor(q), dp.tensor(k), dp.tensor(v), **kwargs)
    np.testing.assert_allclose(y.data, _reference(q, k, v, causal=bool(kwargs)), rtol=1e-12, atol=1e-14)
    check_grad(lambda *t: F.scaled_dot_product_attention(*t, **kwargs), q, k, v)


def test_masks_given_as_tensors_or_by_the_mask_keyword():
    q, k, v = _qkv(seed=15)
    allowed = _bool_mask()
    expected = _reference(q, k, v, allowed)
    for kwargs in ({"attn_mask": dp.tensor(allowed)}, {"mask": allowed}, {"mask": dp.tensor(allowed)}):
        y = F.scaled_dot_product_attention(dp.tensor(q), dp.tensor(k), dp.tensor(v), **kwargs)
        np.testing.assert_allclose(y.data, expected, rtol=1e-12, atol=1e-14, err_msg=str(list(kwargs)))
    f32 = F.scaled_dot_product_attention(*(dp.tensor(a.astype(np.float32)) for a in (q, k, v)), attn_mask=allowed)
    assert f32.dtype == np.float32


def test_rows_far_apart_in_scale_are_each_normalised_by_their_own_peak():
    q, k, v = _qkv(seed=16, batch=(1,), length=2, source=3)
    q[0, 0] *= 300.0  # scores of hundreds in row 0 ...
    q[0, 1] *= -300.0  # ... and of minus hundreds in row 1
    y = F.scaled_dot_product_attention(dp.tensor(q), dp.tensor(k), dp.tensor(v))
    np.testing.assert_allclose(y.data, _reference(q, k, v), rtol=1e-10)


def test_attention_without_dropout_draws_nothing():
    class NoDraws:
        def random(self, shape):
            raise AssertionError("attention without dropout drew random numbers")

    q, k, v = (dp.tensor(a) for a in _qkv(seed=17))
    F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, generator=NoDraws())


@pytest.mark.parametrize("wanted", [0, 1, 2])
def test_each_input_alone_gets_its_gradient_without_a_mask(wanted):
    q, k, v = _qkv(seed=18)
    every = [dp.tensor(a, requires_grad=True) for a in (q, k, v)]
    F.scaled_dot_product_attention(*every).sum().backward()
    some = [dp.tensor(a, requires_grad=i == wanted) for i, a in enumerate((q, k, v))]
    F.scaled_dot_product_attention(*some).sum().backward()
    np.testing.assert_allclose(some[wanted].grad, every[wanted].grad, rtol=1e-12, atol=1e-15)
    assert all(t.grad is None for i, t in enumerate(some) if i != wanted)
