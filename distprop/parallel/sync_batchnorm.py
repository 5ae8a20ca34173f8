"""Batch norm whose batch statistics are those of the global batch over all ranks.

In training, each rank computes per-channel (sum, sum of squares, count) of its
slice, one allreduce makes them global, and every rank normalises with the global
mean and variance; backward allreduces the two per-channel sums the input gradient
needs. N ranks on slices therefore compute what one process computes on the whole
batch. Weight and bias gradients stay local: the data-parallel reducer averages
them like any other gradient. In eval mode it is an ordinary batch norm.
"""

from __future__ import annotations

from distprop.backend import get_array_module
from distprop.functional.normalization import (batch_norm_moments, batch_norm_stats, batch_norm_train,
                                               update_running_stats)
from distprop.nn.module import Module
from distprop.nn.normalization import _BatchNorm
from distprop.parallel import runtime


class SyncBatchNorm(_BatchNorm):
    """Batch norm over (N, C, ...) input with statistics synchronised across ranks."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, comm=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.comm = comm  # None: the job's communicator

    def _check_input_dim(self, x) -> None:
        if x.ndim < 2:
            raise ValueError(f"SyncBatchNorm expects input of shape (N, C, ...), got {tuple(x.shape)}")

    def forward(self, x):
        comm = self.comm if self.comm is not None else runtime.current()
        if not self.training or comm.size == 1:
            return super().forward(x)
        self._check_input_dim(x)
        xp = get_array_module(x.data)
        total, squares, count = batch_norm_stats(x)
        packed = xp.concatenate([total, squares, xp.asarray([float(count)])])
        comm.allreduce_(packed, "sum")  # one collective for both sums and the count
        channels = total.shape[0]
        total, squares, count = packed[:channels], packed[channels:2 * channels], int(packed[-1])
        if count < 2:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel over all ranks, got {count}")
        mean, var = batch_norm_moments(total, squares, count)

        def reduce_sums(sums):
            sums = xp.ascontiguousarray(sums)
            return comm.allreduce_(sums, "sum")

        y, _ = batch_norm_train(x, self.weight, self.bias, self.eps, stats=(mean, var, count),
                                reduce_sums=reduce_sums)
        if self.track_running_stats:
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            update_running_stats(self.running_mean, self.running_var, mean, var, count, momentum)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: Module, comm=None) -> Module:
        """`module` with every BatchNorm1d/BatchNorm2d replaced by a SyncBatchNorm that
        holds the same parameters and buffers (the module itself if it is one)."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            sync = cls(module.num_features, module.eps, module.momentum, module.affine,
                       module.track_running_stats, comm=comm)
            for name, param in module._parameters.items():
                setattr(sync, name, param)
            for name, buffer in module._buffers.items():
                sync._buffers[name] = buffer
            sync.train(module.training)
            return sync
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = cls.convert_sync_batchnorm(child, comm)
        return module
