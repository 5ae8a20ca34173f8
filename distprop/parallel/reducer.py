"""The gradient reducer: buckets, overlap with backward, and the average over ranks.

Parameters are grouped into buckets in reverse registration order (roughly the
order in which backward finishes their gradients), with the same assignment on
every rank. A post-accumulate hook on each parameter marks its gradient ready; as
soon as every gradient of a bucket is ready -- and every earlier bucket has been
started, so that all ranks start buckets in the same order -- the bucket's
allreduce starts on a transport and runs while backward continues. When the
backward walk ends, gradients that no op produced are reduced as zeros, every
bucket is waited for, and each `.grad` holds the mean over ranks.

Small gradients are packed into one contiguous buffer per bucket (their `.grad`
then stays a view into it, so later passes accumulate in place and need no copy);
a gradient of at least `inplace_bytes` is a bucket of its own, reduced in place on
its `.grad` -- packing it would cost a copy and save next to nothing in latency.
How a bucket is averaged is a transport's job (parallel.transports); the
shared-memory one provides every bucket's buffer itself.
"""

from __future__ import annotations

import functools
import time

from distprop import autograd, backend
from distprop.backend import get_array_module
from distprop.parallel.transports import make_transport


class Bucket:
    def __init__(self, index: int, params: list, names: list[str], compression, buffer=None):
        """buffer: flat storage the transport provides (e.g. shared memory); by default a
        lone parameter is reduced in place and several get a buffer of their own."""
        self.index, self.params, self.names = index, params, names
        self.compression = compression
        xp = get_array_module(params[0].data)
        self.xp = xp
        self.dtype = params[0].data.dtype
        self.size = sum(p.data.size for p in params)
        # What each parameter was when the buffers were laid out (see check_unchanged).
        self.layouts = [(p.data.shape, p.data.dtype, backend.device_of(p.data)) for p in params]
        self.in_place = buffer is None and len(params) == 1
        if self.in_place:
            self.buffer, self.views = None, None
        else:
            self.buffer = buffer if buffer is not None else xp.zeros(self.size, self.dtype)
            self.buffer[...] = 0
            self.views, offset = [], 0
            for p in params:
                self.views.append(self.buffer[offset:offset + p.data.size].reshape(p.data.shape))
                p.grad_buffer = self.views[-1]  # ops may write the gradient here directly
                offset += p.data.size
        wire_dtype = compression.wire_dtype
        self.wire = xp.empty(self.size, wire_dtype) if wire_dtype is not None else None
        self.ready = [False] * len(params)

    @property
    def complete(self) -> bool:
        return all(self.ready)

    def stage(self, slot: int) -> None:
        """Make params[slot].grad part of this bucket's buffer (its gradient is final)."""
        self.check_unchanged(slot)
        p = self.params[slot]
        xp = self.xp
        if self.in_place:
            if p.grad is None:  # no gradient this step: contribute zeros
                p.grad = xp.zeros_like(p.data)
            elif not p.grad.flags.c_contiguous:
                p.grad = xp.ascontiguousarray(p.grad)
        else:
            view = self.views[slot]
            if p.grad is None:
                view[...] = 0
            elif p.grad is not view:
                view[...] = p.grad
            p.grad = view
        self.ready[slot] = True

    def check_unchanged(self, slot: int) -> None:
        """A model moved or cast after wrapping would have its gradients silently cast
        into (or copied across devices to) buffers laid out for the old arrays."""
        data, (shape, dtype, device) = self.params[slot].data, self.layouts[slot]
        now = (data.shape, data.dtype, backend.device_of(data))
        if now != (shape, dtype, device):
            raise RuntimeError(f"DataParallel: parameter '{self.names[slot]}' is now {now[1]} {now[0]} on "
                               f"{now[2]}, but was {dtype} {shape} on {device} when the model was wrapped; "
                               "move or cast the model before wrapping it")

    def release(self) -> None:
        """Stop offering this bucket's views as gradient destinations (unless another
        wrapper of the same model has since offered its own)."""
        for p, view in zip(self.params, self.views or ()):
            if p.grad_buffer is view:
                p.grad_buffer = None

    def flat_gradient(self):
        return self.params[0].grad.reshape(-1) if self.in_place else self.buffer

    def reset(self) -> None:
        self.ready = [False] * len(self.params)

    def describe(self) -> str:
        return f"bucket {self.index} ({len(self.params)} gradients, {self.size * self.dtype.itemsize} bytes)"


def assign_buckets(named_params, cap_bytes: int, first_cap_bytes: int, inplace_bytes: int):
    """Group (name, param) pairs, given in reverse registration order, into lists
    for buckets: consecutive params of one dtype and device up to the cap (the first
    bucket smaller, so communication starts early); large ones alone."""
    groups, current, current_bytes, cap = [], [], 0, first_cap_bytes

    def close():
        nonlocal current, current_bytes, cap
        if current:
            groups.append(current)
            current, current_bytes, cap = [], 0, cap_bytes

    for name, p in named_params:
        nbytes = p.data.nbytes
        if nbytes >= inplace_bytes:
            close()
            groups.append([(name, p)])
            cap = cap_bytes
            continue
        if current:
            first = current[0][1].data
            if (current_bytes + nbytes > cap or first.dtype != p.data.dtype
                    or backend.device_of(first) != backend.device_of(p.data)):
                close()
        current.append((name, p))
        current_bytes += nbytes
    close()
    return groups


class Reducer:
    """Averages the gradients of `named_params` over `comm` during backward."""

    def __init__(self, named_params, comm, *, bucket_bytes: int, first_bucket_bytes: int,
                 inplace_bytes: int, compression, transport: str | None = None):
        self.comm = comm
        trainable = [(n, p) for n, p in named_params if p.requires_grad]
        _check_one_device(trainable)
        groups = assign_buckets(list(reversed(trainable)), bucket_bytes, first_bucket_bytes, inplace_bytes)
        on_gpu = bool(trainable) and backend.device_of(trainable[0][1].data) == "gpu"
        layouts = [(sum(p.data.size for _, p in g), g[0][1].data.dtype) for g in groups]
        self.transport = make_transport(transport, comm, on_gpu, layouts, compression)
        buffers = (self.transport.bucket_buffers() if hasattr(self.transport, "bucket_buffers")
                   else [None] * len(groups))
        self.buckets = [Bucket(i, [p for _, p in g], [n for n, _ in g], compression, buffer)
                        for i, (g, buffer) in enumerate(zip(groups, buffers))]
        self._handles = [p.register_post_accumulate_grad_hook(functools.partial(self._on_ready, b, slot))
                         for b in self.buckets for slot, p in enumerate(b.params)]
        self.expecting_sync = False  # set by the forward pass that will be synchronised
        self._in_pass = False
        self._next_bucket = 0
        self._works = []  # transports.base.Work of the buckets started in this pass
        self.steps = 0
        # Seconds the training thread spent on synchronisation (hooks, and waiting for
        # the reductions at the end of backward): what a step pays for it, as long as
        # the background work overlaps with backward.
        self.sync_seconds = 0.0
        # Optional callback(wait_started, works) after each synchronised pass: when the
        # training thread began waiting for the reductions (the end of backward's own
        # work), and each bucket's Work with its started/finished stamps.
        self.trace = None

    # ---- during backward ------------------------------------------------------
    def begin_pass(self) -> None:
        """Called when backward reaches the module's output (or a first hook fires):
        make sure the pass ends by finishing the reduction."""
        if self.expecting_sync and not self._in_pass:
            self._in_pass = True
            autograd.queue_callback(self._finish_pass, on_failure=self._abandon_pass)

    def _on_ready(self, bucket: Bucket, slot: int, param) -> None:
        if not self.expecting_sync:
            return  # inside no_sync(): gradients accumulate locally
        start = time.perf_counter()
        self.begin_pass()
        bucket.stage(slot)
        self._start_ready_buckets()
        self.transport.progress()
        self.sync_seconds += time.perf_counter() - start

    def _start_ready_buckets(self) -> None:
        while self._next_bucket < len(self.buckets) and self.buckets[self._next_bucket].complete:
            bucket = self.buckets[self._next_bucket]
            self._works.append(self.transport.start(bucket))
            self._next_bucket += 1

    def _finish_pass(self) -> None:
        start = time.perf_counter()
        try:
            for bucket in self.buckets:  # gradients no op produced: reduce zeros (or what no_sync left)
                for slot, ready in enumerate(bucket.ready):
                    if not ready:
                        bucket.stage(slot)
            self._start_ready_buckets()
            self.transport.finish()
            for work in self._works:
                work.wait()
            if self.trace is not None:
                self.trace(start, self._works)
        finally:
            self._end_pass()
            self.sync_seconds += time.perf_counter() - start
            self.steps += 1
            if self.comm.watchdog is not None:
                self.comm.watchdog.step = self.steps

    def _abandon_pass(self) -> None:
        """backward() raised: let the reductions already started finish (ranks that
        failed alike started the same ones) before their buffers are reused, and
        forget the pass. The gradients are then partly averaged: skip this step."""
        try:
            # Reductions a transport keeps for the end of backward (shm without a
            # background thread) run now, or their works would never finish; errors
            # land in the works.
            self.transport.finish()
            for work in self._works:
                try:
                    work.wait()
                except Exception:
                    pass  # the exception backward() raised is the one to report
        finally:
            self._end_pass()

    def _end_pass(self) -> None:
        for bucket in self.buckets:
            bucket.reset()
        self._works, self._next_bucket = [], 0
        self._in_pass = self.expecting_sync = False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for bucket in self.buckets:
            bucket.release()
        self.transport.close()


def _check_one_device(named_params) -> None:
    """One transport serves all buckets: NCCL cannot take host arrays, nor MPI device ones."""
    first = {}
    for name, p in named_params:
        first.setdefault(backend.device_of(p.data), name)
    if len(first) > 1:
        raise ValueError(f"DataParallel: the model has parameters on the CPU ('{first['cpu']}') and on the "
                         f"GPU ('{first['gpu']}'); move all of them to one device before wrapping it")
