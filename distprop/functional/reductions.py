"""Reductions: sum, mean, max (numpy-style axis/keepdims)."""

from __future__ import annotations

from distprop.autograd import Function, Tensor
from distprop.backend import get_array_module


def _normalize_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted(a % ndim if ndim else 0 for a in axes))


def _expand_back(gy, axes, keepdims, shape):
    """gy reshaped so that it broadcasts against the input of the reduction."""
    if not keepdims and shape:
        gy = gy.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return gy


class Sum(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.shape = x.shape
        self.axes = _normalize_axes(self.axis, x.ndim)
        return x.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        g = _expand_back(gy, self.axes, self.keepdims, self.shape)
        return (get_array_module(gy).broadcast_to(g, self.shape),)


class Mean(Sum):
    def forward(self, x):
        self.shape = x.shape
        self.axes = _normalize_axes(self.axis, x.ndim)
        self.count = 1
        for a in self.axes:
            self.count *= x.shape[a]
        return x.mean(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        return super().backward(gy / self.count)


class Max(Function):
    """Maximum; where several entries tie for the maximum they share the gradient."""

    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.x = x
        self.axes = _normalize_axes(self.axis, x.ndim)
        self.y = x.max(axis=self.axis, keepdims=True)
        return self.y if self.keepdims else self.y.reshape(
            tuple(n for i, n in enumerate(x.shape) if i not in self.axes))

    def backward(self, gy):
        g = _expand_back(gy, self.axes, self.keepdims, self.x.shape)
        mask = self.x == self.y
        count = mask.sum(axis=self.axes, keepdims=True)
        return ((mask * (g / count)).astype(gy.dtype, copy=False),)


def sum(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - numpy's name
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims: bool = False) -> Tensor:
    return Mean(axis, keepdims)(x)


def max(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - numpy's name
    return Max(axis, keepdims)(x)
