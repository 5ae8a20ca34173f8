"""cross_entropy (fused, with label smoothing, ignore_index, reductions, extra
dimensions) and mse_loss."""

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy
from helpers import check_grad, compare_with_torch, requires_torch, torch

TF = torch.nn.functional if torch else None


def _targets(rng, shape, classes, ignored=0.0):
    t = rng.integers(0, classes, shape)
    if ignored:
        t[rng.random(shape) < ignored] = -100
    return t


CASES = [  # logits shape, targets shape
    ((6, 4), (6,)),
    ((3, 4, 5), (3, 5)),
    ((2, 3, 4, 2), (2, 4, 2)),
    ((5,), ()),
]


@requires_torch
@pytest.mark.parametrize("shapes", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ignored", [0.0, 0.4])
def test_cross_entropy_matches_torch(device, shapes, reduction, label_smoothing, ignored):
    rng = np.random.default_rng(0)
    logits_shape, target_shape = shapes
    classes = logits_shape[1] if len(logits_shape) > 1 else logits_shape[0]
    targets = _targets(rng, target_shape, classes, ignored if target_shape else 0.0)
    if ignored and targets.size and np.all(targets == -100):
        targets.flat[0] = 1
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    compare_with_torch(lambda z: F.cross_entropy(z, to_device(targets, device), **kwargs),
                       lambda z: TF.cross_entropy(z, torch.as_tensor(targets), **kwargs),
                       rng.standard_normal(logits_shape) * 3, device=device)


@pytest.mark.parametrize("shapes", CASES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_cross_entropy_gradients(device, shapes, label_smoothing):
    rng = np.random.default_rng(1)
    logits_shape, target_shape = shapes
    classes = logits_shape[1] if len(logits_shape) > 1 else logits_shape[0]
    targets = to_device(_targets(rng, target_shape, classes), device)
    check_grad(lambda z: F.cross_entropy(z, targets, label_smoothing=label_smoothing, reduction="sum"),
               rng.standard_normal(logits_shape), device=device)


@requires_torch
def test_cross_entropy_custom_ignore_index(device):
    rng = np.random.default_rng(2)
    targets = np.array([0, 3, 3, 1, 2])
    compare_with_torch(lambda z: F.cross_entropy(z, to_device(targets, device), ignore_index=3),
                       lambda z: TF.cross_entropy(z, torch.as_tensor(targets), ignore_index=3),
                       rng.standard_normal((5, 4)), device=device)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_is_stable_for_huge_logits(device, smoothing):
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    targets = np.array([0, 0, 2])
    z = dp.tensor(to_device(logits, device), requires_grad=True)
    loss = F.cross_entropy(z, to_device(targets, device), label_smoothing=smoothing)
    loss.backward()
    assert np.isfinite(to_numpy(loss.data)) and np.all(np.isfinite(to_numpy(z.grad)))
    # row 0: loss 0 (+ smoothing), row 1: 2e4, row 2: log 3; smoothing adds eps * (log Z - mean logit)
    per_row = np.array([0.0, 2e4, np.log(3)]) * (1 - smoothing)
    per_row += smoothing * np.array([1e4, 1e4, np.log(3)])
    np.testing.assert_allclose(to_numpy(loss.data), per_row.mean(), rtol=1e-6)
    if torch is not None:
        reference = TF.cross_entropy(torch.tensor(logits), torch.tensor(targets), label_smoothing=smoothing)
        np.testing.assert_allclose(to_numpy(loss.data), reference.item(), rtol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_cross_entropy_all_ignored_gives_nan_like_torch(device):
    z = dp.tensor(to_device(np.zeros((2, 3)), device), requires_grad=True)
    loss = F.cross_entropy(z, to_device(np.array([-100, -100]), device))
    assert np.isnan(to_numpy(loss.data))


def test_cross_entropy_rejects_bad_targets(device):
    z = dp.tensor(to_device(np.zeros((2, 3)), device), requires_grad=True)
    with pytest.raises(IndexError, match="out of range"):
        F.cross_entropy(z, to_device(np.array([0, 3]), device))
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(z, to_device(np.array([0.0, 1.0]), device))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(z, to_device(np.array([0, 1]), device), reduction="avg")


@requires_torch
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_shape", [(3, 4), (4,), ()])
def test_mse_loss_matches_torch(device, reduction, target_shape):
    rng = np.random.default_rng(3)
    import warnings

    with warnings.catch_warnings():  # torch warns when the shapes broadcast
        warnings.simplefilter("ignore")
        compare_with_torch(lambda x, t: F.mse_loss(x, t, reduction=reduction),
                           lambda x, t: TF.mse_loss(x, t, reduction=reduction),
                           rng.standard_normal((3, 4)), rng.standard_normal(target_shape), device=device)


def test_mse_loss_gradients(device):
    rng = np.random.default_rng(4)
    check_grad(F.mse_loss, rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), device=device)
    check_grad(lambda x, t: F.mse_loss(x, t, reduction="none"), rng.standard_normal((3, 4)),
               rng.standard_normal(4), device=device)


@pytest.mark.parametrize("shapes", CASES[:3])
def test_cross_entropy_backward_twice_through_a_retained_graph(device, shapes):
    # backward turns the saved softmax into the gradient in place: a second pass
    # must not start from the first pass's gradient.
    rng = np.random.default_rng(5)
    logits_shape, target_shape = shapes
    targets = to_device(_targets(rng, target_shape, logits_shape[1]), device)
    z = dp.tensor(to_device(rng.standard_normal(logits_shape), device), requires_grad=True)
    loss = F.cross_entropy(z * 1.0, targets, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    first = to_numpy(z.grad).copy()
    z.grad = None
    loss.backward()
    np.testing.assert_allclose(to_numpy(z.grad), first, rtol=1e-12)


def _reference_cross_entropy(logits, targets, smoothing=0.0, ignore_index=-100, reduction="mean"):
    """From the definition, in float64: -sum_c q_c log softmax(z)_c with q the one-hot
    target smoothed by `smoothing`; classes on axis 1."""
    z = np.moveaxis(np.asarray(logits, np.float64), 1, -1)
    log_p = z - z.max(axis=-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=-1, keepdims=True))
    valid = targets != ignore_index
    picked = np.take_along_axis(log_p, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    losses = np.where(valid, -(1 - smoothing) * picked - smoothing * log_p.mean(axis=-1), 0.0)
    if reduction == "none":
        return losses
    return losses.sum() / (valid.sum() if reduction == "mean" else 1)


@pytest.mark.parametrize("shapes", CASES[:3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3, 1.0])
def test_cross_entropy_is_its_definition(device, shapes, reduction, smoothing):
    rng = np.random.default_rng(7)
    logits_shape, target_shape = shapes
    logits, targets = rng.standard_normal(logits_shape) * 3, _targets(rng, target_shape, logits_shape[1], 0.3)
    loss = F.cross_entropy(dp.tensor(to_device(logits, device)), to_device(targets, device),
                           label_smoothing=smoothing, reduction=reduction)
    expected = _reference_cross_entropy(logits, targets, smoothing, reduction=reduction)
    assert loss.shape == np.shape(expected)
    np.testing.assert_allclose(to_numpy(loss.data), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_of_one_unbatched_sample(reduction):
    logits = np.array([0.5, -1.0, 2.0, 0.0])
    for target, expected in ((2, _reference_cross_entropy(logits[None], np.array([2]), reduction="sum")),
                             (-100, 0.0 if reduction != "mean" else np.nan)):
        z = dp.tensor(logits, requires_grad=True)
        with np.errstate(invalid="ignore", divide="ignore"):  # all ignored: the mean is 0 / 0
            loss = F.cross_entropy(z, np.array(target), reduction=reduction)
            loss.backward()
        assert loss.shape == ()
        np.testing.assert_allclose(loss.data, expected, rtol=1e-12)
        assert z.grad.shape == (4,)
    np.testing.assert_array_equal(F.cross_entropy(dp.tensor(logits), 1, ignore_index=1, reduction="sum").data, 0.0)


def test_cross_entropy_takes_targets_as_tensors_or_lists():
    logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    expected = _reference_cross_entropy(logits, np.array([1, 2]))
    for targets in ([1, 2], dp.tensor(np.array([1, 2])), np.array([1, 2], np.uint8)):
        np.testing.assert_allclose(F.cross_entropy(dp.tensor(logits), targets).data, expected, rtol=1e-12)


def test_cross_entropy_argument_errors_say_what():
    z = dp.tensor(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"^label_smoothing must be in \[0, 1\], got 1.5$"):
        F.cross_entropy(z, np.array([0, 1]), label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"^label_smoothing must be in \[0, 1\], got -0.1$"):
        F.cross_entropy(z, np.array([0, 1]), label_smoothing=-0.1)
    with pytest.raises(TypeError, match=r"^cross_entropy expects integer class indices, got dtype float64$"):
        F.cross_entropy(z, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"^cross_entropy: 2 rows of logits but 3 targets$"):
        F.cross_entropy(z, np.array([0, 1, 2]))
    with pytest.raises(IndexError, match=r"^cross_entropy: target class out of range \[0, 3\)$"):
        F.cross_entropy(z, np.array([0, -2]))
    with pytest.raises(ValueError, match=r"^reduction must be one of \('mean', 'sum', 'none'\), got 'avg'$"):
        F.mse_loss(z, z, reduction="avg")


def test_second_backward_recomputes_a_stable_softmax():
    # Rows far apart in scale: each must be shifted by its own maximum.
    logits = np.array([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, -999.0], [0.5, 0.25, 0.0]])
    targets = np.array([0, 2, 1])
    z = dp.tensor(logits, requires_grad=True)
    loss = F.cross_entropy(z * 1.0, targets, reduction="sum")
    loss.backward(retain_graph=True)
    first = z.grad.copy()
    z.grad = None
    loss.backward()
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(3), targets] -= 1
    np.testing.assert_allclose(first, p, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(z.grad, p, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_is_its_definition(reduction):
    x, target = np.array([[1.0, 2.0], [3.0, -1.0]]), np.array([0.5, 1.0])  # the target broadcasts
    a, b = dp.tensor(x, requires_grad=True), dp.tensor(target, requires_grad=True)
    loss = F.mse_loss(a, b, reduction=reduction)
    squared = (x - target) ** 2
    expected = {"mean": squared.mean(), "sum": squared.sum(), "none": squared}[reduction]
    np.testing.assert_allclose(loss.data, expected, rtol=1e-15)
    loss.backward(np.ones(np.shape(expected)))
    scale = 2 / 4 if reduction == "mean" else 2
    np.testing.assert_allclose(a.grad, scale * (x - target), rtol=1e-15)
    np.testing.assert_allclose(b.grad, -scale * (x - target).sum(axis=0), rtol=1e-15)


def test_losses_keep_float32():
    logits = dp.tensor(np.random.default_rng(8).standard_normal((4, 3)).astype(np.float32), requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        loss = F.cross_entropy(logits, np.array([0, 2, 1, -100]), reduction=reduction, label_smoothing=0.1)
        assert loss.dtype == np.float32, reduction
    loss.sum().backward()
    assert logits.grad.dtype == np.float32
    assert F.mse_loss(logits, dp.tensor(np.zeros((4, 3), np.float32))).dtype == np.float32


def test_an_ignored_target_may_be_any_number_even_with_one_class():
    logits = dp.tensor(np.array([[2.0], [0.5]]), requires_grad=True)
    loss = F.cross_entropy(logits, np.array([0, -100]), reduction="sum")
    loss.backward()
    np.testing.assert_array_equal(loss.data, 0.0)  # one class: probability 1, loss 0
    np.testing.assert_array_equal(logits.grad, [[0.0], [0.0]])


@pytest.mark.parametrize("wanted", [0, 1])
def test_mse_loss_one_gradient_alone(wanted):
    x, target = np.array([[1.0, 2.0], [3.0, -1.0]]), np.array([0.5, 1.0])
    tensors = [dp.tensor(x, requires_grad=wanted == 0), dp.tensor(target, requires_grad=wanted == 1)]
    F.mse_loss(*tensors).backward()
    expected = (x - target) / 2 if wanted == 0 else -((x - target) / 2).sum(axis=0)
    np.testing.assert_allclose(tensors[wanted].grad, expected, rtol=1e-15)
    assert tensors[1 - wanted].grad is None
