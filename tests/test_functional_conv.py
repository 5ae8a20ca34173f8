"""conv2d: stride, padding (ints, pairs, 'same', 'valid'), dilation, groups, bias,
several chunks per batch, channels-last inputs, float32."""

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy
from distprop.functional import conv as conv_module
from helpers import check_grad, compare_with_torch, requires_torch, torch

FAST = settings(max_examples=25, deadline=None)


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(dilation[0] * (kh - 1) + 1 - 2 * padding[0], 7))
    w = draw(st.integers(dilation[1] * (kw - 1) + 1 - 2 * padding[1], 7))
    n = draw(st.integers(1, 3))
    return dict(x=(n, cin, max(h, 1), max(w, 1)), weight=(cout, cin // groups, kh, kw), stride=stride,
                padding=padding, dilation=dilation, groups=groups, bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _arrays(case):
    rng = np.random.default_rng(case["seed"])
    arrays = [rng.standard_normal(case["x"]), rng.standard_normal(case["weight"])]
    if case["bias"]:
        arrays.append(rng.standard_normal(case["weight"][0]))
    return arrays


def _kwargs(case):
    return {k: case[k] for k in ("stride", "padding", "dilation", "groups")}


def _fits(case):
    (_, _, h, w), (_, _, kh, kw) = case["x"], case["weight"]
    return all(size + 2 * p - d * (k - 1) - 1 >= 0 for size, p, d, k in
               zip((h, w), case["padding"], case["dilation"], (kh, kw)))


def _channels_last(t):
    """t (N, C, H, W) copied to channels-last memory, differentiably (the layout conv2d
    itself produces; the two layouts take different im2col paths)."""
    n, c, h, w = t.shape
    nhwc = t.transpose(0, 2, 3, 1).reshape(n, h, w * c).reshape(n, h, w, c)  # merging W, C copies
    return nhwc.transpose(0, 3, 1, 2)


@requires_torch
@FAST
@given(case=conv_cases(), channels_last=st.booleans())
def test_conv2d_matches_torch(device, case, channels_last):
    assume(_fits(case))
    layout = _channels_last if channels_last else (lambda t: t)
    compare_with_torch(lambda x, *t: F.conv2d(layout(x), *t, **_kwargs(case)),
                       lambda *t: torch.nn.functional.conv2d(*t, **_kwargs(case)), *_arrays(case), device=device)


def test_channels_last_helper_gives_channels_last_memory(device):
    t = dp.tensor(to_device(np.ones((2, 3, 4, 5)), device))
    assert _channels_last(t).data.strides[1] == 8


@FAST
@given(case=conv_cases(), channels_last=st.booleans())
def test_conv2d_gradients(device, case, channels_last):
    assume(_fits(case))
    layout = _channels_last if channels_last else (lambda t: t)
    check_grad(lambda x, *t: F.conv2d(layout(x), *t, **_kwargs(case)), *_arrays(case), device=device)


@requires_torch
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_in_many_chunks_matches_torch(device, stride, channels_last, monkeypatch):
    # A tiny chunk budget forces one image per chunk (the CPU path's loop).
    monkeypatch.setattr(conv_module, "_CPU_CHUNK_BYTES", 1)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((5, 4, 6, 6)), rng.standard_normal((3, 4, 3, 3)), rng.standard_normal(3)]
    layout = _channels_last if channels_last else (lambda t: t)
    compare_with_torch(lambda x, *t: F.conv2d(layout(x), *t, stride=stride, padding=1),
                       lambda *t: torch.nn.functional.conv2d(*t, stride=stride, padding=1), *arrays, device=device)


@requires_torch
@pytest.mark.parametrize("padding", ["same", "valid", (2, 0)])
@pytest.mark.parametrize("kernel", [(3, 3), (2, 4)])
def test_conv2d_padding_modes_match_torch(device, padding, kernel):
    import warnings

    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((2, 2, 6, 7)), rng.standard_normal((3, 2) + kernel)]
    with warnings.catch_warnings():  # torch warns that even kernels with 'same' pad asymmetrically
        warnings.simplefilter("ignore")
        compare_with_torch(lambda *t: F.conv2d(*t, padding=padding, dilation=(1, 2)),
                           lambda *t: torch.nn.functional.conv2d(*t, padding=padding, dilation=(1, 2)),
                           *arrays, device=device)


def test_conv2d_output_is_channels_last_and_reads_any_layout(device):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    x_channels_last = to_device(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), device).transpose(0, 3, 1, 2)
    y1 = F.conv2d(dp.tensor(to_device(x, device)), dp.tensor(to_device(w, device)), padding=1).data
    y2 = F.conv2d(dp.tensor(x_channels_last), dp.tensor(to_device(w, device)), padding=1).data
    assert y1.dtype == np.float32 and y1.shape == (2, 4, 5, 5)
    assert y1.strides[1] == y1.dtype.itemsize  # channels are adjacent in memory
    np.testing.assert_allclose(to_numpy(y1), to_numpy(y2), rtol=1e-6, atol=1e-6)


def test_conv2d_float32_matches_float64(device):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((4, 8, 9, 9)), rng.standard_normal((16, 8, 3, 3)), rng.standard_normal(16)
    exact = to_numpy(F.conv2d(*(dp.tensor(to_device(a, device)) for a in (x, w, b)), stride=2, padding=1).data)
    single = F.conv2d(*(dp.tensor(to_device(a.astype(np.float32), device)) for a in (x, w, b)), stride=2, padding=1)
    assert single.dtype == np.float32
    np.testing.assert_allclose(to_numpy(single.data), exact, rtol=1e-4, atol=1e-4)


def test_conv2d_computes_only_needed_gradients(device):
    rng = np.random.default_rng(4)
    x = dp.tensor(to_device(rng.standard_normal((2, 3, 5, 5)), device))
    w = dp.tensor(to_device(rng.standard_normal((4, 3, 3, 3)), device), requires_grad=True)
    F.conv2d(x, w, padding=1).sum().backward()
    assert x.grad is None and w.grad.shape == (4, 3, 3, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_shape=(4, 2, 3, 3)), "expects 2 channels|input has 3 channels"),
    (dict(groups=2), "groups=2"),
    (dict(stride=0), "positive"),
    (dict(padding=-1), "non-negative"),
    (dict(padding="full"), "'valid' or 'same'"),
    (dict(padding="same", stride=2), "stride 1"),
    (dict(weight_shape=(4, 3, 9, 9)), "larger than the padded input"),
])
def test_conv2d_rejects_bad_arguments(kwargs, message):
    kwargs = dict(kwargs)
    x = dp.tensor(np.ones((1, 3, 5, 5)))
    w = dp.tensor(np.ones(kwargs.pop("weight_shape", (4, 3, 3, 3))))
    with pytest.raises(ValueError, match=message):
        F.conv2d(x, w, **kwargs)


def _conv_definition(x, w, b, stride, padding, dilation, groups):
    """out[n, o, i, j] = b[o] + sum over the group's channels c and kernel offsets (p, q) of
    w[o, c, p, q] * x_padded[n, g * cg + c, i * sh + p * dh, j * sw + q * dw]."""
    (top, bottom), (left, right) = padding
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, _, hp, wp = xp.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    out_h, out_w = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, out_h, out_w))
    og = o // groups
    for oc in range(o):
        g = oc // og
        for p in range(kh):
            for q in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, p * dh:p * dh + sh * (out_h - 1) + 1:sh,
                           q * dw:q * dw + sw * (out_w - 1) + 1:sw]
                out[:, oc] += np.einsum("ncij,c->nij", patch, w[oc, :, p, q])
        if b is not None:
            out[:, oc] += b[oc]
    return out


@pytest.mark.parametrize("kwargs, padding", [
    (dict(), ((0, 0), (0, 0))),
    (dict(stride=2, padding=1), ((1, 1), (1, 1))),
    (dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1)), ((2, 2), (0, 0))),
    (dict(padding="same", dilation=(1, 2)), None),  # even kernels: the extra row and column at the end
    (dict(padding="valid", groups=2), ((0, 0), (0, 0))),
])
@pytest.mark.parametrize("kernel", [(3, 3), (2, 4)])
def test_conv2d_is_its_definition(device, kwargs, padding, kernel):
    rng = np.random.default_rng(9)
    x, w, b = rng.standard_normal((2, 4, 7, 8)), rng.standard_normal((6, 4 // kwargs.get("groups", 1)) + kernel), \
        rng.standard_normal(6)
    if padding is None:  # 'same': total d * (k - 1) per side pair, the larger half last
        totals = [d * (k - 1) for d, k in zip(kwargs.get("dilation", (1, 1)), kernel)]
        padding = tuple((t // 2, t - t // 2) for t in totals)
    y = F.conv2d(*(dp.tensor(to_device(a, device)) for a in (x, w, b)), **kwargs)
    as_pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    expected = _conv_definition(x, w, b, as_pair(kwargs.get("stride", 1)), padding,
                                as_pair(kwargs.get("dilation", 1)), kwargs.get("groups", 1))
    np.testing.assert_allclose(to_numpy(y.data), expected, rtol=1e-12, atol=1e-12)
    no_bias = F.conv2d(dp.tensor(to_device(x, device)), dp.tensor(to_device(w, device)), **kwargs)
    np.testing.assert_allclose(to_numpy(no_bias.data), expected - b[None, :, None, None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape, w_shape, kwargs, message", [
    ((1, 3, 5, 5), (4, 2, 3, 3), {}, "conv2d: input has 3 channels but weight (4, 2, 3, 3) expects 2 "
                                     "(in/groups=2, groups=1)"),
    ((1, 3, 5, 5), (4, 3, 3, 3), dict(groups=2), "conv2d: groups=2 must divide both input channels (3) "
                                                 "and output channels (4)"),
    ((1, 4, 5, 5), (3, 2, 3, 3), dict(groups=2), "conv2d: groups=2 must divide both input channels (4) "
                                                 "and output channels (3)"),
    ((1, 3, 5, 5), (4, 3, 3, 3), dict(groups=0), "conv2d: groups=0 must divide both input channels (3) "
                                                 "and output channels (4)"),
    ((1, 3, 5, 5), (4, 3, 3, 3), dict(stride=0), "conv2d: stride and dilation must be positive, got (0, 0), (1, 1)"),
    ((1, 3, 5, 5), (4, 3, 3, 3), dict(dilation=(1, 0)),
     "conv2d: stride and dilation must be positive, got (1, 1), (1, 0)"),
    ((1, 3, 5, 5), (4, 3, 3, 3), dict(padding=(0, -1)), "conv2d: padding must be non-negative, got (0, -1)"),
    ((1, 3, 5, 5), (4, 3, 3, 3), dict(padding="full"),
     "conv2d: padding must be an int, a pair, 'valid' or 'same', got 'full'"),
    ((1, 3, 5, 5), (4, 3, 3, 3), dict(padding="same", stride=(1, 2)), "conv2d: padding='same' needs stride 1"),
    ((1, 3, 5, 5), (4, 3, 3, 3), dict(padding=(1, 2, 3)), "conv2d: padding must be an int or a pair, got (1, 2, 3)"),
    ((1, 3, 5, 5), (4, 3, 7, 3), {}, "conv2d: kernel 7x3 (dilation 1,1) is larger than the padded input 5x5"),
    ((1, 3, 5, 5), (4, 3, 3, 3), dict(dilation=3), "conv2d: kernel 3x3 (dilation 3,3) is larger than the padded "
                                                   "input 5x5"),
    ((3, 5, 5), (4, 3, 3, 3), {}, "conv2d expects input of shape (N, C, H, W), got (3, 5, 5)"),
    ((1, 3, 5, 5), (4, 3, 3), {}, "conv2d expects weight of shape (out, in/groups, kh, kw), got (4, 3, 3)"),
])
def test_conv2d_errors_name_the_sizes(x_shape, w_shape, kwargs, message):
    import re

    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        F.conv2d(dp.tensor(np.ones(x_shape)), dp.tensor(np.ones(w_shape)), **kwargs)


def test_conv2d_split_over_threads_gives_the_one_thread_result(monkeypatch):
    """Several images per part, parts on three threads: each part's weight gradient
    is summed into the total, and each writes its own images."""
    from threadpoolctl import threadpool_limits

    from distprop import cpu_threads

    monkeypatch.setattr(conv_module, "_MIN_THREAD_BYTES", 1)  # parts of any size
    parts = []
    real_split = cpu_threads.split
    monkeypatch.setattr(cpu_threads, "split", lambda count, n: parts.append(n) or real_split(count, n))
    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal((7, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)]

    def run(threads):
        with threadpool_limits(limits=threads, user_api="blas"):
            tensors = [dp.tensor(a, requires_grad=True) for a in arrays]
            y = F.conv2d(*tensors, stride=2, padding=1)
            y.backward(np.random.default_rng(7).standard_normal(y.shape))
            return [y.data] + [t.grad for t in tensors]

    one, three = run(1), run(3)
    assert max(parts) == 3, f"the work was never split: parts {parts}"
    for name, a, b in zip(("output", "input gradient", "weight gradient", "bias gradient"), one, three):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("wanted", ["x", "weight", "bias"])
def test_conv2d_one_gradient_alone_equals_it_among_all(wanted):
    rng = np.random.default_rng(10)
    arrays = dict(x=rng.standard_normal((2, 4, 6, 5)), weight=rng.standard_normal((6, 2, 3, 3)),
                  bias=rng.standard_normal(6))
    every = {k: dp.tensor(a, requires_grad=True) for k, a in arrays.items()}
    F.conv2d(every["x"], every["weight"], every["bias"], stride=2, padding=1, groups=2).sum().backward()
    some = {k: dp.tensor(a, requires_grad=k == wanted) for k, a in arrays.items()}
    F.conv2d(some["x"], some["weight"], some["bias"], stride=2, padding=1, groups=2).sum().backward()
    np.testing.assert_allclose(some[wanted].grad, every[wanted].grad, rtol=1e-12, atol=1e-12)
    assert all(t.grad is None for k, t in some.items() if k != wanted)


def test_conv2d_of_mixed_dtypes_computes_in_the_wider_one():
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    for a, b in ((x.astype(np.float32), w), (x, w.astype(np.float32))):
        y = F.conv2d(dp.tensor(a), dp.tensor(b), padding=1)
        assert y.dtype == np.float64
        expected = _conv_definition(a.astype(np.float64), b.astype(np.float64), None, (1, 1), ((1, 1), (1, 1)),
                                    (1, 1), 1)
        np.testing.assert_allclose(y.data, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stride=(1, 2, 1)), "conv2d: stride must be an int or a pair, got (1, 2, 1)"),
    (dict(dilation=[1]), "conv2d: dilation must be an int or a pair, got [1]"),
])
def test_conv2d_pairs_are_pairs(kwargs, message):
    import re

    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        F.conv2d(dp.tensor(np.ones((1, 3, 5, 5))), dp.tensor(np.ones((4, 3, 3, 3))), **kwargs)
