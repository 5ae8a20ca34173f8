"""batch_norm (training, evaluation, running statistics, the SyncBatchNorm pieces)
and layer_norm."""

import threading

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy
from helpers import check_grad, compare_with_torch, requires_torch, torch

TF = torch.nn.functional if torch else None
SHAPES = [(6, 3), (4, 3, 5), (3, 3, 4, 2), (2, 3, 2, 2, 2)]


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape[1]), rng.standard_normal(shape[1])


@requires_torch
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_matches_torch(device, shape, training, affine):
    x, w, b = _data(shape)
    rng = np.random.default_rng(1)
    running = rng.standard_normal(shape[1]), rng.random(shape[1]) + 0.5
    ours_stats = [to_device(r.copy(), device) for r in running]
    torch_stats = [torch.tensor(r) for r in running]
    arrays = (x, w, b) if affine else (x,)
    compare_with_torch(lambda *t: F.batch_norm(t[0], *ours_stats, *t[1:], training=training),
                       lambda *t: TF.batch_norm(t[0], *torch_stats, *t[1:], training=training),
                       *arrays, device=device)
    for ours, theirs in zip(ours_stats, torch_stats):
        np.testing.assert_allclose(to_numpy(ours), theirs.numpy(), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_gradients(device, shape, training):
    x, w, b = _data(shape, seed=2)
    mean, var = to_device(np.zeros(shape[1]), device), to_device(np.full(shape[1], 2.0), device)
    check_grad(lambda *t: F.batch_norm(t[0], mean.copy(), var.copy(), *t[1:], training=training), x, w, b,
               device=device)
    check_grad(lambda t: F.batch_norm(t, None, None, training=training), x, device=device)


@requires_torch
def test_batch_norm_without_running_stats_uses_batch_stats(device):
    x, w, b = _data((5, 3, 2, 2), seed=3)
    for training in (True, False):
        compare_with_torch(lambda *t: F.batch_norm(t[0], None, None, *t[1:], training=training),
                           lambda *t: TF.batch_norm(t[0], None, None, *t[1:], training=True), x, w, b,
                           device=device)


@requires_torch
def test_running_stats_follow_torch_over_several_steps(device):
    rng = np.random.default_rng(4)
    channels = 4
    ours = [to_device(np.zeros(channels, np.float32), device), to_device(np.ones(channels, np.float32), device)]
    theirs = [torch.zeros(channels), torch.ones(channels)]
    w, b = rng.standard_normal(channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
    for step in range(5):
        x = (rng.standard_normal((8, channels, 3, 3)) * (step + 1) + step).astype(np.float32)
        y = F.batch_norm(dp.tensor(to_device(x, device)), *ours, dp.tensor(to_device(w, device)),
                         dp.tensor(to_device(b, device)), training=True, momentum=0.2)
        y_ref = TF.batch_norm(torch.tensor(x), *theirs, torch.tensor(w), torch.tensor(b), training=True,
                              momentum=0.2)
        np.testing.assert_allclose(to_numpy(y.data), y_ref.numpy(), rtol=1e-4, atol=1e-5)
    for mine, ref in zip(ours, theirs):
        np.testing.assert_allclose(to_numpy(mine), ref.numpy(), rtol=1e-5, atol=1e-6)
    x = rng.standard_normal((3, channels, 3, 3)).astype(np.float32)
    y = F.batch_norm(dp.tensor(to_device(x, device)), *ours, dp.tensor(to_device(w, device)),
                     dp.tensor(to_device(b, device)), training=False)
    y_ref = TF.batch_norm(torch.tensor(x), *theirs, torch.tensor(w), torch.tensor(b), training=False)
    np.testing.assert_allclose(to_numpy(y.data), y_ref.numpy(), rtol=1e-5, atol=1e-5)


def test_running_stats_may_be_tensors(device):
    mean = dp.tensor(to_device(np.zeros(2), device))
    var = dp.tensor(to_device(np.ones(2), device))
    x = dp.tensor(to_device(np.array([[1.0, 2.0], [3.0, 6.0]]), device))
    F.batch_norm(x, mean, var, training=True, momentum=0.5)
    np.testing.assert_allclose(to_numpy(mean.data), [1.0, 2.0])
    np.testing.assert_allclose(to_numpy(var.data), [0.5 + 0.5 * 2.0, 0.5 + 0.5 * 8.0])


def test_batch_norm_training_needs_more_than_one_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(dp.tensor(np.ones((1, 3))), None, None, training=True)


class _ThreadAllreduce:
    """An allreduce(SUM) between threads standing in for ranks."""

    def __init__(self, size):
        self.parts, self.barrier = [None] * size, threading.Barrier(size)

    def __call__(self, rank, array):
        self.parts[rank] = array
        self.barrier.wait()
        total = sum(self.parts[1:], self.parts[0])
        self.barrier.wait()
        return total


def test_sync_batch_norm_pieces_reproduce_the_whole_batch(device):
    """Two 'ranks' (threads) each normalise half of a batch with allreduced statistics
    and gradient sums: outputs and input gradients equal one process on the whole batch."""
    rng = np.random.default_rng(5)
    x, w, b = _data((6, 3, 2, 2), seed=5)
    gy = rng.standard_normal(x.shape)
    whole = [dp.tensor(to_device(a, device), requires_grad=True) for a in (x, w, b)]
    y_whole = F.batch_norm(whole[0], None, None, whole[1], whole[2], training=True)
    y_whole.backward(to_device(gy, device))

    allreduce = _ThreadAllreduce(2)
    results = [None, None]

    def rank_main(rank):
        part = slice(3 * rank, 3 * rank + 3)
        xs = dp.tensor(to_device(x[part], device), requires_grad=True)
        ws, bs = (dp.tensor(to_device(a, device), requires_grad=True) for a in (w, b))
        total, squares, count = F.batch_norm_stats(xs)
        sums = allreduce(rank, dp.backend.get_array_module(total).stack([total, squares]))
        count = count * 2
        mean, var = F.batch_norm_moments(sums[0], sums[1], count)
        y, used = F.batch_norm_train(xs, ws, bs, 1e-5, stats=(mean, var, count),
                                     reduce_sums=lambda s: allreduce(rank, s))
        y.backward(to_device(gy[part], device))
        results[rank] = y, xs.grad, ws.grad, bs.grad, used

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    y_parts = np.concatenate([to_numpy(r[0].data) for r in results])
    gx_parts = np.concatenate([to_numpy(r[1]) for r in results])
    np.testing.assert_allclose(y_parts, to_numpy(y_whole.data), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gx_parts, to_numpy(whole[0].grad), rtol=1e-10, atol=1e-12)
    # weight and bias gradients stay local: the reducer sums (averages) them later
    np.testing.assert_allclose(sum(to_numpy(r[2]) for r in results), to_numpy(whole[1].grad), rtol=1e-10)
    np.testing.assert_allclose(sum(to_numpy(r[3]) for r in results), to_numpy(whole[2].grad), rtol=1e-10)
    mean_used, var_used, count_used = results[0][4]
    assert count_used == 24  # 6 images of 2x2 per channel
    np.testing.assert_allclose(to_numpy(mean_used), x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(var_used), x.var(axis=(0, 2, 3)), rtol=1e-10)


def test_batch_norm_stats_and_moments(device):
    x = np.random.default_rng(6).standard_normal((4, 3, 5)).astype(np.float32) + 100
    total, squares, count = F.batch_norm_stats(dp.tensor(to_device(x, device)))
    assert count == 20 and total.dtype == np.float64
    mean, var = F.batch_norm_moments(total, squares, count)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(to_numpy(mean), x64.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(var), x64.var(axis=(0, 2)), rtol=1e-9)


LAYER_CASES = [((4, 5), 5), ((2, 3, 4), (4,)), ((2, 3, 4), (3, 4)), ((3, 2, 2, 3), (2, 2, 3))]


@requires_torch
@pytest.mark.parametrize("shape, normalized", LAYER_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(device, shape, normalized, affine):
    rng = np.random.default_rng(7)
    dims = (normalized,) if isinstance(normalized, int) else normalized
    arrays = [rng.standard_normal(shape) * 3 + 1]
    if affine:
        arrays += [rng.standard_normal(dims), rng.standard_normal(dims)]
    compare_with_torch(lambda *t: F.layer_norm(t[0], normalized, *t[1:]),
                       lambda *t: TF.layer_norm(t[0], dims, *t[1:]), *arrays, device=device)


@pytest.mark.parametrize("shape, normalized", LAYER_CASES)
def test_layer_norm_gradients(device, shape, normalized):
    rng = np.random.default_rng(8)
    dims = (normalized,) if isinstance(normalized, int) else normalized
    check_grad(lambda *t: F.layer_norm(t[0], normalized, *t[1:]), rng.standard_normal(shape),
               rng.standard_normal(dims), rng.standard_normal(dims), device=device)


def test_layer_norm_weight_only_and_bias_only(device):
    rng = np.random.default_rng(9)
    x, p = rng.standard_normal((3, 4)), rng.standard_normal(4)
    check_grad(lambda t, w: F.layer_norm(t, 4, weight=w), x, p, device=device)
    check_grad(lambda t, b: F.layer_norm(t, 4, bias=b), x, p, device=device)


def test_layer_norm_rejects_mismatched_shapes():
    x = dp.tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match="normalized_shape"):
        F.layer_norm(x, 4)
    with pytest.raises(ValueError, match="weight"):
        F.layer_norm(x, 3, weight=dp.tensor(np.ones(4)))


def _batch_norm_definition(x, w, b, mean=None, var=None, eps=1e-5):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if mean is None:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * w.reshape(shape) + b.reshape(shape)


LAYOUTS = {  # how the (N, C, ...) input lies in memory
    "channels first": lambda t: t,
    "channels last": lambda t: t.transpose(0, 2, 3, 1).reshape(t.shape[0], -1).reshape(
        t.shape[0], t.shape[2], t.shape[3], t.shape[1]).transpose(0, 3, 1, 2),
    "strided": lambda t: t[:, :, ::2],  # neither: the generic path
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_is_its_definition_in_every_layout(device, layout, training):
    x, w, b = _data((4, 3, 6, 2), seed=8)
    arrange = LAYOUTS[layout]
    running_mean, running_var = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, 4.0])
    stats = [to_device(running_mean.copy(), device), to_device(running_var.copy(), device)]
    y = F.batch_norm(arrange(dp.tensor(to_device(x, device))), *stats, dp.tensor(to_device(w, device)),
                     dp.tensor(to_device(b, device)), training=training, momentum=0.25)
    seen = x[:, :, ::2] if layout == "strided" else x
    expected = _batch_norm_definition(seen, w, b, *(() if training else (running_mean, running_var)))
    np.testing.assert_allclose(to_numpy(y.data), expected, rtol=1e-12, atol=1e-12)
    if training:
        n = seen.size // 3
        variance = seen.var(axis=(0, 2, 3)) * n / (n - 1)  # unbiased, as PyTorch keeps it
        np.testing.assert_allclose(to_numpy(stats[0]), 0.75 * running_mean + 0.25 * seen.mean(axis=(0, 2, 3)),
                                   rtol=1e-12)
        np.testing.assert_allclose(to_numpy(stats[1]), 0.75 * running_var + 0.25 * variance, rtol=1e-12)
    mean, var = (to_device(a.copy(), device) for a in (running_mean, running_var))
    check_grad(lambda *t: F.batch_norm(arrange(t[0]), mean.copy(), var.copy(), *t[1:], training=training),
               x, w, b, device=device)


def test_batch_norm_defaults_and_which_statistics_it_uses():
    x, w, b = _data((6, 3, 2), seed=9)
    running_mean, running_var = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, 4.0])
    evaluated = F.batch_norm(dp.tensor(x), running_mean.copy(), running_var.copy())  # evaluation by default
    np.testing.assert_allclose(evaluated.data, _batch_norm_definition(x, np.ones(3), np.zeros(3), running_mean,
                                                                      running_var), rtol=1e-12)
    for stats in ((running_mean.copy(), None), (None, running_var.copy()), (None, None)):
        y = F.batch_norm(dp.tensor(x), *stats, training=False)  # one missing: the batch's own
        np.testing.assert_allclose(y.data, _batch_norm_definition(x, np.ones(3), np.zeros(3)), rtol=1e-12)
    small = x * 1e-3  # a variance of about 4e-6, next to eps = 1e-5
    y, (mean, var, count) = F.batch_norm_train(dp.tensor(small))
    np.testing.assert_allclose(y.data, _batch_norm_definition(small, np.ones(3), np.zeros(3), eps=1e-5), rtol=1e-10)
    assert type(count) is int and count == 12
    total, squares, count = F.batch_norm_stats(dp.tensor(small))
    assert type(count) is int and count == 12
    with pytest.raises(ValueError, match=r"^batch_norm expects input of shape \(N, C, ...\), got \(3,\)$"):
        F.batch_norm(dp.tensor(np.ones(3)), None, None)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_keeps_float32_and_gives_each_parameter_its_gradient_alone(training):
    x, w, b = (a.astype(np.float32) for a in _data((4, 3, 5), seed=10))
    stats = lambda: (np.zeros(3, np.float32), np.ones(3, np.float32))  # noqa: E731
    y = F.batch_norm(dp.tensor(x), *stats(), dp.tensor(w), dp.tensor(b), training=training)
    assert y.dtype == np.float32
    every = [dp.tensor(a.astype(np.float64), requires_grad=True) for a in (x, w, b)]
    gy = np.random.default_rng(11).standard_normal(x.shape)
    F.batch_norm(*every[:1], *stats(), *every[1:], training=training).backward(gy)
    for wanted in range(3):
        some = [dp.tensor(a.astype(np.float64), requires_grad=i == wanted) for i, a in enumerate((x, w, b))]
        F.batch_norm(*some[:1], *stats(), *some[1:], training=training).backward(gy)
        np.testing.assert_allclose(some[wanted].grad, every[wanted].grad, rtol=1e-12, atol=1e-12)
        assert all(t.grad is None for i, t in enumerate(some) if i != wanted)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_of_a_gradient_that_is_not_contiguous(training):
    """The gradient arriving from a transpose after batch norm lies in neither layout."""
    x, w, b = _data((3, 3, 4, 5), seed=12)
    mean, var = np.zeros(3), np.full(3, 2.0)
    check_grad(lambda *t: F.batch_norm(t[0], mean.copy(), var.copy(), *t[1:], training=training)
               .transpose(0, 1, 3, 2), x, w, b)


def test_layer_norm_over_every_axis_and_its_messages():
    x = np.random.default_rng(13).standard_normal((2, 3))
    y = F.layer_norm(dp.tensor(x), (2, 3))
    np.testing.assert_allclose(y.data, (x - x.mean()) / np.sqrt(x.var() + 1e-5), rtol=1e-12)
    with pytest.raises(ValueError, match=r"^layer_norm: normalized_shape \(1, 2, 3\) does not match the trailing "
                                         r"dimensions of input of shape \(2, 3\)$"):
        F.layer_norm(dp.tensor(x), (1, 2, 3))
    with pytest.raises(ValueError, match=r"^layer_norm: weight of shape \(2,\), expected \(3,\)$"):
        F.layer_norm(dp.tensor(x), 3, weight=dp.tensor(np.ones(2)))
    with pytest.raises(ValueError, match=r"^layer_norm: bias of shape \(3, 1\), expected \(3,\)$"):
        F.layer_norm(dp.tensor(x), 3, bias=dp.tensor(np.ones((3, 1))))
