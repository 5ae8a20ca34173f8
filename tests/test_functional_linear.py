"""The fused linear layer: weight (out, in), optional bias, any leading dimensions."""

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device
from helpers import check_grad, compare_with_torch, requires_torch, torch


@pytest.mark.parametrize("x_shape", [(4,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gradients(device, x_shape, with_bias):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(x_shape), rng.standard_normal((5, 4))] + ([rng.standard_normal(5)] if with_bias else [])
    check_grad(F.linear, *arrays, device=device)


@requires_torch
@pytest.mark.parametrize("x_shape", [(4,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_torch(device, x_shape, with_bias):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(x_shape), rng.standard_normal((5, 4))] + ([rng.standard_normal(5)] if with_bias else [])
    compare_with_torch(F.linear, torch.nn.functional.linear, *arrays, device=device)


def test_linear_skips_the_input_gradient_of_data(device):
    rng = np.random.default_rng(2)
    x = dp.tensor(to_device(rng.standard_normal((3, 4)), device))
    w = dp.tensor(to_device(rng.standard_normal((2, 4)), device), requires_grad=True)
    F.linear(x, w).sum().backward()
    assert x.grad is None and w.grad is not None


@pytest.mark.parametrize("x_shape", [(4,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True), (False, True, True)])
def test_linear_is_x_times_weight_transposed_plus_bias(x_shape, needs):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal((5, 4)), rng.standard_normal(5)
    tensors = [dp.tensor(a, requires_grad=r) for a, r in zip((x, w, b), needs)]
    y = F.linear(*tensors)
    np.testing.assert_allclose(y.data, x @ w.T + b, rtol=1e-13)
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    rows_x, rows_gy = x.reshape(-1, 4), gy.reshape(-1, 5)
    expected = (gy @ w, rows_gy.T @ rows_x, rows_gy.sum(axis=0))
    for t, want, needed in zip(tensors, expected, needs):
        if needed:
            np.testing.assert_allclose(t.grad, want, rtol=1e-13)
        else:
            assert t.grad is None
    if needs[0]:
        np.testing.assert_allclose(F.linear(dp.tensor(x), dp.tensor(w)).data, x @ w.T, rtol=1e-13)


def test_linear_writes_the_weight_gradient_into_the_weight_s_grad_buffer():
    rng = np.random.default_rng(4)
    x, w = dp.tensor(rng.standard_normal((6, 4))), dp.tensor(rng.standard_normal((3, 4)), requires_grad=True)
    buffer = np.full((3, 4), np.nan)
    w.grad_buffer = buffer
    gy = rng.standard_normal((6, 3))
    F.linear(x, w, dp.tensor(np.zeros(3), requires_grad=True)).backward(gy)
    assert w.grad is buffer  # no copy
    np.testing.assert_allclose(buffer, gy.T @ x.data, rtol=1e-13)


@pytest.mark.parametrize("needs", [(True, False), (False, True), (True, True)])
def test_linear_without_bias_gives_each_wanted_gradient(needs):
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    tensors = [dp.tensor(a, requires_grad=r) for a, r in zip((x, w), needs)]
    gy = rng.standard_normal((3, 5))
    F.linear(*tensors).backward(gy)
    for t, want, needed in zip(tensors, (gy @ w, gy.T @ x), needs):
        if needed:
            np.testing.assert_allclose(t.grad, want, rtol=1e-13)
        else:
            assert t.grad is None


def test_linear_of_a_0d_input_says_so():
    message = (r"^mat1 and mat2 shapes cannot be multiplied \(1x0-d and 4x5\): linear got input of shape \(\) "
               r"but its weight of shape \(5, 4\) takes 4 features$")
    with pytest.raises(ValueError, match=message):
        F.linear(dp.tensor(np.float64(2.0)), dp.tensor(np.ones((5, 4))))


def test_linear_with_a_1d_weight_is_a_dot_product_per_row():
    # as in PyTorch: a weight of shape (in_features,) gives one number per row
    x, w = np.arange(12.0).reshape(3, 4), np.array([1.0, -1.0, 2.0, 0.5])
    np.testing.assert_allclose(F.linear(dp.tensor(x), dp.tensor(w)).data, x @ w, rtol=1e-15)
