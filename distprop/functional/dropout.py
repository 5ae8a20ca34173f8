"""Inverted dropout."""

from __future__ import annotations

from distprop import random
from distprop.autograd import Function, Tensor
from distprop.backend import device_of


class Dropout(Function):
    """Zero each element with probability p and scale the survivors by 1 / (1 - p),
    so the expected value is unchanged and evaluation needs no rescaling."""

    def __init__(self, p, generator):
        self.p, self.generator = p, generator

    def forward(self, x):
        keep = random.uniform(x.shape, dtype=x.dtype, device=device_of(x), generator=self.generator) >= self.p
        scale = 1 / (1 - self.p) if self.p < 1 else 0.0
        y = x * keep
        y *= scale
        if self.needs_input_grad[0]:
            self.keep, self.scale = keep, scale
        return y

    def backward(self, gy):
        g = gy * self.keep
        g *= self.scale
        return (g,)


def dropout(x, p: float = 0.5, training: bool = True, generator=None) -> Tensor:
    """Inverted dropout: identity when not training or p == 0. The mask is drawn from
    `generator` (a numpy Generator, default distprop.random's), so a seed fixes it."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    return Dropout(p, generator)(x)
