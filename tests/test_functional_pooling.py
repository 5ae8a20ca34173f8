"""max_pool2d, avg_pool2d, adaptive_avg_pool2d, global_avg_pool2d."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy
from helpers import check_grad, compare_with_torch, requires_torch, torch

FAST = settings(max_examples=20, deadline=None)
TF = torch.nn.functional if torch else None


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(st.sampled_from([None, 1, 2, (1, 2), (3, 1)]))
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    h, w = draw(st.integers(kh, 7)), draw(st.integers(kw, 7))
    return dict(shape=(draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w), kernel_size=(kh, kw),
                stride=stride, padding=padding, seed=draw(st.integers(0, 2**16)))


def _args(case):
    return case["kernel_size"], case["stride"], case["padding"]


def _input(case):
    # A permutation of distinct values: no ties (where max's gradient is not smooth).
    rng = np.random.default_rng(case["seed"])
    return rng.permutation(np.prod(case["shape"])).reshape(case["shape"]) / 7.0


@requires_torch
@FAST
@given(case=pool_cases())
def test_max_pool2d_matches_torch(device, case):
    compare_with_torch(lambda t: F.max_pool2d(t, *_args(case)), lambda t: TF.max_pool2d(t, *_args(case)),
                       _input(case), device=device)


@FAST
@given(case=pool_cases())
def test_max_pool2d_gradients(device, case):
    check_grad(lambda t: F.max_pool2d(t, *_args(case)), _input(case), device=device)


@requires_torch
@FAST
@given(case=pool_cases(), count_include_pad=st.booleans())
def test_avg_pool2d_matches_torch(device, case, count_include_pad):
    compare_with_torch(lambda t: F.avg_pool2d(t, *_args(case), count_include_pad=count_include_pad),
                       lambda t: TF.avg_pool2d(t, *_args(case), count_include_pad=count_include_pad),
                       _input(case), device=device)


@FAST
@given(case=pool_cases())
def test_avg_pool2d_gradients(device, case):
    check_grad(lambda t: F.avg_pool2d(t, *_args(case)), _input(case), device=device)


@requires_torch
def test_avg_pool2d_divisor_override(device):
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
    compare_with_torch(lambda t: F.avg_pool2d(t, 2, divisor_override=3),
                       lambda t: TF.avg_pool2d(t, 2, divisor_override=3), x, device=device)


@requires_torch
@pytest.mark.parametrize("kernel, stride, padding", [(2, None, 0), (3, 1, 1), (2, 1, 0)])
def test_max_pool2d_ties_go_to_the_first_maximum_like_torch(device, kernel, stride, padding):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (2, 2, 5, 6)).astype(float)  # many ties
    compare_with_torch(lambda t: F.max_pool2d(t, kernel, stride, padding),
                       lambda t: TF.max_pool2d(t, kernel, stride, padding), x, device=device)


@requires_torch
def test_max_pool2d_with_more_than_256_window_offsets_like_torch(device):
    x = np.random.default_rng(2).integers(0, 4, (2, 2, 21, 20)).astype(float)  # 17x17 windows: int32 argmax
    compare_with_torch(lambda t: F.max_pool2d(t, 17, 2), lambda t: TF.max_pool2d(t, 17, 2), x, device=device)


@requires_torch
def test_max_pool2d_on_channels_last_input_split_over_threads_like_torch(device):
    from threadpoolctl import threadpool_limits

    x = np.random.default_rng(3).integers(0, 5, (160, 6, 28, 28)).astype(float)  # ties, several parts
    with threadpool_limits(limits=3, user_api="blas"):
        compare_with_torch(lambda t: F.max_pool2d(F.conv2d(t, dp.tensor(np.eye(6).reshape(6, 6, 1, 1))), 2),
                           lambda t: TF.max_pool2d(t, 2), x, device=device)


@requires_torch
@pytest.mark.parametrize("output_size", [1, (1, 1), 2, (3, 2), (4, None), (5, 7), (6, 6)])
def test_adaptive_avg_pool2d_matches_torch(device, output_size):
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 5))
    compare_with_torch(lambda t: F.adaptive_avg_pool2d(t, output_size),
                       lambda t: TF.adaptive_avg_pool2d(t, output_size), x, device=device)


def test_adaptive_avg_pool2d_gradients(device):
    x = np.random.default_rng(3).standard_normal((2, 3, 7, 5))
    check_grad(lambda t: F.adaptive_avg_pool2d(t, (3, 2)), x, device=device)
    check_grad(lambda t: F.adaptive_avg_pool2d(t, 1), x, device=device)


@requires_torch
def test_global_avg_pool2d_matches_torch(device):
    x = np.random.default_rng(4).standard_normal((3, 4, 5, 2))
    compare_with_torch(F.global_avg_pool2d, lambda t: t.mean(dim=(2, 3)), x, device=device)
    check_grad(F.global_avg_pool2d, x, device=device)


@pytest.mark.parametrize("pool", [lambda t: F.max_pool2d(t, 2), lambda t: F.avg_pool2d(t, 3, 1, 1)])
def test_pooling_keeps_channels_last_layout(device, pool):
    nhwc = np.random.default_rng(5).standard_normal((2, 6, 3, 4)).astype(np.float32)
    x = to_device(nhwc, device).transpose(0, 3, 1, 2)  # logically NCHW, channels-last in memory
    y = pool(dp.tensor(x))
    assert y.dtype == np.float32 and y.data.strides[1] == 4
    reference = pool(dp.tensor(to_device(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)), device)))
    np.testing.assert_allclose(to_numpy(y.data), to_numpy(reference.data))


@pytest.mark.parametrize("call, message", [
    (lambda t: F.max_pool2d(t, 2, padding=2), "half the kernel"),
    (lambda t: F.avg_pool2d(t, 0), "positive"),
    (lambda t: F.max_pool2d(t, 9), "larger than"),
    (lambda t: F.max_pool2d(t.reshape(4, 16), 2), r"\(N, C, H, W\)"),
])
def test_pooling_rejects_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(dp.tensor(np.ones((1, 4, 4, 4))))


@pytest.mark.parametrize("shape, kwargs, out_shape", [((2, 0, 4, 4), {}, (2, 0, 2, 2)),
                                                      ((2, 3, 0, 4), dict(padding=1), (2, 3, 1, 3))])
def test_max_pool2d_of_empty_maps(shape, kwargs, out_shape):
    x = dp.tensor(np.zeros(shape), requires_grad=True)
    y = F.max_pool2d(x, 2, **kwargs)
    assert y.shape == out_shape and np.all(y.data == -np.inf)  # windows of padding only
    y.sum().backward()
    assert x.grad.shape == shape and x.grad.dtype == np.float64


def test_max_pool2d_gradient_goes_to_each_window_s_maximum_only(device):
    x = np.array([[1.0, 5.0, 2.0, 0.0],
                  [3.0, 2.0, 7.0, 1.0],
                  [0.0, 4.0, 1.0, 6.0],
                  [9.0, 8.0, 2.0, 3.0]])[None, None]
    t = dp.tensor(to_device(x, device), requires_grad=True)
    y = F.max_pool2d(t, 2)
    np.testing.assert_array_equal(to_numpy(y.data)[0, 0], [[5, 7], [9, 6]])
    y.backward(to_device(np.array([[[[10.0, 20.0], [30.0, 40.0]]]]), device))
    np.testing.assert_array_equal(to_numpy(t.grad)[0, 0], [[0, 10, 0, 0],
                                                             [0, 0, 20, 0],
                                                             [0, 0, 0, 40],
                                                             [30, 0, 0, 0]])
    # overlapping windows (stride 1): a maximum shared by several windows collects all their gradients
    t = dp.tensor(to_device(x, device), requires_grad=True)
    F.max_pool2d(t, 2, stride=1).sum().backward()
    counts = np.zeros((4, 4))
    for i in range(3):
        for j in range(3):
            window = x[0, 0, i:i + 2, j:j + 2]
            a, b = np.unravel_index(np.argmax(window), (2, 2))
            counts[i + a, j + b] += 1
    np.testing.assert_array_equal(to_numpy(t.grad)[0, 0], counts)


def _adaptive_average(x, out_h, out_w):
    """PyTorch's adaptive pooling by its definition: bin i of n over a side of length
    L spans [floor(i L / n), ceil((i + 1) L / n))."""
    h, w = x.shape[2:]
    out = np.empty(x.shape[:2] + (out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            rows = slice(i * h // out_h, -(-(i + 1) * h // out_h))
            cols = slice(j * w // out_w, -(-(j + 1) * w // out_w))
            out[:, :, i, j] = x[:, :, rows, cols].mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("output_size", [(1, 1), (2, 1), (1, 2), (3, 2), (6, 5), (4, 3)])
def test_adaptive_avg_pool2d_is_its_definition(device, output_size):
    x = np.random.default_rng(6).standard_normal((2, 3, 6, 5))
    y = F.adaptive_avg_pool2d(dp.tensor(to_device(x, device)), output_size)
    np.testing.assert_allclose(to_numpy(y.data), _adaptive_average(x, *output_size), rtol=1e-13, atol=1e-15)
    y32 = F.adaptive_avg_pool2d(dp.tensor(to_device(x.astype(np.float32), device)), output_size)
    assert y32.dtype == np.float32
    g = F.global_avg_pool2d(dp.tensor(to_device(x.astype(np.float32), device)))
    assert g.dtype == np.float32 and g.shape == (2, 3)


def test_adaptive_and_global_pooling_reject_bad_shapes():
    x = dp.tensor(np.ones((2, 3, 4, 4)))
    for size in ((0, 2), (2, 0), 0):
        with pytest.raises(ValueError, match=r"^adaptive_avg_pool2d: output_size must be positive, got "):
            F.adaptive_avg_pool2d(x, size)
    with pytest.raises(ValueError, match=r"^adaptive_avg_pool2d expects input of shape \(N, C, H, W\), "
                                         r"got \(2, 3, 4\)$"):
        F.adaptive_avg_pool2d(dp.tensor(np.ones((2, 3, 4))), 2)
    with pytest.raises(ValueError, match=r"^global_avg_pool2d expects input of shape \(N, C, H, W\), got \(3, 4\)$"):
        F.global_avg_pool2d(dp.tensor(np.ones((3, 4))))


def _pool_definition(x, kernel, stride, padding, kind, count_include_pad=True):
    """Max or average of each window of the padded input, from the definition."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    fill = -np.inf if kind == "max" else 0.0
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    real = np.pad(np.ones(x.shape[2:]), ((ph, ph), (pw, pw)))
    out_h, out_w = (padded.shape[2] - kh) // sh + 1, (padded.shape[3] - kw) // sw + 1
    out = np.empty(x.shape[:2] + (out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            window = padded[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            if kind == "max":
                out[:, :, i, j] = window.max(axis=(2, 3))
            else:
                count = kh * kw if count_include_pad else real[i * sh:i * sh + kh, j * sw:j * sw + kw].sum()
                out[:, :, i, j] = window.sum(axis=(2, 3)) / count
    return out


@pytest.fixture
def garbage_in_fresh_arrays(monkeypatch):
    """Fresh pooling arrays hold nan, not the zeros new memory often happens to hold:
    a backward that leaves part of its gradient unwritten shows."""
    from distprop.functional import pooling

    real_empty = pooling._empty

    def empty(xp, shape, dtype, channels_last):
        array = real_empty(xp, shape, dtype, channels_last)
        array[...] = np.nan if np.dtype(dtype).kind == "f" else 7
        return array

    monkeypatch.setattr(pooling, "_empty", empty)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 3, 5, 5), (2, 2), (2, 2), (0, 0)),  # the last row and column belong to no window
    ((2, 3, 4, 5), (2, 2), (2, 2), (0, 0)),  # rows covered, the last column not
    ((2, 3, 4, 6), (2, 3), (2, 3), (0, 0)),  # windows tile the input
    ((2, 3, 5, 4), (3, 2), (2, 1), (1, 1)),  # overlapping, padded
    ((1, 2, 6, 5), (2, 2), (3, 3), (1, 0)),  # gaps between windows
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooling_is_its_definition_and_fills_every_gradient_cell(garbage_in_fresh_arrays, kind, shape, kernel,
                                                                  stride, padding, channels_last):
    x = np.random.default_rng(8).permutation(np.prod(shape)).reshape(shape) / 7.0  # no ties
    t = dp.tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) if channels_last else x,
                  requires_grad=True)
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    y = pool(t, kernel, stride, padding)
    np.testing.assert_allclose(y.data, _pool_definition(x, kernel, stride, padding, kind), rtol=1e-13)
    gy = np.random.default_rng(9).standard_normal(y.shape)
    y.backward(gy)
    # the gradient of the definition: each window's gy goes to its maximum, or in equal shares to its cells
    expected = np.zeros(x.shape)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    grad = np.zeros(padded.shape)
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            rows, cols = slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw)
            if kind == "max":
                window = padded[:, :, rows, cols].reshape(x.shape[0], x.shape[1], -1)
                a, b = np.unravel_index(window.argmax(axis=2), (kh, kw))
                for n in range(x.shape[0]):
                    for c in range(x.shape[1]):
                        grad[n, c, i * sh + a[n, c], j * sw + b[n, c]] += gy[n, c, i, j]
            else:
                grad[:, :, rows, cols] += gy[:, :, i, j][:, :, None, None] / (kh * kw)
    expected = grad[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]]
    np.testing.assert_allclose(t.grad, expected, rtol=1e-13, atol=1e-15)
    assert (y.data.strides[1] < y.data.strides[3]) == channels_last  # the input's layout kept


@pytest.mark.parametrize("pool", [lambda t: F.max_pool2d(t, 2), lambda t: F.avg_pool2d(t, 3, 1, 1)])
def test_a_gradient_in_the_other_layout_is_taken_in_the_input_s(pool):
    """A channels-last pooling output flattened (as before a linear layer) hands back a
    channels-first gradient; a transposed output, a channels-last one."""
    x = np.random.default_rng(10).permutation(2 * 3 * 6 * 6).reshape(2, 3, 6, 6) / 5.0
    last = dp.tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2), requires_grad=True)
    first = dp.tensor(x, requires_grad=True)
    gy = np.random.default_rng(11).standard_normal((2, pool(first).data.size // 2))
    pool(last).reshape(2, -1).backward(gy)
    pool(first).reshape(2, -1).backward(gy)
    np.testing.assert_allclose(last.grad, first.grad, rtol=1e-14)
    reference = first.grad.copy()
    first.grad = None
    y = pool(first)
    y.transpose(0, 2, 3, 1).backward(np.ascontiguousarray(gy.reshape(y.shape).transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(first.grad, reference, rtol=1e-14)


def test_pooling_split_over_threads_gives_the_one_thread_result(monkeypatch):
    from threadpoolctl import threadpool_limits

    from distprop.functional import pooling

    monkeypatch.setattr(pooling, "_MIN_THREAD_ELEMENTS", 1)
    x = np.random.default_rng(12).permutation(7 * 2 * 6 * 6).reshape(7, 2, 6, 6) / 3.0

    def run(threads):
        results = []
        with threadpool_limits(limits=threads, user_api="blas"):
            for pool in (lambda t: F.max_pool2d(t, 2), lambda t: F.max_pool2d(t, 3, 1, 1),
                         lambda t: F.avg_pool2d(t, 2), lambda t: F.avg_pool2d(t, 3, 2, 1)):
                t = dp.tensor(x, requires_grad=True)
                y = pool(t)
                y.backward(np.arange(y.data.size, dtype=np.float64).reshape(y.shape))
                results += [y.data, t.grad]
        return results

    for a, b in zip(run(1), run(3)):
        np.testing.assert_array_equal(b, a)


def test_max_pool2d_over_more_than_256_offsets():
    x = np.zeros((1, 1, 257, 1))
    x[0, 0, 256, 0] = 1.0  # the maximum at offset 256, past what a byte can index
    t = dp.tensor(x, requires_grad=True)
    y = F.max_pool2d(t, (257, 1))
    y.backward(np.ones((1, 1, 1, 1)))
    assert y.data.item() == 1.0 and t.grad[0, 0, 256, 0] == 1.0 and t.grad.sum() == 1.0


def test_avg_pool2d_counts_padding_by_default():
    x = np.ones((1, 1, 2, 2))
    np.testing.assert_allclose(F.avg_pool2d(dp.tensor(x), 2, 1, 1).data[0, 0], [[0.25, 0.5, 0.25],
                                                                                   [0.5, 1.0, 0.5],
                                                                                   [0.25, 0.5, 0.25]])
    np.testing.assert_array_equal(F.avg_pool2d(dp.tensor(x), 2, 1, 1, count_include_pad=False).data, np.ones((1, 1, 3, 3)))


@pytest.mark.parametrize("name", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("args, message", [
    ((0,), "{name}: kernel_size and stride must be positive"),
    (((2, 0),), "{name}: kernel_size and stride must be positive"),
    ((2, (0, 1)), "{name}: kernel_size and stride must be positive"),
    ((2, (1, 0)), "{name}: kernel_size and stride must be positive"),
    ((2, 1, (2, 0)), "{name}: padding must be between 0 and half the kernel size, got (2, 0)"),
    ((2, 1, (0, 2)), "{name}: padding must be between 0 and half the kernel size, got (0, 2)"),
    ((3, 1, (1, -1)), "{name}: padding must be between 0 and half the kernel size, got (1, -1)"),
    (((5, 1),), "{name}: kernel 5x1 is larger than the padded input"),
    (((1, 5),), "{name}: kernel 1x5 is larger than the padded input"),
    (((1, 2, 3),), "{name}: kernel_size must be an int or a pair, got (1, 2, 3)"),
    ((2, (1, 1, 1)), "{name}: stride must be an int or a pair, got (1, 1, 1)"),
    ((2, 1, [1]), "{name}: padding must be an int or a pair, got [1]"),
])
def test_pooling_errors_name_the_op_and_the_argument(name, args, message):
    import re

    with pytest.raises(ValueError, match="^" + re.escape(message.format(name=name)) + "$"):
        getattr(F, name)(dp.tensor(np.ones((1, 1, 4, 4))), *args)
    with pytest.raises(ValueError, match="^" + re.escape(f"{name} expects input of shape (N, C, H, W), got (4, 4)")):
        getattr(F, name)(dp.tensor(np.ones((4, 4))), 2)
