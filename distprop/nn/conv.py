"""2-d convolution layer."""

from __future__ import annotations

import distprop.functional as F
from distprop.functional.conv import as_pair
from distprop.nn import init
from distprop.nn.module import Module
from distprop.nn.parameter import Parameter, filled_array


class Conv2d(Module):
    """2-d cross-correlation over NCHW input; weight (out_channels, in_channels/groups, kh, kw).

    `padding` is an int, a pair, 'valid' or 'same' (zero padding only).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = as_pair(kernel_size, "Conv2d: kernel_size")
        self.stride, self.dilation = as_pair(stride, "Conv2d: stride"), as_pair(dilation, "Conv2d: dilation")
        self.padding = padding if isinstance(padding, str) else as_pair(padding, "Conv2d: padding")
        self.groups = groups
        shape = (out_channels, in_channels // groups) + self.kernel_size
        self.weight = Parameter(filled_array(shape, dtype=dtype, device=device))
        if bias:
            self.bias = Parameter(filled_array((out_channels,), dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.fan_in_uniform_(self.weight, self.bias)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text
