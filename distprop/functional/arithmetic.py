"""Arithmetic: + - * / ** @ and negation, broadcasting like numpy."""

from __future__ import annotations

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
        self.x = x
        return x ** self.exponent

    def backward(self, gy):
        c = self.exponent
        return (gy * (c * self.x ** (c - 1)),)


class Pow(Function):
    """a ** b with both sides tensors (d/db uses log a, defined for a > 0)."""

    def forward(self, a, b):
        y = a ** b
        self.a, self.b, self.y = a, b, y
        return y

    def backward(self, gy):
        xp = get_array_module(gy)
        a, b, y = self.a, self.b, self.y
        ga = sum_to(gy * b * a ** (b - 1), a.shape) if self.needs_input_grad[0] else None
        gb = None
        if self.needs_input_grad[1]:
            log_a = xp.where(a > 0, xp.log(xp.where(a > 0, a, 1)), 0)
            gb = sum_to(gy * y * log_a, b.shape)
        return ga, gb


class MatMul(Function):
    """Batched matrix product with numpy's broadcasting and 1-d rules."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        xp = get_array_module(gy)
        a, b = self.a, self.b
        # Treat vectors as matrices (a row for a, a column for b), as matmul does.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        g = gy
        if a.ndim == 1:
            g = xp.expand_dims(g, -2)
        if b.ndim == 1:
            g = xp.expand_dims(g, -1)
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = g @ xp.swapaxes(b2, -1, -2)
            ga = sum_to(ga, a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:
            gb = xp.swapaxes(a2, -1, -2) @ g
            gb = sum_to(gb, b2.shape).reshape(b.shape)
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
    return MatMul()(a, b)
