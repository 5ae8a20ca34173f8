"""Small cross-rank helpers for training loops: metrics, state, gradient clipping."""

from __future__ import annotations

import math

import numpy as np

from distprop import cpu_threads
from distprop.backend import device_of, get_array_module, to_device
from distprop.parallel import runtime


def _comm(comm):
    return comm if comm is not None else runtime.current()


def sum_metrics(metrics: dict, comm=None) -> dict:
    """Each value summed over ranks (e.g. correct predictions and sample counts),
    in one allreduce. Every rank must pass the same keys."""
    comm = _comm(comm)
    keys = sorted(metrics)  # same order on every rank, whatever the insertion order
    values = np.array([_as_float(metrics[k]) for k in keys], dtype=np.float64)
    _check_same_keys(keys, comm)
    comm.allreduce_(values, "sum")
    return {k: float(v) for k, v in zip(keys, values)}


def _as_float(value) -> float:
    # numpy/cupy scalars and arrays and Tensors all have .item()
    return float(value.item() if hasattr(value, "item") else value)


def average_metrics(metrics: dict, comm=None) -> dict:
    """Each value averaged over ranks (e.g. the loss), in one allreduce."""
    comm = _comm(comm)
    return {k: v / comm.size for k, v in sum_metrics(metrics, comm).items()}


def _check_same_keys(keys, comm) -> None:
    if comm.size == 1:
        return
    all_keys = comm.allgather_object(keys)
    if any(k != all_keys[0] for k in all_keys):
        raise ValueError(f"metrics differ between ranks: {dict(enumerate(all_keys))}")


def broadcast_state(state, comm=None, root: int = 0):
    """Root's nested state (dicts, lists, tuples, arrays, numbers, strings) on every
    rank, e.g. an optimizer's state_dict on resume. The structure travels as one
    small object, the arrays as raw buffers (never pickled). Other ranks may pass
    None."""
    comm = _comm(comm)
    if comm.size == 1:
        return state
    arrays: list = []
    skeleton = _strip_arrays(state, arrays) if comm.rank == root else None
    skeleton, specs = comm.bcast_object((skeleton, [(a.shape, a.dtype.str, device_of(a)) for a in arrays])
                                        if comm.rank == root else None, root=root)
    if comm.rank != root:
        arrays = [to_device(np.empty(shape, dtype), device) for shape, dtype, device in specs]
    for i, array in enumerate(arrays):
        if not array.flags.c_contiguous:
            arrays[i] = array = array.copy()
        comm.bcast_(array, root=root)
    return _fill_arrays(skeleton, arrays)


class _ArraySlot:
    def __init__(self, index):
        self.index = index


def _strip_arrays(value, arrays):
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, (np.generic,)):
        arrays.append(value)
        return _ArraySlot(len(arrays) - 1)
    if isinstance(value, dict):
        return {k: _strip_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_strip_arrays(v, arrays) for v in value)
    return value


def _fill_arrays(value, arrays):
    if isinstance(value, _ArraySlot):
        return arrays[value.index]
    if isinstance(value, dict):
        return {k: _fill_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fill_arrays(v, arrays) for v in value)
    return value


def clip_grad_norm_(parameters, max_norm: float, comm=None, eps: float = 1e-6) -> float:
    """Scale gradients so that their global 2-norm is at most max_norm; returns the
    norm before clipping. Call it after the gradients are averaged: they are then the
    same on every rank, and rank 0's norm is broadcast so that every rank scales by
    bitwise the same factor."""
    comm = _comm(comm)
    grads = [p.grad for p in parameters if p.grad is not None]
    with cpu_threads.single_threaded_blas():  # a threaded dot would leave BLAS's threads spinning
        total = math.sqrt(sum(float(get_array_module(g).vdot(g.ravel(), g.ravel()).real) for g in grads))
    total = float(comm.bcast_object(total, root=0)) if comm.size > 1 else total
    scale = max_norm / (total + eps)
    if scale < 1:
        for g in grads:
            g *= g.dtype.type(scale)
    return total
