"""Synthetic classification data of any size and sample shape, for benchmarks and scaling runs.

Inputs are standard normal; each label is the argmax of a fixed random linear map
of the input (a "teacher"), so the labels are learnable and a scaling run shows
its loss falling. Generation is chunked, so the sample count is limited by disk,
not memory, and the data depend only on (seed, samples, shape, classes).
"""

from __future__ import annotations

import numpy as np

from distprop.data.writer import DatasetWriter
from distprop.errors import ConfigError

_CHUNK_ROWS = 4096  # rows generated at once; part of the seeding, so fixed


def write_synthetic(out, samples: int, *, shape=(3, 32, 32), classes: int = 10, seed: int = 0,
                    dtype="float32", **write_options) -> list[str]:
    """Write `samples` rows of an ``image`` tensor column (per-sample `shape`, `dtype`)
    and an int64 ``label`` column in ``0..classes-1``; returns the files written.
    `write_options` go to `DatasetWriter` (rows_per_file, row_group_size, ...)."""
    shape = tuple(int(d) for d in shape)
    if samples < 1 or classes < 2 or not shape or min(shape) < 1:
        raise ConfigError(f"need samples >= 1, classes >= 2 and a non-empty positive shape "
                         f"(got samples={samples}, classes={classes}, shape={shape})")
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"dtype {dtype!r} is not a numpy dtype") from None
    features = int(np.prod(shape))
    teacher = (np.random.default_rng([seed, 0]).standard_normal((features, classes))
               / np.sqrt(features)).astype(np.float32)
    with DatasetWriter(out, **write_options) as writer:
        for chunk, start in enumerate(range(0, samples, _CHUNK_ROWS)):
            rows = min(_CHUNK_ROWS, samples - start)
            inputs = np.random.default_rng([seed, 1, chunk]).standard_normal((rows, features), dtype=np.float32)
            labels = np.argmax(inputs @ teacher, axis=1).astype(np.int64)
            writer.write({"image": inputs.reshape((rows,) + shape).astype(dtype, copy=False), "label": labels})
    return writer.files
