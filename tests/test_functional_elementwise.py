"""exp, log, sqrt, abs, clamp."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes

import distprop.functional as F
from helpers import check_grad, compare_with_torch, requires_torch, torch

FAST = settings(max_examples=15, deadline=None)
SHAPES = array_shapes(min_dims=0, max_dims=3, max_side=4)

# name -> (ours, torch's, input transform keeping the function smooth there)
OPS = {
    "exp": (F.exp, torch and torch.exp, lambda x: x),
    "log": (F.log, torch and torch.log, lambda x: np.abs(x) + 0.1),
    "sqrt": (F.sqrt, torch and torch.sqrt, lambda x: np.abs(x) + 0.1),
    "abs": (F.abs, torch and torch.abs, lambda x: np.sign(x + 1e-3) * (np.abs(x) + 0.1)),
    "clamp": (lambda t: F.clamp(t, -0.5, 0.7), torch and (lambda t: torch.clamp(t, -0.5, 0.7)), lambda x: x),
    "clamp_min": (lambda t: F.clamp(t, min=0.2), torch and (lambda t: torch.clamp(t, min=0.2)), lambda x: x),
    "clamp_max": (lambda t: F.clamp(t, max=0.2), torch and (lambda t: torch.clamp(t, max=0.2)), lambda x: x),
    "method_exp": (lambda t: t.exp(), torch and (lambda t: t.exp()), lambda x: x),
    "method_log": (lambda t: t.log(), torch and (lambda t: t.log()), lambda x: np.abs(x) + 0.1),
    "method_sqrt": (lambda t: t.sqrt(), torch and (lambda t: t.sqrt()), lambda x: np.abs(x) + 0.1),
}


@pytest.mark.parametrize("name", OPS)
@FAST
@given(shape=SHAPES, seed=st.integers(0, 2**16))
def test_elementwise_gradients(device, name, shape, seed):
    ours, _, domain = OPS[name]
    check_grad(ours, domain(np.random.default_rng(seed).standard_normal(shape)), device=device)


@requires_torch
@pytest.mark.parametrize("name", OPS)
def test_elementwise_matches_torch(device, name):
    ours, theirs, domain = OPS[name]
    x = domain(np.random.default_rng(0).standard_normal((3, 5)))
    compare_with_torch(ours, theirs, x, device=device)
    compare_with_torch(ours, theirs, domain(np.array(0.3)), device=device)


@requires_torch
def test_clamp_gradient_at_the_bounds_matches_torch(device):
    x = np.array([-0.5, -0.2, 0.7, 1.0, -2.0])
    compare_with_torch(lambda t: F.clamp(t, -0.5, 0.7), lambda t: torch.clamp(t, -0.5, 0.7), x, device=device)


DEFINITIONS = {"exp": np.exp, "log": np.log, "sqrt": np.sqrt, "abs": np.abs,
               "clamp": lambda x: np.minimum(np.maximum(x, -0.5), 0.7), "clamp_min": lambda x: np.maximum(x, 0.2),
               "clamp_max": lambda x: np.minimum(x, 0.2), "method_exp": np.exp, "method_log": np.log,
               "method_sqrt": np.sqrt}


@pytest.mark.parametrize("name", OPS)
def test_elementwise_is_its_definition_and_keeps_float32(name):
    import distprop as dp

    ours, _, domain = OPS[name]
    x = domain(np.random.default_rng(2).standard_normal((3, 4)))
    np.testing.assert_allclose(ours(dp.tensor(x)).data, DEFINITIONS[name](x), rtol=1e-15)
    assert ours(dp.tensor(x.astype(np.float32))).dtype == np.float32


def test_abs_gradient_is_the_sign_and_zero_at_zero():
    import distprop as dp

    x = dp.tensor(np.array([-2.0, 0.0, 3.0, -0.0]), requires_grad=True)
    F.abs(x).backward(np.array([5.0, 5.0, 5.0, 5.0]))
    np.testing.assert_array_equal(x.grad, [-5.0, 0.0, 5.0, 0.0])
