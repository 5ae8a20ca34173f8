"""clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""

import math

import numpy as np
import pytest

import distprop as dp
from distprop import nn, optim
from helpers import assert_close, requires_torch, torch


def _grads(scale, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) * scale for s in [(5, 4), (4,), (3, 3, 2)]]


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
