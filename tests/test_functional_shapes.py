"""reshape, transpose, flatten, indexing, concatenate and stack."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy
from helpers import check_grad, compare_with_torch, requires_torch, torch

FAST = settings(max_examples=15, deadline=None)


@requires_torch
def test_reshape_transpose_flatten_match_torch(device):
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    pairs = [
        (lambda t: t.reshape(4, -1), lambda t: t.reshape(4, -1)),
        (lambda t: t.reshape((6, 4)), lambda t: t.reshape((6, 4))),
        (lambda t: t.transpose(2, 0, 1), lambda t: t.permute(2, 0, 1)),
        (lambda t: t.transpose(), lambda t: t.permute(2, 1, 0)),
        (lambda t: F.transpose(t, (1, -1, 0)), lambda t: t.permute(1, -1, 0)),
        (lambda t: t.reshape(6, 4).T, lambda t: t.reshape(6, 4).T),
        (lambda t: t.flatten(), lambda t: t.flatten()),
        (lambda t: t.flatten(1), lambda t: t.flatten(1)),
        (lambda t: F.flatten(t, 0, 1), lambda t: torch.flatten(t, 0, 1)),
    ]
    for ours, theirs in pairs:
        compare_with_torch(ours, theirs, x, device=device)


def test_flatten_of_a_zero_dimensional_tensor(device):
    x = dp.tensor(to_device(np.array(3.0), device), requires_grad=True)
    y = x.flatten()
    assert y.shape == (1,)
    y.sum().backward()
    assert to_numpy(x.grad).shape == ()


@FAST
@given(shape=array_shapes(min_dims=1, max_dims=4, max_side=4), seed=st.integers(0, 2**16))
def test_transpose_gradients(device, shape, seed):
    rng = np.random.default_rng(seed)
    axes = tuple(int(a) for a in rng.permutation(len(shape)))
    check_grad(lambda t: t.transpose(axes) * 2, rng.standard_normal(shape), device=device)


BASIC_INDICES = [1, -1, slice(1, 3), (slice(None), 2), (Ellipsis, 1), (None, 0), (1, slice(None, None, 2)),
                 (slice(None), None, slice(1, None))]


@requires_torch
@pytest.mark.parametrize("index", BASIC_INDICES)
def test_basic_indexing_matches_torch(device, index):
    x = np.random.default_rng(1).standard_normal((4, 5, 3))
    compare_with_torch(lambda t: t[index], lambda t: t[index], x, device=device)


def test_negative_step_slices(device):
    x = np.random.default_rng(2).standard_normal((5, 4))
    check_grad(lambda t: t[::-2, 1:], x, device=device)


@requires_torch
@pytest.mark.parametrize("index", [
    [0, 2, 2, 0, 0],                     # repeats must accumulate
    ([1, 1, 3], [0, 0, 2]),              # pairs, repeated
    (slice(None), [2, 2, 1]),
    np.array([[0, 3], [3, 3]]),
])
def test_fancy_indexing_with_repeats_matches_torch(device, index):
    x = np.random.default_rng(3).standard_normal((4, 3))

    def ours(t):
        return t[_on_device(index, device)]

    def theirs(t):
        return t[_torch_index(index)]

    compare_with_torch(ours, theirs, x, device=device)


def _on_device(index, device):
    if isinstance(index, tuple):
        return tuple(_on_device(i, device) for i in index)
    if isinstance(index, (list, np.ndarray)):
        return to_device(np.asarray(index), device)
    return index


def _torch_index(index):
    if isinstance(index, tuple):
        return tuple(_torch_index(i) for i in index)
    if isinstance(index, (list, np.ndarray)):
        return torch.as_tensor(np.asarray(index))
    return index


def test_boolean_mask_indexing(device):
    x = np.random.default_rng(4).standard_normal((3, 4))
    mask = to_device(x > 0, device)
    check_grad(lambda t: t[mask] * 3, x, device=device)
    t = dp.tensor(to_device(x, device), requires_grad=True)
    t[mask].sum().backward()
    np.testing.assert_array_equal(to_numpy(t.grad), (x > 0).astype(float))


def test_indexing_with_a_tensor_index(device):
    x = dp.tensor(to_device(np.arange(5.0), device), requires_grad=True)
    index = dp.tensor(to_device(np.array([4, 4, 0]), device))
    x[index].sum().backward()
    np.testing.assert_array_equal(to_numpy(x.grad), [1, 0, 0, 0, 2])


@requires_torch
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concatenate_matches_torch(device, axis):
    rng = np.random.default_rng(5)
    shapes = [(2, 3, 4), (2, 3, 4), (2, 3, 4)]
    shapes[1] = tuple(5 if i == axis % 3 else n for i, n in enumerate(shapes[1]))  # sizes differ on the axis
    arrays = [rng.standard_normal(s) for s in shapes]
    compare_with_torch(lambda *t: F.concatenate(t, axis=axis), lambda *t: torch.cat(t, dim=axis), *arrays,
                       device=device)


@requires_torch
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_stack_matches_torch(device, axis):
    arrays = np.random.default_rng(6).standard_normal((3, 2, 4))
    compare_with_torch(lambda *t: F.stack(t, axis=axis), lambda *t: torch.stack(t, dim=axis), *arrays,
                       device=device)


def test_default_axes_and_dims_are_pytorchs():
    a, b = dp.tensor(np.ones((2, 3))), dp.tensor(np.zeros((2, 3)))
    assert F.concatenate([a, b]).shape == (4, 3) and F.stack([a, b]).shape == (2, 2, 3)
    x = dp.tensor(np.ones((2, 3, 4)))
    assert F.flatten(x).shape == (24,) and F.flatten(x, 1).shape == (2, 12) and F.flatten(x, 0, 1).shape == (6, 4)


def test_to_casts_both_ways_and_is_a_no_op_when_nothing_changes():
    from distprop.functional.shapes import to

    x = dp.tensor(np.array([1.5, -2.25], np.float32), requires_grad=True)
    assert to(x) is x and to(x, device="cpu") is x and to(x, dtype=np.float32) is x
    assert to(x, device="CPU") is x and x.to("numpy") is x  # device names are normalised first
    y = to(x, dtype=np.float64)
    assert y is not x and y.dtype == np.float64 and y.device == "cpu" and np.array_equal(y.data, [1.5, -2.25])
    y.backward(np.array([0.1, 0.2]))  # float64 gradient, handed back as float32
    assert x.grad.dtype == np.float32 and np.array_equal(x.grad, np.array([0.1, 0.2], np.float32))
    z = to(x, device="cpu", dtype=np.float16)
    assert z.dtype == np.float16 and z.requires_grad


def test_an_index_tuple_may_hold_tensors():
    x = dp.tensor(np.arange(12.0).reshape(3, 4), requires_grad=True)
    rows = dp.tensor(np.array([2, 0, 2]))
    y = x[rows, 1:3]
    np.testing.assert_array_equal(y.data, np.arange(12.0).reshape(3, 4)[[2, 0, 2], 1:3])
    y.backward(np.ones((3, 2)))
    np.testing.assert_array_equal(x.grad, [[0, 1, 1, 0], [0, 0, 0, 0], [0, 2, 2, 0]])  # row 2 twice


def test_stack_puts_the_new_axis_first_by_default():
    a, b = dp.tensor(np.zeros((2, 3))), dp.tensor(np.ones((2, 3)))
    stacked = F.stack([a, b])
    assert stacked.shape == (2, 2, 3) and np.array_equal(stacked.data[1], np.ones((2, 3)))


def test_to_names_a_device_it_does_not_know():
    with pytest.raises(ValueError, match=r"^unknown device 'tpu': expected 'cpu' or 'gpu'$"):
        dp.tensor(np.ones(2)).to(device="tpu")  # Tensor.to is shapes.to
