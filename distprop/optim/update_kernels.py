"""Compiled (numba) kernels of `distprop.optim`: one parameter's whole SGD or Adam
update in one pass over its memory.

numpy spells an update as several whole-array passes (SGD with momentum: scale the
buffer, add the gradient, scale by the learning rate into a temporary, subtract;
Adam about a dozen), each streaming the parameter-sized arrays through memory
again: for the few MB of an MLP's weights, the largest part of the step's time
outside the matrix products. Each kernel does the same operations in the same
order and precision (scalars in the parameter's dtype, no fused multiply-add), so
its results are bit for bit those of the numpy path, which the tests hold.
Imported only where numba is installed; compiled code is cached on disk beside
this file or in numba's cache directory.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")
def sgd_update(param, grad, buffer, lr, momentum, damped, weight_decay, nesterov, first):
    """Update 1-D `param` in place from `grad` (left as it is) and, where momentum is used
    (`buffer` non-empty), the momentum `buffer`: set to the gradient on the `first`
    step, else ``buffer * momentum + damped * gradient`` (`damped` = 1 - dampening,
    not multiplied when 1, as numpy's path). Scalars come in the arrays' dtype."""
    use_momentum = buffer.size != 0
    for i in range(param.size):
        g = grad[i]
        if weight_decay != 0:
            g = g + weight_decay * param[i]
        if use_momentum:
            if first:
                b = g
            elif damped == 1:
                b = buffer[i] * momentum + g
            else:
                b = buffer[i] * momentum + damped * g
            buffer[i] = b
            g = g + momentum * b if nesterov else b
        param[i] = param[i] - lr * g


@njit(cache=True, nogil=True, error_model="numpy")
def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, decay, weight_decay, beta1, one_minus_beta1,
                beta2, one_minus_beta2, bias_correction2_sqrt, eps, step_size):
    """Update 1-D `param` and its moments in place from `grad` (left as it is). `decay`:
    AdamW's factor 1 - lr * weight_decay (1: none); `weight_decay`: Adam's L2 term (0:
    none); `max_exp_avg_sq` non-empty for AMSGrad. Scalars come in the arrays' dtype."""
    amsgrad = max_exp_avg_sq.size != 0
    for i in range(param.size):
        p = param[i]
        if decay != 1:
            p = p * decay
        g = grad[i]
        if weight_decay != 0:
            g = g + weight_decay * p
        m = exp_avg[i] * beta1 + g * one_minus_beta1
        v = exp_avg_sq[i] * beta2 + (g * g) * one_minus_beta2
        exp_avg[i] = m
        exp_avg_sq[i] = v
        if amsgrad:
            largest = max_exp_avg_sq[i]
            if v > largest or v != v:  # np.maximum's rule: a NaN wins
                largest = v
            max_exp_avg_sq[i] = largest
            v = largest
        denominator = np.sqrt(v) / bias_correction2_sqrt + eps
        param[i] = p - (m / denominator) * step_size
