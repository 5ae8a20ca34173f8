"""Elementwise math: exp, log, sqrt, abs, clamp."""

from __future__ import annotations

from distprop.autograd import Function, Tensor
from distprop.backend import get_array_module


class Exp(Function):
    def forward(self, x):
        self.y = get_array_module(x).exp(x)
        return self.y

    def backward(self, gy):
        return (gy * self.y,)


class Log(Function):
    def forward(self, x):
        self.x = x
        return get_array_module(x).log(x)

    def backward(self, gy):
        return (gy / self.x,)


class Sqrt(Function):
    def forward(self, x):
        self.y = get_array_module(x).sqrt(x)
        return self.y

    def backward(self, gy):
        return (gy / (2 * self.y),)


class Abs(Function):
    def forward(self, x):
        self.x = x
        return get_array_module(x).abs(x)  # not abs(): this module's abs is the op itself

    def backward(self, gy):
        return (gy * get_array_module(gy).sign(self.x),)


class Clamp(Function):
    def __init__(self, low, high):
        self.low, self.high = low, high

    def forward(self, x):
        self.x = x
        return get_array_module(x).clip(x, self.low, self.high)

    def backward(self, gy):
        inside = True
        if self.low is not None:
            inside = inside & (self.x >= self.low)
        if self.high is not None:
            inside = inside & (self.x <= self.high)
        return (gy * inside,)


def exp(x) -> Tensor:
    return Exp()(x)


def log(x) -> Tensor:
    return Log()(x)


def sqrt(x) -> Tensor:
    return Sqrt()(x)


def abs(x) -> Tensor:  # noqa: A001 - PyTorch's name
    return Abs()(x)


def clamp(x, min=None, max=None) -> Tensor:  # noqa: A002 - PyTorch's argument names
    return Clamp(min, max)(x)
