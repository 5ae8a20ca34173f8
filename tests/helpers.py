"""Shared checks: gradients against central differences, and ops against PyTorch."""

from __future__ import annotations

import numpy as np

import distprop as dp
from distprop.backend import to_device, to_numpy

try:
    import torch
except ImportError:  # the PyTorch comparisons skip, and the run fails saying what to install
    torch = None

INSTALL_TORCH = "PyTorch is not installed: pip install 'torch>=2.1,<=2.13.0' (CPU build; the test extra has it)"
INSTALL_SKLEARN = "scikit-learn is not installed: pip install scikit-learn (the test extra has it)"


def requires_torch(test):
    import pytest

    return pytest.mark.skipif(torch is None, reason=INSTALL_TORCH)(test)


def leaves(arrays, device="cpu", requires_grad=True):
    return [dp.tensor(to_device(np.array(a, dtype=np.float64), device), requires_grad=requires_grad)
            for a in arrays]


def check_grad(f, *arrays, device="cpu", eps=1e-6, rtol=1e-6, atol=1e-8, seed=0):
    """Compare the gradients of f (Tensors -> Tensor) with central differences.

    For each input, the analytic directional derivative <grad_i(u . f), v_i> along a
    random direction v_i is compared with (u . f(x + eps v_i) - u . f(x - eps v_i)) / 2eps,
    u a random cotangent: cheap for big arrays, and it localises a wrong input. The
    tolerance also allows for the rounding error of the two projections, which the
    division by 2 eps magnifies.
    """
    rng = np.random.default_rng(seed)
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    inputs = leaves(arrays, device)
    out = f(*inputs)
    u = rng.standard_normal(out.shape)
    out.backward(to_device(u, device))

    def projected(values):
        with dp.no_grad():
            y = to_numpy(f(*[dp.tensor(to_device(v, device)) for v in values]).data)
        return float(np.sum(y * u)), float(np.sum(np.abs(y * u)))

    for i, (a, t) in enumerate(zip(arrays, inputs)):
        v = rng.standard_normal(a.shape)
        analytic = float(np.sum(to_numpy(t.grad) * v)) if t.grad is not None else 0.0
        plus, plus_size = projected([x + eps * v if j == i else x for j, x in enumerate(arrays)])
        minus, minus_size = projected([x - eps * v if j == i else x for j, x in enumerate(arrays)])
        numeric = (plus - minus) / (2 * eps)
        rounding = 64 * np.finfo(np.float64).eps * (plus_size + minus_size) / (2 * eps)
        assert abs(analytic - numeric) <= atol + rtol * abs(numeric) + rounding, (
            f"input {i}: analytic {analytic!r} vs numeric {numeric!r}")


def assert_close(actual, expected, rtol=1e-8, atol=0.0, what="value"):
    actual = to_numpy(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    scale = max(np.abs(expected).max(initial=0.0), 1e-300)
    error = np.abs(actual - expected).max(initial=0.0)
    assert error <= atol + rtol * scale, f"{what}: max error {error:.3g} relative to scale {scale:.3g}"


def compare_with_torch(f_dp, f_torch, *arrays, device="cpu", rtol=1e-8, atol=0.0, seed=0):
    """Run the same expression in distprop and PyTorch (float64, identical inputs)
    and compare outputs and the gradients of every input."""
    rng = np.random.default_rng(seed)
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    ours = leaves(arrays, device)
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    y = f_dp(*ours)
    y_ref = f_torch(*theirs)
    assert_close(y.data, y_ref.detach().numpy(), rtol, atol, "output")
    u = rng.standard_normal(tuple(y_ref.shape))
    y.backward(to_device(u, device))
    y_ref.backward(torch.tensor(u))
    for i, (t, r) in enumerate(zip(ours, theirs)):
        if r.grad is None:
            assert t.grad is None or not np.any(to_numpy(t.grad)), f"input {i}: gradient where torch has none"
            continue
        assert_close(t.grad, r.grad.numpy(), rtol, atol, f"gradient of input {i}")
