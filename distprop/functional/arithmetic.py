"""Arithmetic: + - * / ** @ and negation, broadcasting like numpy."""

from __future__ import annotations

import numpy as np

from distprop import cpu_threads
from distprop.autograd import Function, Tensor
from distprop.backend import get_array_module
from distprop.functional.broadcast import sum_to


class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, gy):
        sa, sb = self.shapes
        return sum_to(gy, sa), sum_to(gy, sb)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, gy):
        sa, sb = self.shapes
        gb = -sum_to(gy, sb) if self.needs_input_grad[1] else None
        return sum_to(gy, sa), gb


class Mul(Function):
    def forward(self, a, b):
        need_a, need_b = self.needs_input_grad
        self.a = a if need_b else None
        self.b = b if need_a else None
        self.shapes = a.shape, b.shape
        return a * b

    def backward(self, gy):
        sa, sb = self.shapes
        ga = sum_to(gy * self.b, sa) if self.needs_input_grad[0] else None
        gb = sum_to(gy * self.a, sb) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a_shape, self.b = a.shape, b
        y = a / b
        self.y = y if self.needs_input_grad[1] else None
        return y

    def backward(self, gy):
        b = self.b
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = sum_to(gy / b, self.a_shape)
        if self.needs_input_grad[1]:
            gb = sum_to(-gy * self.y / b, b.shape)
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, gy):
        return (-gy,)


class PowScalar(Function):
    """x ** c for a constant exponent c."""

    def __init__(self, exponent):
        self.exponent = exponent

    def forward(self, x):
        self.x = x if self.needs_input_grad[0] else None
        return x ** self.exponent

    def backward(self, gy):
        c = self.exponent
        if c == 0:  # constant 1; c * x ** -1 would give nan at x = 0
            return (get_array_module(gy).zeros_like(gy),)
        return (gy * (c * self.x ** (c - 1)),)


class Pow(Function):
    """a ** b with both sides tensors, with PyTorch's conventions where the
    derivative is singular: d/da is 0 where b == 0, d/db is 0 where a == 0 (and
    nan for a < 0, where log a is not real)."""

    def forward(self, a, b):
        y = a ** b
        self.a, self.b = a, b
        self.y = y if self.needs_input_grad[1] else None
        return y

    def backward(self, gy):
        xp = get_array_module(gy)
        a, b = self.a, self.b
        ga = gb = None
        if self.needs_input_grad[0]:
            # b * a ** (b - 1), with the exponent 1 where b == 0 so that 0 ** -1 never occurs
            ga = sum_to(gy * b * a ** xp.where(b == 0, 1, b - 1), a.shape)
        if self.needs_input_grad[1]:
            log_a = xp.log(xp.where(a == 0, 1, a))
            gb = sum_to(gy * self.y * log_a, b.shape)
        return ga, gb


class MatMul(Function):
    """Batched matrix product with numpy's broadcasting and 1-d rules."""

    def forward(self, a, b):
        need_a, need_b = self.needs_input_grad
        self.a_shape, self.b_shape = a.shape, b.shape
        self.a = a if need_b else None
        self.b = b if need_a else None
        return cpu_threads.matmul(a, b)

    def backward(self, gy):
        xp = get_array_module(gy)
        a_shape, b_shape = self.a_shape, self.b_shape
        # Treat vectors as matrices (a row for a, a column for b), as matmul does.
        a2_shape = (1,) + a_shape if len(a_shape) == 1 else a_shape
        b2_shape = b_shape + (1,) if len(b_shape) == 1 else b_shape
        # Restore the axes matmul dropped: b's column axis (last), then a's row axis.
        g = gy
        if len(b_shape) == 1:
            g = g[..., None]
        if len(a_shape) == 1:
            g = g[..., None, :]
        ga = gb = None
        if self.needs_input_grad[0]:
            b2 = self.b.reshape(b2_shape)
            ga = sum_to(cpu_threads.matmul(g, xp.swapaxes(b2, -1, -2)), a2_shape).reshape(a_shape)
        if self.needs_input_grad[1]:
            a2 = self.a.reshape(a2_shape)
            gb = sum_to(cpu_threads.matmul(xp.swapaxes(a2, -1, -2), g), b2_shape).reshape(b_shape)
        return ga, gb


def add(a, b) -> Tensor:
    return Add()(a, b)


def sub(a, b) -> Tensor:
    return Sub()(a, b)


def mul(a, b) -> Tensor:
    return Mul()(a, b)


def div(a, b) -> Tensor:
    return Div()(a, b)


def neg(a) -> Tensor:
    return Neg()(a)


def pow(a, b) -> Tensor:  # noqa: A001 - PyTorch's name
    if isinstance(b, (int, float)) and isinstance(a, Tensor):
        return PowScalar(b)(a)
    return Pow()(a, b)


def matmul(a, b) -> Tensor:
    _check_matmul_shapes(getattr(a, "shape", None), getattr(b, "shape", None))
    return MatMul()(a, b)


def _check_matmul_shapes(a_shape, b_shape) -> None:
    """PyTorch's message for operands that cannot be multiplied, instead of numpy's
    gufunc signature."""
    if a_shape is None or b_shape is None:
        return  # Python numbers and the like: numpy's own error says it
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    if not a_shape or not b_shape:
        raise ValueError(f"matmul: both arguments need at least one dimension, got shapes {a_shape} and {b_shape}")
    inner_b = b_shape[-2] if len(b_shape) > 1 else b_shape[0]
    if a_shape[-1] != inner_b:
        shapes = "x".join(map(str, a_shape)) + " and " + "x".join(map(str, b_shape))
        raise ValueError(f"mat1 and mat2 shapes cannot be multiplied ({shapes}): matmul needs the first's last "
                         f"dimension ({a_shape[-1]}) to equal the second's "
                         f"{'second-to-last' if len(b_shape) > 1 else 'only'} dimension ({inner_b})")
    try:
        np.broadcast_shapes(a_shape[:-2], b_shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dimensions {a_shape[:-2]} and {b_shape[:-2]} cannot be broadcast "
                         f"together (shapes {a_shape} and {b_shape})") from None
