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

The loader hands batches to the training loop as views of their slot, without a
copy (`SharedSlots.lend`). A lent slot is filled again only once every array that
views it is gone: the column arrays share one base array, and a weak-reference
finalizer on it gives the slot back (`FreeSlots`). However long the training loop
keeps a batch, or any view of it, its data stays as it was handed over.
"""

from __future__ import annotations

import collections
import mmap
import os
import tempfile
import threading
import weakref

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

    def lend(self, slot: int, offsets: dict[str, int], outputs: dict, rows: int, free: FreeSlots) \
            -> dict[str, np.ndarray]:
        """`arrays` for the consumer: views of one base array over the slot, which
        `free` gets back when the last of them (or of any view of them) is gone."""
        # frombuffer keeps a memoryview of the mapping (np.ndarray(buffer=...) does not),
        # so `close` cannot unmap the memory under a batch the consumer still holds.
        base = np.frombuffer(self._map, np.uint8, self.slot_bytes, slot * self.slot_bytes)
        arrays = {}
        for name, (dtype, shape) in outputs.items():
            start = offsets[name]
            size = rows * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            arrays[name] = base[start:start + size].view(dtype).reshape((rows,) + tuple(shape))
        free.lend(base, slot)
        return arrays

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


class FreeSlots:
    """The slots free to be filled. The loader's thread takes and puts them; a slot
    lent to the consumer comes back from whichever thread drops its last array (a
    finalizer), which also makes `wakeup` readable, for a loader waiting on workers
    and on returned slots at once (``multiprocessing.connection.wait``)."""

    def __init__(self, count: int):
        self._free = collections.deque(range(count))
        # Reentrant: a finalizer may run in this same thread while it holds the lock.
        self._lock = threading.RLock()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self.lent = 0
        self._closed = False

    @property
    def wakeup(self) -> int:
        """A file descriptor that turns readable when a lent slot comes back."""
        return self._read

    def take(self) -> int | None:
        with self._lock:
            return self._free.popleft() if self._free else None

    def put(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def lend(self, base: np.ndarray, slot: int) -> None:
        with self._lock:
            self.lent += 1
        weakref.finalize(base, self._returned, slot).atexit = False

    def clear_wakeups(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def _returned(self, slot: int) -> None:
        with self._lock:
            if self._closed:  # the pool is gone; the mapping lives on until its last view does
                return
            self.lent -= 1
            self._free.append(slot)
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.close(self._read)
        os.close(self._write)
