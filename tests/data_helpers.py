"""Shared helpers for the data tests: small datasets whose rows say who they are."""

from __future__ import annotations

import numpy as np

from distprop.data import ArrowLoader, write_dataset


def write_ids(path, num_rows: int, *, row_group_size: int = 8, rows_per_file: int | None = None,
              shape=(2, 3), **options) -> np.ndarray:
    """A dataset whose `id` column is the row number and whose `x` tensor encodes it
    (so a batch's tensors can be checked against its ids); returns x."""
    x = (np.arange(num_rows, dtype=np.float32)[:, None] * 100
         + np.arange(int(np.prod(shape)), dtype=np.float32)).reshape((num_rows,) + tuple(shape))
    write_dataset(path, {"x": x, "id": np.arange(num_rows, dtype=np.int64)}, row_group_size=row_group_size,
                  rows_per_file=rows_per_file, **options)
    return x


def batch_ids(loader) -> list[list[int]]:
    """The ids of every batch one pass over `loader` yields, in order."""
    return [batch["id"].tolist() for batch in loader]


def rank_loaders(path, world_size: int, batch_size: int, **options) -> list[ArrowLoader]:
    """One loader per simulated rank."""
    return [ArrowLoader(path, batch_size, rank=rank, world_size=world_size, **options)
            for rank in range(world_size)]
