"""sum, mean and max: axes (None, int, negative, tuples), keepdims, 0-d, ties."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy
from helpers import check_grad, compare_with_torch, requires_torch

FAST = settings(max_examples=20, deadline=None)


@st.composite
def shapes_and_axes(draw):
    """A shape (0-d included) and an axis argument: None, an int or a tuple."""
    shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4))
    ndim = len(shape)
    if ndim == 0:
        return shape, draw(st.sampled_from([None, 0, -1, ()]))
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        return shape, None
    if kind == "int":
        return shape, draw(st.integers(-ndim, ndim - 1))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return shape, tuple(a - ndim if draw(st.booleans()) else a for a in axes)


def _torch_dims(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    return axis if isinstance(axis, tuple) else (axis,)


@requires_torch
@pytest.mark.parametrize("name", ["sum", "mean", "max"])
@FAST
@given(case=shapes_and_axes(), keepdims=st.booleans(), seed=st.integers(0, 2**16))
def test_reductions_match_torch(device, name, case, keepdims, seed):
    shape, axis = case
    x = np.random.default_rng(seed).standard_normal(shape)

    def theirs(t):
        dims = _torch_dims(axis, t.ndim)
        if name == "max":
            return t.amax(dim=dims, keepdim=keepdims) if dims else t.clone()
        return getattr(t, name)(dim=dims, keepdim=keepdims) if dims else t.clone()

    compare_with_torch(lambda t: getattr(t, name)(axis, keepdims), theirs, x, device=device)


@pytest.mark.parametrize("name", ["sum", "mean", "max"])
@FAST
@given(case=shapes_and_axes(), keepdims=st.booleans(), seed=st.integers(0, 2**16))
def test_reduction_gradients(device, name, case, keepdims, seed):
    shape, axis = case
    x = np.random.default_rng(seed).standard_normal(shape)
    check_grad(lambda t: getattr(F, name)(t, axis, keepdims), x, device=device)


@requires_torch
def test_max_ties_share_the_gradient_like_torch(device):
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [0.0, -1.0, 0.0]])
    compare_with_torch(lambda t: t.max(), lambda t: t.max(), x, device=device)
    compare_with_torch(lambda t: t.max(axis=1), lambda t: t.amax(dim=1), x, device=device)
    compare_with_torch(lambda t: t.max(axis=0, keepdims=True), lambda t: t.amax(dim=0, keepdim=True), x,
                       device=device)


@requires_torch
def test_mean_over_a_tuple_of_axes(device):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    compare_with_torch(lambda t: t.mean(axis=(0, 2, 3)), lambda t: t.mean(dim=(0, 2, 3)), x, device=device)
    compare_with_torch(lambda t: t.mean(axis=[-1, 1], keepdims=True),
                       lambda t: t.mean(dim=(-1, 1), keepdim=True), x, device=device)


def test_zero_dimensional_reductions(device):
    x = dp.tensor(to_device(np.array(2.5), device), requires_grad=True)
    for y in (x.sum(), x.mean(axis=0), x.max(axis=-1), x.sum(keepdims=True)):
        assert y.shape == () and float(to_numpy(y.data)) == 2.5
    (x.sum() + x.mean(0) + x.max()).backward()
    assert float(to_numpy(x.grad)) == 3.0


def test_out_of_range_axis_is_an_error():
    x = dp.tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(ValueError, match="axis 2"):
        x.sum(axis=2)
    with pytest.raises(ValueError, match="axis -3"):
        x.mean(axis=(0, -3))


@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2), [2, 1], (-3, -1)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions_are_numpys_and_gradients_by_hand(axis, keepdims):
    x = np.arange(24.0).reshape(2, 3, 4) * 0.5 - 3
    x[1, 2, 3] = 50.0  # one clear maximum over every axis choice containing it
    numpy_axis = tuple(axis) if isinstance(axis, list) else axis
    for name, reference in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
        t = dp.tensor(x, requires_grad=True)
        y = getattr(F, name)(t, axis, keepdims)
        expected = reference(x, axis=numpy_axis, keepdims=keepdims)
        assert y.shape == np.shape(expected), name
        np.testing.assert_allclose(y.data, expected, rtol=1e-15)
        y.backward(np.ones(y.shape))
        count = x.size // np.size(expected)
        if name == "sum":
            np.testing.assert_array_equal(t.grad, np.ones_like(x))
        elif name == "mean":
            np.testing.assert_allclose(t.grad, np.full_like(x, 1 / count), rtol=1e-15)
        else:  # 1 where an element is its slice's maximum
            np.testing.assert_array_equal(t.grad, (x == np.max(x, axis=numpy_axis, keepdims=True)).astype(float))


def test_reduction_errors_say_which_axis():
    x = dp.tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"^axis 2 is out of range for a tensor of 2 dimensions$"):
        F.sum(x, 2)
    with pytest.raises(ValueError, match=r"^axis -3 is out of range for a tensor of 2 dimensions$"):
        F.mean(x, (0, -3))
    with pytest.raises(ValueError, match=r"^max of an empty tensor$"):
        F.max(dp.tensor(np.ones((0, 3))))


def test_reductions_drop_the_reduced_axes_by_default_and_0d_tensors_take_axis_0_or_minus_1():
    x = dp.tensor(np.ones((2, 3)))
    assert F.sum(x).shape == () and F.mean(x, 1).shape == (2,) and F.max(x, 0).shape == (3,)
    scalar = dp.tensor(np.array(4.0), requires_grad=True)
    for axis in (0, -1, None):
        assert F.sum(scalar, axis).item() == 4.0
    for axis in (1, -2):
        with pytest.raises(ValueError, match=rf"^axis {axis} is out of range for a tensor of 0 dimensions$"):
            F.sum(scalar, axis)
    y = F.max(scalar, 0, keepdims=True)
    y.backward(np.array(2.0))
    assert scalar.grad == 2.0
