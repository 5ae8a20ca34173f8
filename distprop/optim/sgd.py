"""Stochastic gradient descent with momentum, PyTorch's update rule."""

from __future__ import annotations

import numpy as np

from distprop.optim.optimizer import Optimizer, one_pass


class SGD(Optimizer):
    """SGD with optional momentum (heavy ball or Nesterov), dampening and L2 weight decay.

    Per parameter, with g its gradient (PyTorch's rule, so trajectories agree):
        g <- g + weight_decay * p
        b <- g on the first step, else momentum * b + (1 - dampening) * g
        g <- g + momentum * b  (nesterov)  or  b  (otherwise)
        p <- p - lr * g
    `p.grad` itself is never modified. On the CPU, where numba is installed, each
    large parameter's update is one compiled pass with the same arithmetic (see
    `distprop.optim.update_kernels`).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if lr < 0:
            raise ValueError(f"invalid learning rate: {lr}")
        if momentum < 0:
            raise ValueError(f"invalid momentum: {momentum}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def step(self, closure=None):
        loss = self._evaluate(closure)
        for group, indexed in self._indexed_groups():
            lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
            weight_decay, nesterov = group["weight_decay"], group["nesterov"]
            for index, param in indexed:
                grad = param.grad
                if grad is None:
                    continue
                state = self.state.setdefault(index, {}) if momentum != 0 else None
                if _update_in_one_pass(param.data, grad, state, group):
                    continue
                if weight_decay != 0:
                    grad = grad + weight_decay * param.data  # a new array: p.grad stays as it is
                if momentum != 0:
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = grad.copy()
                    else:
                        buffer *= momentum
                        buffer += grad if dampening == 0 else (1 - dampening) * grad
                    grad = grad + momentum * buffer if nesterov else buffer
                param.data -= lr * grad
        return loss


def _update_in_one_pass(data, grad, state: dict | None, group: dict) -> bool:
    """Update `data` with the compiled kernel where it applies (see `one_pass`); whether it did."""
    buffer = None if state is None else state.get("momentum_buffer")
    found = one_pass(data, grad, buffer)
    if found is None:
        return False
    kernels, (data_view, grad_view, buffer_view) = found
    first = state is not None and buffer is None
    if first:
        state["momentum_buffer"] = np.empty_like(data)
        buffer_view = state["momentum_buffer"].reshape(-1)
    scalar = data.dtype.type
    kernels.sgd_update(data_view, grad_view, buffer_view, scalar(group["lr"]), scalar(group["momentum"]),
                       scalar(1 - group["dampening"]), scalar(group["weight_decay"]), group["nesterov"], first)
    return True
