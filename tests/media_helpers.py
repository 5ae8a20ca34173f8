"""Shared helpers for the image and token tests: small datasets made on the spot."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def photo(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A smooth random image (JPEG keeps it close to itself, unlike noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, channels), np.float32)
    for c in range(channels):
        fx, fy, phase = rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.15), rng.uniform(0, 6.3)
        image[..., c] = 128 + 90 * np.sin(fx * x + phase) * np.cos(fy * y)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format, **options)
    return buffer.getvalue()


def write_images(path, count: int, *, size=(48, 64), jitter: int = 8, row_group_size: int = 8,
                 format: str = "JPEG", hf_struct: bool = False, replace: dict | None = None,
                 seed: int = 0) -> list[bytes]:
    """A Parquet file of `count` encoded images (`size` plus up to `jitter` pixels) and
    their row number as `label`; `replace` maps rows to bytes to store instead.
    Returns the bytes."""
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(count):
        height, width = size[0] + int(rng.integers(0, jitter + 1)), size[1] + int(rng.integers(0, jitter + 1))
        blobs.append(encode(photo(rng, height, width), format, **({"quality": 95} if format == "JPEG" else {})))
    for row, data in (replace or {}).items():
        blobs[row] = data
    images = pa.array(blobs, pa.binary())
    if hf_struct:
        images = pa.StructArray.from_arrays([images, pa.array([f"img/{i}.jpg" for i in range(count)])],
                                            names=["bytes", "path"])
    table = pa.table({"image": images, "label": pa.array(np.arange(count, dtype=np.int64))})
    pq.write_table(table, path, row_group_size=row_group_size)
    return blobs


def write_documents(path, documents, *, row_group_size: int = 5, dtype=pa.int32()) -> None:
    """A Parquet file with one `tokens` list column, one document per row."""
    pq.write_table(pa.table({"tokens": pa.array(documents, pa.list_(dtype))}), path, row_group_size=row_group_size)
