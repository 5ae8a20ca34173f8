"""Activation functions, softmax and log-softmax."""

from __future__ import annotations

import math

from distprop.autograd import Function, Tensor
from distprop.backend import get_array_module
from distprop.functional.special import erfc


class ReLU(Function):
    def forward(self, x):
        y = get_array_module(x).maximum(x, 0)
        self.y = y if self.needs_input_grad[0] else None
        return y

    def backward(self, gy):
        # Multiplying by the mask is several times faster than where() in numpy.
        return (gy * (self.y > 0),)


class LeakyReLU(Function):
    def __init__(self, negative_slope):
        self.negative_slope = negative_slope

    def forward(self, x):
        xp = get_array_module(x)
        positive = x > 0
        self.positive = positive if self.needs_input_grad[0] else None
        return xp.where(positive, x, x * self.negative_slope)

    def backward(self, gy):
        xp = get_array_module(gy)
        return (xp.where(self.positive, gy, gy * self.negative_slope),)


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


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_CUBIC = 0.044715


class GELU(Function):
    """x * Phi(x), Phi the standard normal CDF; with approximate='tanh', PyTorch's
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    def __init__(self, approximate):
        self.approximate = approximate

    def forward(self, x):
        xp = get_array_module(x)
        self.x = x if self.needs_input_grad[0] else None
        if self.approximate == "tanh":
            inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
            return 0.5 * x * (1 + xp.tanh(inner))
        # Phi(x) = erfc(-x / sqrt 2) / 2 keeps its relative precision for very negative x.
        return x * (0.5 * erfc(x * -_SQRT_HALF))

    def backward(self, gy):
        xp = get_array_module(gy)
        x = self.x
        if self.approximate == "tanh":
            t = xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
            d_inner = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x)
            return (gy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * d_inner),)
        cdf = 0.5 * erfc(x * -_SQRT_HALF)
        pdf = _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
        return (gy * (cdf + x * pdf),)


def _shifted(xp, x, axis):
    """x minus its maximum along axis (the shift that makes exp safe); an all -inf
    slice is shifted by 0 so that it stays -inf instead of becoming nan."""
    peak = x.max(axis=axis, keepdims=True)
    return x - xp.where(xp.isfinite(peak), peak, 0)


class Softmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        y = xp.exp(_shifted(xp, x, self.axis))
        y /= y.sum(axis=self.axis, keepdims=True)
        self.y = y if self.needs_input_grad[0] else None
        return y

    def backward(self, gy):
        y = self.y
        # dx = y * (gy - <gy, y>) along the axis: the Jacobian never materialises.
        return (y * (gy - (gy * y).sum(axis=self.axis, keepdims=True)),)


class LogSoftmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        shifted = _shifted(xp, x, self.axis)
        shifted -= xp.log(xp.exp(shifted).sum(axis=self.axis, keepdims=True))
        self.y = shifted if self.needs_input_grad[0] else None
        return shifted

    def backward(self, gy):
        xp = get_array_module(gy)
        # dx = gy - softmax * sum(gy) along the axis; softmax = exp(log_softmax).
        return (gy - xp.exp(self.y) * gy.sum(axis=self.axis, keepdims=True),)


def _along(function_class, x, axis) -> Tensor:
    """Apply a softmax-like op along axis; a 0-d input is treated as one element."""
    if x.ndim == 0:
        return function_class(-1)(x.reshape(1)).reshape(())
    return function_class(axis)(x)


def relu(x) -> Tensor:
    return ReLU()(x)


def leaky_relu(x, negative_slope: float = 0.01) -> Tensor:
    return LeakyReLU(negative_slope)(x)


def gelu(x, approximate: str = "none") -> Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELU(approximate)(x)


def tanh(x) -> Tensor:
    return Tanh()(x)


def sigmoid(x) -> Tensor:
    return Sigmoid()(x)


def softmax(x, axis: int = -1) -> Tensor:
    return _along(Softmax, x, axis)


def log_softmax(x, axis: int = -1) -> Tensor:
    return _along(LogSoftmax, x, axis)
