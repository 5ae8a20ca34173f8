"""Gradients that do not depend on the number of ranks, bit for bit.

The global batch is cut into a fixed number M of equal micro-shards; rank r holds
micro-shards r*M/size ... (r+1)*M/size - 1 (its contiguous slice of the batch).
Each micro-shard gets a forward and backward pass of its own, its gradient is kept
separately, every rank gathers all M micro-shard gradients, and every rank adds
them up in the same fixed order 0, 1, ..., M-1. The arithmetic is then the same
whatever the number of ranks, so the averaged gradient is too -- provided each
process runs the same code with the same BLAS thread count (a GEMM may add in a
different order with more threads).

The cost, against the ordinary reducer: M small forward/backward passes instead of
one (less efficient GEMMs), memory for M/size + M flat gradient copies per rank,
and an allgather of M gradients instead of an allreduce of one (M/2 times the bytes
on the wire for 2 ranks). It is a mode for verification and debugging, not speed.
"""

from __future__ import annotations

import numpy as np

from distprop.backend import get_array_module


class MicroShardReducer:
    def __init__(self, named_params, comm, micro_shards: int):
        if micro_shards < 1 or micro_shards % comm.size:
            raise ValueError(f"reproducible mode needs micro_shards divisible by the number of ranks "
                             f"({comm.size}), got {micro_shards}")
        self.params = [p for _, p in named_params if p.requires_grad]
        self.comm = comm
        self.micro_shards = micro_shards
        self.per_rank = micro_shards // comm.size
        self.sizes = [p.data.size for p in self.params]
        self.steps = 0

    def backward(self, module, loss_fn, batch) -> float:
        """Set every parameter's .grad to the mean over all M micro-shards; return the
        mean loss. `batch`: arrays (or Tensors) whose first axis is this rank's slice."""
        length = self._local_length(batch)
        shard = length // self.per_rank
        xp = get_array_module(self.params[0].data) if self.params else np
        dtype = self.params[0].data.dtype if self.params else np.float64
        local = xp.zeros((self.per_rank, sum(self.sizes)), dtype)
        losses = xp.zeros(self.per_rank, np.float64)
        for k in range(self.per_rank):
            for p in self.params:
                p.grad = None
            piece = [a[k * shard:(k + 1) * shard] for a in batch]
            loss = loss_fn(module, *piece)
            loss.backward()
            losses[k] = loss.data
            self._flatten_into(local[k])
        gathered = self.comm.allgather(local).reshape(self.micro_shards, -1)
        gathered_losses = self.comm.allgather(losses).reshape(-1)
        total = gathered[0].copy()
        loss_total = gathered_losses[0].copy()
        for k in range(1, self.micro_shards):  # the one fixed order
            total += gathered[k]
            loss_total += gathered_losses[k]
        total /= total.dtype.type(self.micro_shards)
        self._unflatten_from(total)
        self.steps += 1
        return float(loss_total / self.micro_shards)

    def _local_length(self, batch) -> int:
        lengths = sorted({len(a) for a in batch})
        length = lengths[0] if len(lengths) == 1 else -1  # -1: this rank's arrays disagree
        # Every rank must hold the same number of whole micro-shards: agreed by all ranks
        # (so that no rank raises while the others wait in the allgather).
        extremes = self.comm.allreduce(np.array([length, -length], np.int64), "max")
        if extremes[0] != -extremes[1] or length < self.per_rank or length % self.per_rank:
            raise ValueError(f"reproducible mode: every rank needs the same local batch, a non-zero multiple "
                             f"of {self.per_rank} micro-shards; local batches range from {-extremes[1]} to "
                             f"{extremes[0]} rows (-1: arrays of different lengths; rank {self.comm.rank} "
                             f"has {lengths})")
        return length

    def _flatten_into(self, row) -> None:
        offset = 0
        for p, n in zip(self.params, self.sizes):
            if p.grad is not None:
                row[offset:offset + n] = p.grad.reshape(-1)
            offset += n

    def _unflatten_from(self, flat) -> None:
        offset = 0
        for p, n in zip(self.params, self.sizes):
            p.grad = flat[offset:offset + n].reshape(p.data.shape).copy()
            offset += n
