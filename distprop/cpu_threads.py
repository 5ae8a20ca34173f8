"""Intra-op parallelism on the CPU: an op's work split over threads of distprop's own.

numpy releases the GIL inside its loops and BLAS calls, so Python threads run them
side by side. Two kinds of work gain from it: strided copies with short contiguous
runs (im2col, pooling over channels-last maps), whose cost is iteration overhead
rather than memory bandwidth, and GEMMs too narrow for BLAS's own threading (a
convolution with 16 output channels). Split by images, each part calling BLAS on
one thread, a ResNet convolution ran 1.3x and max pooling 2x faster on 2 cores than
the same work as one call on 2-thread BLAS.

All of distprop's CPU GEMMs go through here (`matmul` splits one GEMM's output
over the threads), so BLAS's own threads stay asleep. That matters: after a
threaded GEMM, OpenBLAS's threads spin for a while waiting for more, and spinning
on the cores the parts run on made a LeNet step 1.5x slower on 2 cores.

The thread count is BLAS's, read at each call: `distprop.init()` sets it per rank,
and `set_num_threads(n)` (or threadpoolctl's `threadpool_limits(n)`) changes both.
While parts run, BLAS is held at one thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from distprop.backend import get_array_module

# Below about this many FLOPs per thread, splitting a GEMM costs more than it saves.
_MIN_THREAD_FLOPS = 2_000_000

_blas_controllers = None  # threadpoolctl's handles on numpy's BLAS, found at first use
_pool = None
_pool_size = 0
_lock = threading.Lock()
_active_regions = 0  # parallel regions running now (from any thread)
_saved_blas_threads = None
_inside_part = threading.local()


def _blas():
    """Controllers of numpy's BLAS (all BLAS libraries where numpy's cannot be told apart)."""
    global _blas_controllers
    if _blas_controllers is None:
        try:
            from threadpoolctl import ThreadpoolController

            found = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # no threadpoolctl or no BLAS it knows: run ops on one thread
            found = []
        numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
        own = [c for c in found if os.path.basename(os.path.dirname(c.filepath)) == "numpy.libs"
               and os.path.dirname(os.path.dirname(c.filepath)) == numpy_dir]
        _blas_controllers = own or found
    return _blas_controllers


def _reset_after_fork():
    """A forked child has none of the parent's threads: start its pool and counts afresh
    (and give BLAS back its threads if the fork came in the middle of a region)."""
    global _pool, _pool_size, _lock, _active_regions, _inside_part
    if _active_regions:
        for controller, threads in _saved_blas_threads:
            controller.set_num_threads(threads)
    _pool, _pool_size, _active_regions = None, 0, 0
    _lock, _inside_part = threading.Lock(), threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def get_num_threads() -> int:
    """Threads an op may use: BLAS's thread count (1 where it cannot be read)."""
    blas = _blas()
    return max(1, blas[0].get_num_threads()) if blas else 1


def set_num_threads(threads: int) -> None:
    """Set the threads of BLAS and of distprop's CPU ops together (like torch.set_num_threads)."""
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"set_num_threads: need at least 1 thread, got {threads}")
    for controller in _blas():
        controller.set_num_threads(threads)


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="distprop-cpu")
            _pool_size = workers
        return _pool


@contextlib.contextmanager
def single_threaded_blas():
    """BLAS at one thread inside (nested and concurrent uses are counted), its
    setting restored when the last one leaves."""
    _enter_region()
    try:
        yield
    finally:
        _leave_region()


def _enter_region() -> None:
    global _active_regions, _saved_blas_threads
    with _lock:
        if _active_regions == 0:
            _saved_blas_threads = [(c, c.get_num_threads()) for c in _blas()]
            for controller in _blas():
                controller.set_num_threads(1)
        _active_regions += 1


def _leave_region() -> None:
    global _active_regions
    with _lock:
        _active_regions -= 1
        if _active_regions == 0:
            for controller, threads in _saved_blas_threads:
                controller.set_num_threads(threads)


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous (start, stop) ranges covering range(count), sizes differing by at most 1."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + base + (index < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def map_parts(function, count: int, min_per_part: int = 1) -> list:
    """Call function(start, stop) on contiguous parts of range(count), one part per
    thread (this thread runs the first), and return the results in part order.

    Runs as one call function(0, count) where there is one thread, too little work
    (fewer than `min_per_part` items per part) or when already inside a part. Every
    part finishes before this returns, also when one raises; the first error is
    then raised here.
    """
    threads = min(get_num_threads(), count // max(1, min_per_part))
    if threads <= 1 or getattr(_inside_part, "active", False):
        return [function(0, count)]
    bounds = split(count, threads)

    def run(start, stop):
        _inside_part.active = True
        try:
            return function(start, stop)
        finally:
            _inside_part.active = False

    with single_threaded_blas():
        pool = _executor(threads - 1)
        futures = [pool.submit(run, *b) for b in bounds[1:]]
        results, error = [], None
        try:
            results.append(run(*bounds[0]))
        except BaseException as exc:  # noqa: BLE001 - re-raised once the other parts are done
            error = exc
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:  # noqa: BLE001
                error = error or exc
        if error is not None:
            raise error
        return results


def matmul(a, b, out=None):
    """numpy's `a @ b` (with `out=`), its output split over the threads: numpy arrays
    of 2 or more dimensions, each part a single-threaded BLAS call. Along the larger
    of the rows and columns (batched: along the first batch axis, if long enough),
    which measured as fast here as OpenBLAS's own threading. Anything else (cupy,
    vectors, small products) is one xp.matmul call."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return get_array_module(a, b).matmul(a, b, out=out)
    if get_num_threads() <= 1:
        return np.matmul(a, b, out=out)
    if a.ndim < 2 or b.ndim < 2:  # a GEMV or dot: not split, but it would wake BLAS's threads too
        with single_threaded_blas():
            return np.matmul(a, b, out=out)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch_shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    flops = 2 * m * k * n * int(np.prod(batch_shape))
    if flops < 2 * _MIN_THREAD_FLOPS:
        with single_threaded_blas():  # a small GEMM would still wake BLAS's threads
            return np.matmul(a, b, out=out)
    if out is None:
        out = np.empty(batch_shape + (m, n), np.result_type(a, b))

    def min_part(length):  # units of an axis of `length` that hold _MIN_THREAD_FLOPS
        return -(-_MIN_THREAD_FLOPS * length // flops)

    if batch_shape and batch_shape[0] >= get_num_threads():
        a = np.broadcast_to(a, batch_shape + (m, k))
        b = np.broadcast_to(b, batch_shape + (k, n))
        map_parts(lambda start, stop: np.matmul(a[start:stop], b[start:stop], out=out[start:stop]),
                  batch_shape[0], min_part(batch_shape[0]))
    elif n >= m:
        map_parts(lambda start, stop: np.matmul(a, b[..., start:stop], out=out[..., start:stop]), n, min_part(n))
    else:
        map_parts(lambda start, stop: np.matmul(a[..., start:stop, :], b, out=out[..., start:stop, :]),
                  m, min_part(m))
    return out
