"""Batch slots in anonymous shared memory, for handing batches from worker processes
to the loader without pickling them.

The memory is a ``memfd`` (Linux; an unlinked temporary file elsewhere) that the
loader creates and passes to each worker as an open file descriptor. It has no
name, so it cannot clash with another job's or be left behind in ``/dev/shm`` by a
crash (shared-memory names outliving their jobs, and Python's resource tracker
unlinking segments another process still uses, are the usual failures), and it is
freed by the kernel when the last process holding it exits.

Each of `count` slots holds one batch: every output column at a fixed, 64-byte
aligned offset, sized for a full batch.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np

_ALIGN = 64


def slot_layout(outputs: dict[str, tuple[np.dtype, tuple[int, ...]]], batch_size: int) \
        -> tuple[dict[str, int], int]:
    """Byte offset of each output column in a slot, and the slot's size."""
    offsets, size = {}, 0
    for name, (dtype, shape) in outputs.items():
        offsets[name] = size
        size += -(-batch_size * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
    return offsets, max(size, _ALIGN)


class SharedSlots:
    """`count` batch slots of `slot_bytes` each, in one shared mapping."""

    def __init__(self, count: int, slot_bytes: int, fd: int | None = None):
        self.count, self.slot_bytes = count, slot_bytes
        total = count * slot_bytes
        if fd is None:
            fd = _anonymous_file()
            os.ftruncate(fd, total)
        self.fd = fd
        self._map = mmap.mmap(fd, total)  # MAP_SHARED: workers' writes are seen here

    def arrays(self, slot: int, offsets: dict[str, int], outputs: dict, rows: int) -> dict[str, np.ndarray]:
        """The first `rows` rows of each output column in slot `slot`, as views."""
        base = slot * self.slot_bytes
        return {name: np.ndarray((rows,) + tuple(shape), dtype, buffer=self._map, offset=base + offsets[name])
                for name, (dtype, shape) in outputs.items()}

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # views still exported (a batch not yet copied); the GC frees the map later
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _anonymous_file() -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create("distprop-batches", 0)
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    handle, path = tempfile.mkstemp(prefix="distprop-batches-", dir=directory)
    os.unlink(path)
    return handle
