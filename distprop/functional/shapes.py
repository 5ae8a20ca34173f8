"""Shape ops: reshape, transpose, flatten, indexing, concatenate, stack, and moving
a tensor between devices and dtypes."""

from __future__ import annotations

from distprop.autograd import Function, Tensor
from distprop.backend import device_of, get_array_module, normalize_device, to_device


class Reshape(Function):
    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):
        return (gy.reshape(self.in_shape),)


class Transpose(Function):
    def __init__(self, axes):
        self.axes = None if axes is None else tuple(axes)

    def forward(self, x):
        return x.transpose(self.axes)

    def backward(self, gy):
        if self.axes is None:
            return (gy.transpose(),)
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a % len(self.axes)] = i
        return (gy.transpose(inverse),)


def _is_basic_index(index) -> bool:
    """True for indices made only of ints, slices, None and Ellipsis (no repeats)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice)) or p is None or p is Ellipsis for p in parts)


def _unwrap_index(index):
    if isinstance(index, tuple):
        return tuple(p.data if isinstance(p, Tensor) else p for p in index)
    return index.data if isinstance(index, Tensor) else index


class GetItem(Function):
    def __init__(self, index):
        self.index = _unwrap_index(index)

    def forward(self, x):
        self.shape, self.dtype = x.shape, x.dtype
        return x[self.index]

    def backward(self, gy):
        xp = get_array_module(gy)
        gx = xp.zeros(self.shape, self.dtype)
        if _is_basic_index(self.index):
            gx[self.index] = gy
        else:  # advanced indexing may pick an element twice: add, don't assign
            xp.add.at(gx, self.index, gy)
        return (gx,)


class Concatenate(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        self.sizes = [x.shape[self.axis] for x in xs]
        return get_array_module(*xs).concatenate(xs, axis=self.axis)

    def backward(self, gy):
        xp = get_array_module(gy)
        offsets = [0]
        for n in self.sizes:
            offsets.append(offsets[-1] + n)
        return tuple(xp.split(gy, offsets[1:-1], axis=self.axis))


class Stack(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        return get_array_module(*xs).stack(xs, axis=self.axis)

    def backward(self, gy):
        before = (slice(None),) * (self.axis % gy.ndim)
        return tuple(gy[before + (i,)] for i in range(gy.shape[self.axis]))


class To(Function):
    """Copy to another device and/or dtype; the gradient goes back the same way."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype

    def forward(self, x):
        self.in_device, self.in_dtype = device_of(x), x.dtype
        y = to_device(x, self.device) if self.device else x
        return y.astype(self.dtype, copy=False) if self.dtype is not None else y

    def backward(self, gy):
        return (to_device(gy, self.in_device).astype(self.in_dtype, copy=False),)


def reshape(x, shape) -> Tensor:
    return Reshape(shape)(x)


def transpose(x, axes=None) -> Tensor:
    return Transpose(axes)(x)


def flatten(x, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    shape = x.shape
    if not shape:  # a 0-d tensor flattens to one element, as in PyTorch
        return reshape(x, (1,))
    start, end = start_dim % len(shape), end_dim % len(shape)
    size = 1
    for n in shape[start:end + 1]:
        size *= n
    return reshape(x, shape[:start] + (size,) + shape[end + 1:])


def getitem(x, index) -> Tensor:
    return GetItem(index)(x)


def concatenate(tensors, axis: int = 0) -> Tensor:
    return Concatenate(axis)(*tensors)


def stack(tensors, axis: int = 0) -> Tensor:
    return Stack(axis)(*tensors)


def to(x: Tensor, device=None, dtype=None) -> Tensor:
    """x on `device` ('cpu'/'gpu') with `dtype`; x itself when nothing changes."""
    device = normalize_device(device)
    if (device is None or device == x.device) and (dtype is None or x.dtype == dtype):
        return x
    return To(device, dtype)(x)
