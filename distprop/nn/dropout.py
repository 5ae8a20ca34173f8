"""Dropout layer."""

from __future__ import annotations

import distprop.functional as F
from distprop.nn.module import Module


class Dropout(Module):
    """In training, zero each element with probability p and scale the rest by 1/(1-p);
    the identity in eval mode. Draws come from `distprop.random`'s default generator."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
