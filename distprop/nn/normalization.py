"""Normalisation layers: batch norm (1-d and 2-d) and layer norm."""

from __future__ import annotations

import numpy as np

import distprop.functional as F
from distprop.backend import to_device
from distprop.nn.module import Module
from distprop.nn.parameter import Parameter, filled_array


class _BatchNorm(Module):
    """Batch normalisation over every axis but the channel axis 1 (Ioffe & Szegedy, 2015).

    In training it normalises with the batch's statistics and updates the buffers
    `running_mean`, `running_var` (unbiased) and `num_batches_tracked`; in eval it
    uses the running statistics. `momentum=None` makes the running statistics a
    cumulative average. Buffer names match PyTorch's state_dict keys.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = Parameter(filled_array((num_features,), 1.0, dtype, device))
            self.bias = Parameter(filled_array((num_features,), 0.0, dtype, device))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", filled_array((num_features,), 0.0, dtype, device))
            self.register_buffer("running_var", filled_array((num_features,), 1.0, dtype, device))
            self.register_buffer("num_batches_tracked", to_device(np.zeros((), np.int64), device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def _check_input_dim(self, x) -> None:
        raise NotImplementedError

    def forward(self, x):
        self._check_input_dim(x)
        momentum = self.momentum if self.momentum is not None else 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1  # in place: the buffer array stays the same
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        # Without running statistics there is nothing else to normalise with, even in eval.
        use_batch_statistics = self.training or self.running_mean is None
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            use_batch_statistics, momentum, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input."""

    def _check_input_dim(self, x) -> None:
        if x.ndim not in (2, 3):
            raise ValueError(f"BatchNorm1d expects 2-d or 3-d input (N, C[, L]), got shape {tuple(x.shape)}")


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input."""

    def _check_input_dim(self, x) -> None:
        if x.ndim != 4:
            raise ValueError(f"BatchNorm2d expects 4-d input (N, C, H, W), got shape {tuple(x.shape)}")


class LayerNorm(Module):
    """Normalise over the trailing `normalized_shape` dimensions (Ba et al., 2016), then
    scale and shift elementwise."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(filled_array(self.normalized_shape, 1.0, dtype, device))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = Parameter(filled_array(self.normalized_shape, 0.0, dtype, device))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
