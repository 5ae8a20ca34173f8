"""Adam and AdamW, PyTorch's update rules."""

from __future__ import annotations

import math

from distprop.backend import get_array_module
from distprop.optim.optimizer import Optimizer, one_pass


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction, optional AMSGrad and L2 weight decay.

    Per parameter at step t, with g its gradient (PyTorch's rule):
        g <- g + weight_decay * p                   (Adam; AdamW decays p directly)
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2          (AMSGrad: v_max <- max(v_max, v), used below)
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    State per parameter: 'step' (int), 'exp_avg', 'exp_avg_sq' (and 'max_exp_avg_sq').
    On the CPU, where numba is installed, each large parameter's update is one
    compiled pass with the same arithmetic (see `distprop.optim.update_kernels`).
    """

    decoupled_weight_decay = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False):
        if lr < 0:
            raise ValueError(f"invalid learning rate: {lr}")
        if eps < 0:
            raise ValueError(f"invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas} (each must be in [0, 1))")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad))

    def _init_state(self, index: int, data, amsgrad: bool) -> dict:
        xp = get_array_module(data)
        state = {"step": 0, "exp_avg": xp.zeros_like(data), "exp_avg_sq": xp.zeros_like(data)}
        if amsgrad:
            state["max_exp_avg_sq"] = xp.zeros_like(data)
        self.state[index] = state
        return state

    def _update_in_one_pass(self, data, grad, state: dict, group: dict) -> bool:
        """Update `data` with the compiled kernel where it applies (see `one_pass`), with
        the scalars `step` computes, in the same order; whether it did."""
        largest = None
        if group["amsgrad"]:
            largest = state.get("max_exp_avg_sq")
            if largest is None:
                return False
        found = one_pass(data, grad, state["exp_avg"], state["exp_avg_sq"], largest)
        if found is None:
            return False
        kernels, views = found
        lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
        step, scalar = state["step"], data.dtype.type
        decoupled = self.decoupled_weight_decay
        kernels.adam_update(*views, scalar(1 - lr * weight_decay if decoupled else 1),
                             scalar(0 if decoupled else weight_decay), scalar(beta1), scalar(1 - beta1),
                             scalar(beta2), scalar(1 - beta2), scalar(math.sqrt(1 - beta2 ** step)),
                             scalar(group["eps"]), scalar(lr / (1 - beta1 ** step)))
        return True

    def step(self, closure=None):
        loss = self._evaluate(closure)
        for group, indexed in self._indexed_groups():
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            weight_decay, amsgrad = group["weight_decay"], group["amsgrad"]
            for index, param in indexed:
                grad = param.grad
                if grad is None:
                    continue
                data = param.data
                xp = get_array_module(data)
                state = self.state.get(index) or self._init_state(index, data, amsgrad)
                state["step"] += 1
                step = state["step"]
                if self._update_in_one_pass(data, grad, state, group):
                    continue
                if weight_decay != 0:
                    if self.decoupled_weight_decay:
                        data *= 1 - lr * weight_decay
                    else:
                        grad = grad + weight_decay * data  # a new array: p.grad stays as it is
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # One work array per parameter, reused for each term below.
                work = grad * (1 - beta1)
                exp_avg *= beta1
                exp_avg += work
                xp.multiply(grad, grad, out=work)
                work *= 1 - beta2
                exp_avg_sq *= beta2
                exp_avg_sq += work
                second_moment = exp_avg_sq
                if amsgrad:
                    second_moment = xp.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                step_size = lr / (1 - beta1 ** step)
                xp.sqrt(second_moment, out=work)
                work /= math.sqrt(1 - beta2 ** step)
                work += eps
                xp.divide(exp_avg, work, out=work)
                work *= step_size
                data -= work
        return loss


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019): p <- p * (1 - lr * weight_decay)
    before the Adam step, instead of adding weight_decay * p to the gradient."""

    decoupled_weight_decay = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)
