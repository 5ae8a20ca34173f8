"""Moving assembled batches from host memory to the rank's GPU.

Batches are staged in page-locked (pinned) host buffers and copied on a
non-blocking side stream, so the copy runs by DMA without waiting for the training
kernels queued on the consumer's stream. The loader calls `to_device` from its
background thread and waits there for the copy to finish before handing the batch
over, which keeps the consumer's stream free of cross-stream ordering concerns and
lets each staging buffer be reused for the next batch. Each copy first waits for
the work already queued on the consumer's stream (see DeviceFeeder).

cupy itself is reached only through `distprop.backend`.
"""

from __future__ import annotations

import numpy as np

from distprop.backend import cupy_module, current_gpu_id, pinned_empty


class DeviceFeeder:
    """Copies ``{name: ndarray}`` batches onto one GPU through reused pinned buffers.

    Create it in the consumer's thread: it records that thread's current GPU, and
    the background thread copies onto that GPU.
    """

    def __init__(self):
        self._cp = cupy_module()
        self.device_id = current_gpu_id()
        # The stream the consumer computes on: the copies wait for the work queued there,
        # since a batch the consumer dropped returns its memory to the pool while its
        # kernels may still be reading it, and the next batch may be given that memory.
        self._consumer_stream = self._cp.cuda.get_current_stream()
        self._stream = None
        self._staging: dict[str, np.ndarray] = {}

    def host_buffer(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A pinned staging array for column `name`: the leading rows of a buffer kept
        between batches, reallocated only when a batch needs more rows or another
        per-sample shape or dtype (a smaller last batch reuses it)."""
        buffer = self._staging.get(name)
        if (buffer is None or buffer.shape[1:] != tuple(shape[1:]) or buffer.dtype != np.dtype(dtype)
                or len(buffer) < shape[0]):
            buffer = pinned_empty(shape, dtype)
            self._staging[name] = buffer
        return buffer[:shape[0]]

    def to_device(self, batch: dict, finish=None) -> dict:
        """The batch with every ndarray copied to the GPU (other values pass through).
        Arrays that are not already this feeder's staging buffers are first copied
        into them, so every transfer is from pinned memory. `finish` (device batch ->
        device batch: the images' deferred ToTensor/Normalize) runs on the copy
        stream, after the copies, before the batch is handed over."""
        cp = self._cp
        with cp.cuda.Device(self.device_id):
            if self._stream is None:
                self._stream = cp.cuda.Stream(non_blocking=True)
            out = {}
            for name, value in batch.items():
                if not isinstance(value, np.ndarray):
                    out[name] = value
                    continue
                pinned = self.host_buffer(name, value.shape, value.dtype)
                if value.ctypes.data != pinned.ctypes.data:  # not assembled in place by the loader
                    np.copyto(pinned, value)
                device_array = cp.empty(value.shape, value.dtype)
                self._stream.wait_event(self._consumer_stream.record())  # recorded after the allocation
                device_array.set(pinned, stream=self._stream)
                out[name] = device_array
            if finish is not None:
                with self._stream:
                    out = finish(out)
            self._stream.synchronize()
        return out
