"""Fully connected layers."""

from __future__ import annotations

import distprop.functional as F
from distprop.nn import init
from distprop.nn.module import Module
from distprop.nn.parameter import Parameter, filled_array


class Identity(Module):
    """Returns its input; a placeholder where an architecture has an optional layer."""

    def forward(self, x):
        return x


class Linear(Module):
    """y = x @ weight.T + bias, with weight of shape (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(filled_array((out_features, in_features), dtype=dtype, device=device))
        if bias:
            self.bias = Parameter(filled_array((out_features,), dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.fan_in_uniform_(self.weight, self.bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
