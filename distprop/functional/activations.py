"""Activation functions."""

from __future__ import annotations

from distprop.autograd import Function, Tensor
from distprop.backend import get_array_module


class ReLU(Function):
    def forward(self, x):
        y = get_array_module(x).maximum(x, 0)
        self.y = y
        return y

    def backward(self, gy):
        xp = get_array_module(gy)
        return (xp.where(self.y > 0, gy, 0).astype(gy.dtype, copy=False),)


class Tanh(Function):
    def forward(self, x):
        self.y = get_array_module(x).tanh(x)
        return self.y

    def backward(self, gy):
        y = self.y
        return (gy * (1 - y * y),)


class Sigmoid(Function):
    def forward(self, x):
        xp = get_array_module(x)
        # exp of -|x| never overflows, and each branch keeps full relative precision.
        e = xp.exp(-abs(x))
        self.y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        return self.y

    def backward(self, gy):
        y = self.y
        return (gy * y * (1 - y),)


def relu(x) -> Tensor:
    return ReLU()(x)


def tanh(x) -> Tensor:
    return Tanh()(x)


def sigmoid(x) -> Tensor:
    return Sigmoid()(x)
