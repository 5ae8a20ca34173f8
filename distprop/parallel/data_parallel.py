"""`DataParallel`: a Module replicated on every rank, gradients averaged in backward."""

from __future__ import annotations

import contextlib

import numpy as np

from distprop import autograd
from distprop.autograd import Function, Tensor
from distprop.backend import device_of, get_array_module
from distprop.nn.module import Module
from distprop.parallel import runtime
from distprop.parallel.compression import get_compression
from distprop.parallel.reducer import Reducer
from distprop.parallel.reproducible import MicroShardReducer

MB = 1024 * 1024


class ModelMismatchError(RuntimeError):
    """The wrapped model differs between ranks (raised on every rank alike)."""


class _SyncPoint(Function):
    """Identity on the module's outputs; its backward runs before any parameter's
    gradient is final, and ties the end of the backward pass to the reducer."""

    def __init__(self, reducer):
        self.reducer = reducer

    def forward(self, x):
        return x

    def backward(self, gy):
        self.reducer.begin_pass()
        return (gy,)


class DataParallel(Module):
    """Wrap `module` so that backward averages its gradients over all ranks.

    At construction every rank checks that all ranks hold the same structure
    (names, shapes, dtypes, devices and requires_grad, in order) -- a mismatch
    raises ModelMismatchError on every rank -- and then takes rank 0's parameters
    and buffers. Move or cast the model before wrapping it.

    bucket_mb: gradients are packed into buckets of at most this size; each bucket's
        allreduce starts as soon as its gradients are final (the first bucket holds
        at most first_bucket_mb, so communication starts early).
    inplace_mb: a gradient at least this large is a bucket of its own, reduced in
        place without a copy (default: 1 MB for host arrays, where copies cost memory
        bandwidth the allreduce needs; bucket_mb on the GPU, where copies are cheap and
        fewer, larger NCCL calls win).
    compression: None, 'fp16' or 'bf16' on the wire (each rank divides before casting).
    transport: how host gradients are reduced, each bucket while backward continues:
        'shm' (through a node's shared memory, and MPI between nodes; where the
        node's ranks fill its cores, all buckets at once when backward ends), 'thread'
        (blocking MPI allreduces on a background thread) or 'iallreduce' (MPI
        nonblocking collectives progressed from the gradient hooks); None picks 'shm'
        where ranks share nodes and /dev/shm has room, else 'thread'. GPU arrays
        with NCCL always use NCCL on its own stream.
    broadcast_buffers: before each training forward, buffers (e.g. batch-norm running
        statistics) are overwritten with rank 0's, so replicas evaluate alike.
    reproducible: gradients that are bitwise independent of the number of ranks,
        computed by `reproducible_backward` over `micro_shards` fixed micro-shards of
        the global batch (see parallel.reproducible for what it costs).
    """

    def __init__(self, module: Module, comm=None, bucket_mb: float = 25, *, first_bucket_mb: float = 1,
                 inplace_mb: float | None = None, compression: str | None = None, transport: str | None = None,
                 broadcast_buffers: bool = True, reproducible: bool = False, micro_shards: int | None = None):
        super().__init__()
        self.module = module
        self.comm = comm if comm is not None else runtime.current()
        self.require_sync = True
        self.broadcast_buffers = broadcast_buffers
        _check_same_structure(module, self.comm)
        _broadcast_module_state(module, self.comm)
        self.reducer = self.micro_shard_reducer = None
        if reproducible:
            self.micro_shard_reducer = MicroShardReducer(module.named_parameters(), self.comm,
                                                         micro_shards or self.comm.size)
        elif self.comm.size > 1:
            params = list(module.named_parameters())
            on_gpu = bool(params) and device_of(params[0][1].data) == "gpu"
            if inplace_mb is None:
                inplace_mb = bucket_mb if on_gpu else 1
            self.reducer = Reducer(params, self.comm, bucket_bytes=int(bucket_mb * MB),
                                   first_bucket_bytes=int(first_bucket_mb * MB),
                                   inplace_bytes=int(inplace_mb * MB),
                                   compression=get_compression(compression), transport=transport)

    def forward(self, *args, **kwargs):
        if self.micro_shard_reducer is not None and autograd.is_grad_enabled():
            raise RuntimeError("DataParallel(reproducible=True): train with reproducible_backward(loss_fn, "
                               "*batch); call the model directly only under no_grad()")
        if self.reducer is None:
            return self.module(*args, **kwargs)
        if self.broadcast_buffers and self.training:
            _broadcast_buffers(self.module, self.comm)
        outputs = self.module(*args, **kwargs)
        if not autograd.is_grad_enabled():
            return outputs
        self.reducer.expecting_sync = self.require_sync
        return _wrap_outputs(outputs, self.reducer) if self.require_sync else outputs

    def reproducible_backward(self, loss_fn, *local_batch) -> float:
        """Reproducible mode: run loss_fn(module, *micro_batch) -> scalar Tensor on each of
        this rank's micro-shards of `local_batch`, leave in every `.grad` the mean over
        all micro-shards of all ranks (bitwise the same for any number of ranks) and
        return the mean loss."""
        if self.micro_shard_reducer is None:
            raise RuntimeError("reproducible_backward needs DataParallel(..., reproducible=True)")
        if self.broadcast_buffers and self.comm.size > 1:
            _broadcast_buffers(self.module, self.comm)
        return self.micro_shard_reducer.backward(self.module, loss_fn, local_batch)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes of forwards run inside this block accumulate gradients
        locally; the first synchronised backward after it averages the sum."""
        previous, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = previous

    def check_replicas(self) -> None:
        """Raise ModelMismatchError (on every rank) unless all ranks hold bitwise
        identical parameters and buffers -- a cheap check to run now and then."""
        import hashlib

        digest = hashlib.sha256()
        for _, array in self.module.state_dict().items():
            digest.update(np.ascontiguousarray(_host(array)).tobytes())
        digests = self.comm.allgather_object(digest.hexdigest())
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        if differing:
            raise ModelMismatchError(f"replicas diverged: ranks {differing} hold parameters or buffers "
                                     "that differ from rank 0's")

    def close(self) -> None:
        """Remove the gradient hooks and stop the communication thread."""
        if self.reducer is not None:
            self.reducer.close()
            self.reducer = None


def _wrap_outputs(outputs, reducer):
    if isinstance(outputs, Tensor):
        return _SyncPoint(reducer)(outputs) if outputs.requires_grad else outputs
    if isinstance(outputs, tuple) and hasattr(outputs, "_fields"):  # a namedtuple takes fields one by one
        return type(outputs)(*(_wrap_outputs(o, reducer) for o in outputs))
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_wrap_outputs(o, reducer) for o in outputs)
    if isinstance(outputs, dict):
        return {k: _wrap_outputs(v, reducer) for k, v in outputs.items()}
    return outputs


def _host(array):
    return array.get() if device_of(array) == "gpu" else array


def _structure(module: Module) -> list[tuple]:
    """(kind, name, shape, dtype, device, requires_grad): what decides the buckets and
    the transport, which every rank must lay out alike."""
    entries = [("parameter", n, tuple(p.shape), str(p.dtype), device_of(p.data), p.requires_grad)
               for n, p in module.named_parameters()]
    entries += [("buffer", n, tuple(b.shape), str(b.dtype), device_of(b), None) for n, b in module.named_buffers()]
    return entries


def _check_same_structure(module: Module, comm) -> None:
    """Every rank gathers every rank's structure, so all reach the same verdict."""
    if comm.size == 1:
        return
    structures = comm.allgather_object(_structure(module))
    reference = structures[0]
    problems = []
    for rank, structure in enumerate(structures[1:], start=1):
        problem = _first_difference(reference, structure)
        if problem:
            problems.append(f"rank {rank} {problem}")
    if problems:
        raise ModelMismatchError("DataParallel: the model differs between ranks (compared with rank 0): "
                                 + "; ".join(problems))


def _first_difference(reference, other) -> str | None:
    for ours, theirs in zip(reference, other):
        if ours != theirs:
            kind, name, shape, dtype, device, requires_grad = theirs
            r_kind, r_name, r_shape, r_dtype, r_device, r_requires_grad = ours
            if (kind, name) != (r_kind, r_name):
                return f"has {kind} '{name}' where rank 0 has {r_kind} '{r_name}'"
            if (shape, dtype) != (r_shape, r_dtype):
                return f"has {kind} '{name}' of shape {shape} {dtype}, rank 0 has {r_shape} {r_dtype}"
            if device != r_device:
                return f"has {kind} '{name}' on the {device.upper()}, rank 0 on the {r_device.upper()}"
            return f"has {kind} '{name}' with requires_grad={requires_grad}, rank 0 with {r_requires_grad}"
    if len(reference) != len(other):
        return (f"has {len(other)} parameters and buffers, rank 0 has {len(reference)}"
                + (f" (first extra: '{other[len(reference)][1]}')" if len(other) > len(reference)
                   else f" (first missing: '{reference[len(other)][1]}')"))
    return None


def _broadcast_module_state(module: Module, comm) -> None:
    if comm.size == 1:
        return
    for _, p in module.named_parameters():
        if not p.data.flags.c_contiguous:
            p.data = p.data.copy()
        comm.bcast_(p.data, root=0)
    _broadcast_buffers(module, comm)


def _broadcast_buffers(module: Module, comm) -> None:
    """Rank 0's buffers everywhere: one broadcast per dtype and device, not one per
    buffer (a ResNet has dozens of small batch-norm buffers, and this runs on every
    training forward)."""
    groups: dict[tuple, list] = {}
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                groups.setdefault((buffer.dtype.str, device_of(buffer)), []).append((owner, name, buffer))
    for entries in groups.values():  # insertion order: the same module walk on every rank
        xp = get_array_module(entries[0][2])
        flat = xp.concatenate([buffer.reshape(-1) for _, _, buffer in entries])
        comm.bcast_(flat, root=0)
        offset = 0
        for owner, name, buffer in entries:
            values = flat[offset:offset + buffer.size].reshape(buffer.shape)
            if buffer.flags.writeable:
                buffer[...] = values  # in place: whoever holds the buffer sees rank 0's values
            else:
                setattr(owner, name, values.copy())
            offset += buffer.size
