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
