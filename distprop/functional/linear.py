"""The fused affine map of a fully connected layer."""

from __future__ import annotations

import math

from distprop.autograd import Function, Tensor
from distprop.cpu_threads import matmul


class Linear(Function):
    """y = x @ weight.T + bias, weight of shape (out, in) as in PyTorch.

    One GEMM forward; backward computes only the gradients that are needed (the
    first layer's input needs none) with one GEMM each, and the bias gradient as a
    column sum. Inputs with more than two dimensions are treated as a batch of rows.
    """

    def forward(self, x, weight, bias=None):
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        self.x = x if need_w else None
        self.weight = weight if need_x else None
        y = matmul(x, weight.T)
        if bias is not None:
            y += bias
        return y

    def backward(self, gy):
        needs = self.needs_input_grad
        gx = gw = gb = None
        if needs[0]:
            gx = matmul(gy, self.weight)
        if needs[1] or (len(needs) > 2 and needs[2]):
            gy2 = gy.reshape(-1, gy.shape[-1])
            if needs[1]:  # straight into the weight's gradient buffer where it has one
                out = getattr(self, "grad_out", {}).get(1)
                gw = matmul(gy2.T, self.x.reshape(-1, self.x.shape[-1]), out=out)
            if len(needs) > 2 and needs[2]:
                gb = gy2.sum(axis=0)
        return (gx, gw, gb) if len(needs) > 2 else (gx, gw)


def linear(x, weight, bias=None) -> Tensor:
    in_features = weight.shape[-1]
    if x.shape[-1:] != (in_features,):
        # PyTorch's words, plus which argument is which.
        rows = math.prod(x.shape[:-1])
        raise ValueError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{_last(x.shape)} and "
                         f"{in_features}x{weight.shape[0]}): linear got input of shape {tuple(x.shape)} "
                         f"but its weight of shape {tuple(weight.shape)} takes {in_features} features")
    if bias is None:
        return Linear()(x, weight)
    return Linear()(x, weight, bias)


def _last(shape) -> str:
    return str(shape[-1]) if shape else "0-d"
