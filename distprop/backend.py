"""Array backends: numpy on the CPU, cupy on the GPU.

This is the only module that imports cupy, and it does so lazily: nothing on the
CPU path ever touches it. Every other module asks `get_array_module(...)` for the
array module of its inputs and writes one code path for both.
"""

from __future__ import annotations

import functools

import numpy as np

DEFAULT_DTYPE = np.float32


@functools.lru_cache(maxsize=None)
def _cupy():
    """The cupy module, or None where it is not installed or finds no GPU."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # no driver, no device: treat as "no GPU"
        return None
    return cupy


def nccl_module():
    """cupy's NCCL bindings, or None where there is no GPU or cupy was built without NCCL."""
    if _cupy() is None:
        return None
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None


def gpu_available() -> bool:
    return _cupy() is not None


def cupy_module():
    """cupy itself; raises a clear error where no GPU backend is usable."""
    cp = _cupy()
    if cp is None:
        raise RuntimeError("device 'gpu' requested but cupy is not installed or sees no GPU "
                           "(install the 'gpu' extra: pip install distprop[gpu])")
    return cp


def is_gpu_array(array) -> bool:
    # Checked by type name so that numpy arrays never trigger the cupy import.
    return type(array).__module__.startswith("cupy")


def get_array_module(*arrays):
    """numpy, or cupy if any argument is a cupy array (or a Tensor wrapping one)."""
    for a in arrays:
        if not isinstance(a, np.ndarray):
            a = getattr(a, "data", a)  # a Tensor: look at the array it wraps
        if is_gpu_array(a):
            return cupy_module()
    return np


def device_of(array) -> str:
    return "gpu" if is_gpu_array(array) else "cpu"


def normalize_device(device) -> str | None:
    if device is None:
        return None
    name = str(device).lower()
    if name in ("cpu", "numpy"):
        return "cpu"
    if name in ("gpu", "cuda", "cupy") or name.startswith("cuda:"):
        return "gpu"
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")


def to_device(array, device):
    """The array on `device` ('cpu' or 'gpu'); no copy if it is already there."""
    device = normalize_device(device)
    if device is None or device_of(array) == device:
        return array
    if device == "cpu":
        return array.get()
    return cupy_module().asarray(array)


def to_numpy(array) -> np.ndarray:
    return array.get() if is_gpu_array(array) else np.asarray(array)


def current_gpu_id() -> int:
    return cupy_module().cuda.Device().id


def use_gpu(index: int) -> None:
    """Make GPU `index` current for this process (before any allocation)."""
    cupy_module().cuda.Device(index).use()


def gpu_count() -> int:
    cp = _cupy()
    return 0 if cp is None else cp.cuda.runtime.getDeviceCount()


def synchronize(array=None) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if array is None or is_gpu_array(array):
        cp = _cupy()
        if cp is not None:
            cp.cuda.get_current_stream().synchronize()


def pinned_empty(shape, dtype) -> np.ndarray:
    """A numpy array in page-locked host memory, so host-to-GPU copies can run
    asynchronously. Falls back to ordinary memory without a GPU."""
    cp = _cupy()
    dtype = np.dtype(dtype)
    if cp is None:
        return np.empty(shape, dtype)
    count = int(np.prod(shape, dtype=np.int64))
    memory = cp.cuda.alloc_pinned_memory(max(count * dtype.itemsize, 1))
    return np.frombuffer(memory, dtype, count).reshape(shape)
