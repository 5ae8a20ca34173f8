"""relu, leaky_relu, gelu (and the erf behind it), tanh, sigmoid, softmax, log_softmax."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes

import distprop as dp
import distprop.functional as F
from distprop.backend import to_device, to_numpy
from distprop.functional.special import erf, erfc
from helpers import check_grad, compare_with_torch, requires_torch, torch

FAST = settings(max_examples=15, deadline=None)
SHAPES = array_shapes(min_dims=0, max_dims=3, max_side=4)
TF = torch.nn.functional if torch else None

ACTIVATIONS = {
    "relu": (F.relu, TF and TF.relu),
    "method_relu": (lambda t: t.relu(), TF and TF.relu),
    "leaky_relu": (F.leaky_relu, TF and TF.leaky_relu),
    "leaky_relu_0.2": (lambda t: F.leaky_relu(t, 0.2), TF and (lambda t: TF.leaky_relu(t, 0.2))),
    "gelu": (F.gelu, TF and TF.gelu),
    "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), TF and (lambda t: TF.gelu(t, approximate="tanh"))),
    "tanh": (F.tanh, torch and torch.tanh),
    "sigmoid": (F.sigmoid, torch and torch.sigmoid),
    "softmax": (F.softmax, TF and (lambda t: TF.softmax(t, dim=-1))),
    "softmax_0": (lambda t: F.softmax(t, axis=0), TF and (lambda t: TF.softmax(t, dim=0))),
    "log_softmax": (F.log_softmax, TF and (lambda t: TF.log_softmax(t, dim=-1))),
    "log_softmax_0": (lambda t: F.log_softmax(t, axis=0), TF and (lambda t: TF.log_softmax(t, dim=0))),
}


def _away_from_kinks(x):
    """relu and leaky_relu have a kink at 0: keep inputs off it."""
    return np.where(np.abs(x) < 1e-3, 0.5, x)


@pytest.mark.parametrize("name", ACTIVATIONS)
@FAST
@given(shape=SHAPES, seed=st.integers(0, 2**16))
def test_activation_gradients(device, name, shape, seed):
    x = _away_from_kinks(np.random.default_rng(seed).standard_normal(shape) * 2)
    check_grad(ACTIVATIONS[name][0], x, device=device)


@requires_torch
@pytest.mark.parametrize("name", ACTIVATIONS)
@FAST
@given(shape=SHAPES, seed=st.integers(0, 2**16))
def test_activation_matches_torch(device, name, shape, seed):
    ours, theirs = ACTIVATIONS[name]
    # Below -4 torch's exact GELU, 0.5 x (1 + erf(x / sqrt 2)), loses relative precision
    # to cancellation (ours uses erfc there), so the comparison stays inside [-4, 4].
    x = np.clip(_away_from_kinks(np.random.default_rng(seed).standard_normal(shape) * 3), -4, 4)
    compare_with_torch(ours, theirs, x, device=device)


@requires_torch
def test_relu_gradient_at_zero_is_zero_like_torch(device):
    x = np.array([-1.0, 0.0, 2.0])
    compare_with_torch(F.relu, TF.relu, x, device=device)
    compare_with_torch(F.leaky_relu, TF.leaky_relu, x, device=device)


def test_erf_against_math_erf_to_double_precision():
    x = np.concatenate([np.linspace(-30, 30, 60001), np.geomspace(1e-300, 1e-2, 300),
                        -np.geomspace(1e-300, 1e-2, 300), [0.0, 0.46875, -0.46875, 4.0, -4.0, 26.5, 27.0]])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        ours_erf, ours_erfc = erf(x), erfc(x)
    want_erf = np.array([math.erf(v) for v in x])
    want_erfc = np.array([math.erfc(v) for v in x])
    nonzero = want_erf != 0
    assert np.all(ours_erf[~nonzero] == 0)
    assert np.max(np.abs(ours_erf - want_erf)[nonzero] / np.abs(want_erf[nonzero])) < 2e-15
    normal = want_erfc > 1e-300  # below that erfc is subnormal in double precision
    assert np.max(np.abs(ours_erfc - want_erfc)[normal] / want_erfc[normal]) < 2e-15
    assert np.all(erf(np.array([np.inf, -np.inf])) == [1.0, -1.0])


def test_erf_keeps_float32(device):
    x = to_device(np.linspace(-3, 3, 7, dtype=np.float32), device)
    y = to_numpy(erf(x))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [math.erf(v) for v in np.linspace(-3, 3, 7)], rtol=1e-6, atol=1e-7)


def test_gelu_tails_keep_relative_precision():
    # Phi(-30) ~ 4.9e-198: the erfc form keeps it; 1 + erf(x) would round to 0. (erfc
    # is ill-conditioned there: rounding x / sqrt 2 alone moves it by ~1e-13.)
    y = F.gelu(dp.tensor(np.array([-30.0]))).data
    expected = -30 * 0.5 * math.erfc(30 / math.sqrt(2))
    assert abs(y[0] - expected) <= 1e-12 * abs(expected)


@pytest.mark.parametrize("function", [F.softmax, F.log_softmax])
def test_softmax_is_stable_for_huge_logits(device, function):
    x = to_device(np.array([[1e4, 0.0, -1e4], [1e38, 1e38, -1e38]], dtype=np.float32), device)
    y = to_numpy(function(dp.tensor(x)).data)
    assert np.all(np.isfinite(y))
    expected = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    if function is F.softmax:
        np.testing.assert_allclose(y, expected, atol=1e-7)
    else:
        np.testing.assert_allclose(y[0, :2], [0.0, -1e4], rtol=1e-7)


def test_sigmoid_is_stable_for_huge_inputs(device):
    x = dp.tensor(to_device(np.array([-1000.0, 0.0, 1000.0], dtype=np.float32), device), requires_grad=True)
    y = F.sigmoid(x)
    y.sum().backward()
    np.testing.assert_array_equal(to_numpy(y.data), [0.0, 0.5, 1.0])
    assert np.all(np.isfinite(to_numpy(x.grad)))


@requires_torch
def test_softmax_of_a_zero_dimensional_tensor(device):
    compare_with_torch(F.softmax, lambda t: TF.softmax(t, dim=0), np.array(1.5), device=device)
    compare_with_torch(F.log_softmax, lambda t: TF.log_softmax(t, dim=0), np.array(1.5), device=device)


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(dp.tensor(np.ones(2)), approximate="fast")


def _erf(x):
    return np.vectorize(math.erf)(x)


DEFINITIONS = {  # each activation from its formula, in float64
    "relu": lambda x: np.maximum(x, 0), "method_relu": lambda x: np.maximum(x, 0),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x), "leaky_relu_0.2": lambda x: np.where(x > 0, x, 0.2 * x),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "tanh": np.tanh, "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "softmax": lambda x: np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True),
    "softmax_0": lambda x: np.exp(x) / np.exp(x).sum(axis=0, keepdims=True),
    "log_softmax": lambda x: x - np.log(np.exp(x).sum(axis=-1, keepdims=True)),
    "log_softmax_0": lambda x: x - np.log(np.exp(x).sum(axis=0, keepdims=True)),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_is_its_definition_and_keeps_float32(device, name):
    x = np.random.default_rng(1).standard_normal((4, 5)) * 2
    x[0, :3] = [0.0, -0.0, 1e-9]
    ours = ACTIVATIONS[name][0]
    np.testing.assert_allclose(to_numpy(ours(dp.tensor(to_device(x, device))).data), DEFINITIONS[name](x),
                               rtol=1e-13, atol=1e-15)
    y32 = ours(dp.tensor(to_device(x.astype(np.float32), device)))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(to_numpy(y32.data), DEFINITIONS[name](x.astype(np.float32).astype(np.float64)),
                               rtol=2e-6, atol=2e-7)


def test_erf_and_erfc_of_extreme_inputs_raise_no_floating_point_warnings():
    """Each range's formula sees |x| clipped into its range: the ranges not chosen
    must not overflow or divide by zero for tiny, huge or infinite inputs."""
    x = np.array([0.0, -0.0, 1e-300, -1e-300, 5e-324, 1e200, -1e200, 1.7e308, -1.7e308, np.inf, -np.inf])
    with np.errstate(over="raise", divide="raise", invalid="raise", under="ignore"):
        ours_erf, ours_erfc = erf(x), erfc(x)
    np.testing.assert_allclose(ours_erf, [math.erf(v) for v in x], rtol=2e-15, atol=0)
    np.testing.assert_allclose(ours_erfc, [math.erfc(v) for v in x], rtol=2e-15, atol=0)
    assert erfc(np.linspace(-3, 3, 7, dtype=np.float32)).dtype == np.float32
