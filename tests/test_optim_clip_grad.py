"""clip_grad_norm_ against the norm computed by hand and against torch.nn.utils.clip_grad_norm_."""

import math

import numpy as np
import pytest

import distprop as dp
from distprop import nn, optim
from helpers import assert_close, requires_torch, torch


def _grads(scale, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) * scale for s in [(5, 4), (4,), (3, 3, 2)]]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("scale", [0.01, 10.0])  # below and above the threshold
def test_clips_by_the_norm_of_all_gradients_together(norm_type, scale):
    grads = _grads(scale)
    params = [nn.Parameter(np.zeros(g.shape)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    flat = np.concatenate([g.ravel() for g in grads])
    expected = np.abs(flat).max() if math.isinf(norm_type) else np.sum(np.abs(flat) ** norm_type) ** (1 / norm_type)
    total = optim.clip_grad_norm_(params, max_norm=1.5, norm_type=norm_type)
    assert isinstance(total, np.ndarray) and total.shape == ()
    assert_close(total, expected, rtol=1e-12, what="total norm")
    factor = min(1.0, 1.5 / (expected + 1e-6))
    for index, (p, g) in enumerate(zip(params, grads)):
        assert_close(p.grad, g * factor, rtol=1e-12, what=f"clipped gradient {index}")


def test_float32_gradients_stay_float32_and_a_norm_of_inf_is_reported():
    p = nn.Parameter(np.zeros(3, np.float32))
    p.grad = np.array([30.0, 40.0, 0.0], np.float32)
    total = optim.clip_grad_norm_(p, max_norm=5.0, norm_type="2")  # a single tensor, the order as a string
    assert float(total) == 50.0 and p.grad.dtype == np.float32
    np.testing.assert_allclose(p.grad, [3.0, 4.0, 0.0], rtol=1e-6)
    p.grad = np.array([np.inf, 1.0, 0.0], np.float32)
    with np.errstate(invalid="ignore"):  # inf * 0: the gradients become nan, as in PyTorch
        assert math.isinf(float(optim.clip_grad_norm_([p], 1.0)))  # reported, not raised, by default
    p.grad = np.array([np.inf, 1.0, 0.0], np.float32)
    with pytest.raises(RuntimeError, match=r"^the total norm of order 2.0 of the gradients is inf: cannot clip "
                                           r"\(pass error_if_nonfinite=False to clip anyway\)$"):
        optim.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)


@requires_torch
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("scale", [0.01, 10.0])  # below and above the threshold
def test_matches_pytorch(norm_type, scale):
    grads = _grads(scale)
    ours = [nn.Parameter(np.zeros(g.shape)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64)) for g in grads]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.copy(), torch.tensor(g)
    total = optim.clip_grad_norm_(ours, max_norm=1.5, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.5, norm_type=norm_type)
    assert_close(np.asarray(total), expected.numpy(), what="total norm")
    for index, (p, q) in enumerate(zip(ours, theirs)):
        assert_close(p.grad, q.grad.numpy(), what=f"clipped gradient {index}")


def test_both_names_and_edge_cases(device):
    assert optim.clip_grad_norm_ is nn.utils.clip_grad_norm_
    p = nn.Parameter(dp.backend.to_device(np.zeros(2), device))
    q = nn.Parameter(dp.backend.to_device(np.zeros(2), device))
    p.grad = dp.backend.to_device(np.array([3.0, 4.0]), device)
    total = nn.utils.clip_grad_norm_([p, q], 1.0)  # q has no gradient: skipped
    assert float(total) == 5.0 and dp.backend.device_of(total) == device
    np.testing.assert_allclose(dp.backend.to_numpy(p.grad), [0.6, 0.8], rtol=1e-6)
    assert float(nn.utils.clip_grad_norm_(q, 1.0)) == 0.0  # a single tensor, no gradients at all
    p.grad[0] = np.nan
    with pytest.raises(RuntimeError, match="nan"):
        nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
