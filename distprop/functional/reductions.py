"""Reductions: sum, mean, max (numpy-style axis/keepdims)."""

from __future__ import annotations

from distprop.autograd import Function, Tensor
from distprop.backend import get_array_module


def _normalize_axes(axis, ndim):
    """axis (None, an int or a sequence) as a sorted tuple of non-negative axes. A 0-d
    array accepts axis 0 or -1, as in PyTorch, and reduces over nothing."""
    if axis is None:
        return tuple(range(ndim))
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    bound = ndim or 1
    for a in axes:
        if not -bound <= a < bound:
            raise ValueError(f"axis {a} is out of range for a tensor of {ndim} dimensions")
    return tuple(sorted(a % bound for a in axes)) if ndim else ()


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
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        g = _expand_back(gy, self.axes, self.keepdims, self.shape)
        return (get_array_module(gy).broadcast_to(g, self.shape),)


class Mean(Sum):
    def forward(self, x):
        y = super().forward(x)
        self.count = 1
        for a in self.axes:
            self.count *= x.shape[a]
        return y / self.count

    def backward(self, gy):
        return super().backward(gy / self.count)


class Max(Function):
    """Maximum; where several entries tie for the maximum they share the gradient
    equally (PyTorch's rule for max() and amax())."""

    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axes = _normalize_axes(self.axis, x.ndim)
        if x.size == 0:
            raise ValueError("max of an empty tensor")
        y = x.max(axis=self.axes, keepdims=True)
        if self.needs_input_grad[0]:
            self.x, self.y = x, y
        return y if self.keepdims else y.reshape(tuple(n for i, n in enumerate(x.shape) if i not in self.axes))

    def backward(self, gy):
        g = _expand_back(gy, self.axes, self.keepdims, self.x.shape)
        mask = self.x == self.y
        # The count in gy's dtype: an integer count would make g / count float64.
        count = mask.sum(axis=self.axes, keepdims=True, dtype=gy.dtype)
        return (mask * (g / count),)


def sum(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - numpy's name
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims: bool = False) -> Tensor:
    return Mean(axis, keepdims)(x)


def max(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - numpy's name
    return Max(axis, keepdims)(x)
