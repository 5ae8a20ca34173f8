"""Gradient utilities: clipping by global norm (torch.nn.utils.clip_grad_norm_)."""

from __future__ import annotations

import math

import numpy as np

from distprop.autograd import Tensor
from distprop.backend import get_array_module


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False):
    """Scale all gradients together so that their joint `norm_type`-norm is at most `max_norm`.

    The total norm is the norm of the per-parameter norms (PyTorch's definition);
    every gradient is multiplied by min(1, max_norm / (total + 1e-6)). Returns the
    total norm before clipping as a 0-d array on the gradients' device (no
    device-to-host sync; `float()` it to log it). Parameters without a gradient are
    skipped; with none at all the result is 0.
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        return np.asarray(0.0)
    xp = get_array_module(grads[0])
    if math.isinf(norm_type):
        norms = [xp.abs(g).max() for g in grads]
    else:
        norms = [xp.linalg.norm(g.reshape(-1), ord=norm_type) for g in grads]
    total = xp.asarray(xp.linalg.norm(xp.stack(norms), ord=norm_type))  # 0-d, on numpy too
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is {float(total)}: "
                           "cannot clip (pass error_if_nonfinite=False to clip anyway)")
    scale = xp.minimum(max_norm / (total + 1e-6), 1.0)
    for g in grads:
        g *= scale.astype(g.dtype, copy=False)
    return total
