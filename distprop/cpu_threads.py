"""Intra-op parallelism on the CPU: an op's work split over threads of distprop's own.

numpy releases the GIL inside its loops and BLAS calls, so Python threads run them
side by side. Two kinds of work gain from it: strided copies with short contiguous
runs (im2col, pooling over channels-last maps), whose cost is iteration overhead
rather than memory bandwidth, and GEMMs too narrow for BLAS's own threading (a
convolution with 16 output channels). Split by images, each part calling BLAS on
one thread, a 16-channel ResNet convolution ran 1.3x faster on 2 cores than the same
work as one call on 2-thread BLAS (1.8x faster than on one core).

All of distprop's CPU GEMMs go through here (`matmul` splits one GEMM's output
over the threads), so BLAS's own threads stay asleep. That matters: after a
threaded GEMM, OpenBLAS's threads spin for a while waiting for more, and spinning
on the cores the parts run on made a LeNet step 1.5x slower on 2 cores.

The thread count is BLAS's, read at each call: `distprop.init()` sets it per rank,
and `set_num_threads(n)` (or threadpoolctl's `threadpool_limits(n)`) changes both.
While parts run, BLAS is held at one thread. OpenBLAS takes that setting from the
main thread only (calls from other threads are ignored), so only ops called on the
main thread are split; elsewhere they run as one numpy call, as numpy would.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from distprop.backend import get_array_module

# Handing a part to a pool thread and waiting for it took 70-90 us here (a shared VM),
# so each part should hold a few hundred microseconds of work: below about this many
# FLOPs per thread, a GEMM is not split.
_MIN_THREAD_FLOPS = 20_000_000
# `_gemm` blocks products whose narrow side (k*n, or m*n for a long reduction) has
# _TINY_ELEMENTS to _NARROW_ELEMENTS elements, in blocks of _MIN_BLOCK to _MAX_BLOCK
# rows (below that, as for col2im's 16x6 kernel slices, blocks measured slower).
_TINY_ELEMENTS, _NARROW_ELEMENTS = 128, 4096
_MIN_BLOCK, _MAX_BLOCK = 256, 2048

# Most threads a region splits into: the pool's size (its threads start as needed).
_MAX_THREADS = 256

_blas_controllers = None  # threadpoolctl's handles on numpy's BLAS, found at first use
_pool = None
_lock = threading.Lock()
_active_regions = 0  # single_threaded_blas() blocks open on the main thread
_saved_blas_threads = None  # BLAS's thread counts to restore when the last one closes
_forking_from_main = False
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


def _note_forking_thread():
    global _forking_from_main
    _forking_from_main = _on_main_thread()


def _reset_after_fork():
    """A forked child has none of the parent's threads: it gets a pool of its own. Its
    one thread is the one that forked: the main thread's open regions are still its
    own (it will close them); after a fork from another thread they are gone, and
    BLAS gets its thread count back."""
    global _pool, _lock, _active_regions
    if _active_regions and not _forking_from_main:
        for controller, threads in _saved_blas_threads:
            controller.set_num_threads(threads)
        _active_regions = 0
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_note_forking_thread, after_in_child=_reset_after_fork)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def get_num_threads() -> int:
    """Threads an op may use: BLAS's thread count (1 where it cannot be read)."""
    blas = _blas()
    return max(1, blas[0].get_num_threads()) if blas else 1


def set_num_threads(threads: int) -> None:
    """Set the threads of BLAS and of distprop's CPU ops together (like torch.set_num_threads);
    call it on the main thread (OpenBLAS ignores the others). Inside a
    single_threaded_blas() block it takes effect when the block closes."""
    global _saved_blas_threads
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"set_num_threads: need at least 1 thread, got {threads}")
    with _lock:
        if _active_regions:
            _saved_blas_threads = [(c, threads) for c, _ in _saved_blas_threads]
            return
    for controller in _blas():
        controller.set_num_threads(threads)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:  # never replaced: a caller may be submitting to it
            _pool = ThreadPoolExecutor(_MAX_THREADS - 1, thread_name_prefix="distprop-cpu")
        return _pool


@contextlib.contextmanager
def single_threaded_blas():
    """BLAS at one thread inside, its setting restored when the outermost block on the
    main thread closes. Elsewhere it does nothing: OpenBLAS ignores thread-count
    changes from other threads (and ops called there are not split)."""
    if not _on_main_thread():
        yield
        return
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
    (fewer than `min_per_part` items per part), off the main thread, or when already
    inside a part. Every part finishes before this returns, also when one raises;
    the first error is then raised here.
    """
    threads = min(get_num_threads(), count // max(1, min_per_part), _MAX_THREADS)
    if threads <= 1 or getattr(_inside_part, "active", False) or not _on_main_thread():
        return [function(0, count)]
    bounds = split(count, threads)

    def run(start, stop):
        _inside_part.active = True
        try:
            return function(start, stop)
        finally:
            _inside_part.active = False

    with single_threaded_blas():
        pool = _executor()
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
    """numpy's `a @ b` (with `out=`), on the CPU's threads: numpy arrays of 2 or more
    dimensions have their output split over the threads, each part a single-threaded
    BLAS call, along the larger of the rows and columns (batched: along the first
    batch axis, if long enough), which measured as fast here as OpenBLAS's own
    threading. Products go through `_gemm`, which blocks narrow ones. Off the main
    thread nothing is split; cupy arrays go to cupy.matmul."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return get_array_module(a, b).matmul(a, b, out=out)
    threads = get_num_threads()
    if a.ndim < 2 or b.ndim < 2 or _aliases(out, a, b):
        # A GEMV or dot is not split (but would wake BLAS's threads too); an `out`
        # overlapping an input is left to numpy, which buffers it.
        with _blas_held(threads):
            return np.matmul(a, b, out=out)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch_shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    gemm = _gemm if a.ndim == b.ndim == 2 else _batched_gemm
    flops = 2 * m * k * n * int(np.prod(batch_shape))
    if threads <= 1 or flops < 2 * _MIN_THREAD_FLOPS or not _on_main_thread():
        with _blas_held(threads):  # a small GEMM would still wake BLAS's threads
            return gemm(a, b, out)
    if out is None:
        out = np.empty(batch_shape + (m, n), np.result_type(a, b))

    def min_part(length):  # units of an axis of `length` that hold _MIN_THREAD_FLOPS
        return -(-_MIN_THREAD_FLOPS * length // flops)

    if batch_shape and batch_shape[0] >= threads:
        a = np.broadcast_to(a, batch_shape + (m, k))
        b = np.broadcast_to(b, batch_shape + (k, n))
        map_parts(lambda start, stop: gemm(a[start:stop], b[start:stop], out[start:stop]),
                  batch_shape[0], min_part(batch_shape[0]))
    elif n >= m:
        map_parts(lambda start, stop: gemm(a, b[..., start:stop], out[..., start:stop]), n, min_part(n))
    else:
        map_parts(lambda start, stop: gemm(a[..., start:stop, :], b, out[..., start:stop, :]), m, min_part(m))
    return out


def _aliases(out, *arrays) -> bool:
    """Whether `out` may overlap an input (then parts could read what others wrote)."""
    return out is not None and any(np.may_share_memory(out, a) for a in arrays)


def _batched_gemm(a, b, out=None):
    """np.matmul of stacks of matrices; one `_gemm` per matrix where it would block them."""
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if not _blocks(m, k, n):
        return np.matmul(a, b, out=out)
    batch_shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if out is None:
        out = np.empty(batch_shape + (m, n), np.result_type(a, b))
    a, b = np.broadcast_to(a, batch_shape + (m, k)), np.broadcast_to(b, batch_shape + (k, n))
    for index in np.ndindex(*batch_shape):
        _gemm(a[index], b[index], out[index])
    return out


def _blocks(m, k, n) -> bool:
    """Whether `_gemm` cuts an (m, k) @ (k, n) product into blocks."""
    return _row_blocks(m, k * n) or _row_blocks(k, m * n)


def _row_blocks(length, narrow) -> bool:
    """Whether `length` rows against a narrow side of `narrow` elements go in blocks."""
    return _TINY_ELEMENTS <= narrow <= _NARROW_ELEMENTS and length >= 2 * _block_length(narrow)


def _blas_held(threads):
    """single_threaded_blas() where BLAS has threads to wake, else nothing (saving the
    two thread-count calls)."""
    return single_threaded_blas() if threads > 1 else contextlib.nullcontext()


def _block_length(other_elements: int) -> int:
    """Rows per block for `_gemm`: about 2**20 FLOPs per block, 256 to 2048 rows."""
    return min(_MAX_BLOCK, max(_MIN_BLOCK, (1 << 19) // max(1, other_elements)))


def _gemm(a, b, out=None):
    """A single-threaded 2-d product, in blocks where one side is narrow.

    OpenBLAS runs narrow products (16 output channels of a convolution, or its
    weight gradient: a long reduction into a small matrix) at 55-75% of its peak;
    cut into blocks of a few hundred rows it reached 100-110 GFLOP/s here, against
    about 100 for a large square product. So a tall `a` times a small `b` goes as a
    batch of row blocks, and a long reduction into a small result as a batch of
    block products summed afterwards.
    """
    m, k = a.shape
    n = b.shape[1]  # (an `out` overlapping a or b never gets here: matmul hands it to numpy)
    if _row_blocks(m, k * n):
        block = _block_length(k * n)
        if out is None:
            out = np.empty((m, n), np.result_type(a, b))
        full = m - m % block
        np.matmul(a[:full].reshape(-1, block, k), b, out=out[:full].reshape(-1, block, n))
        if full < m:
            np.matmul(a[full:], b, out=out[full:])
        return out
    if _row_blocks(k, m * n):
        block = _block_length(m * n)
        full = k - k % block
        blocks = np.matmul(a[:, :full].reshape(m, -1, block).transpose(1, 0, 2), b[:full].reshape(-1, block, n))
        out = np.sum(blocks, axis=0, out=out)
        if full < k:
            out += np.matmul(a[:, full:], b[full:])
        return out
    return np.matmul(a, b, out=out)
