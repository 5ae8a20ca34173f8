"""Converters from public dataset formats to distprop datasets.

Each writes ``image`` (or ``features``) and int64 ``label`` columns with
`write_dataset`, taking its keyword options (rows_per_file, row_group_size,
compression, format, overwrite). Rows are written in a seeded random order
(``shuffle=True``): the loader's shuffle mixes rows within a window of a few row
groups, so a file sorted by class would give batches of one class.

* `convert_digits`: scikit-learn's bundled UCI digits, float32 1x8x8 in [0, 1],
  split into ``train/`` and ``test/``.
* `convert_mnist`: MNIST IDX files (optionally gzipped), uint8 1x28x28.
* `convert_cifar10`: the CIFAR-10 python batches, uint8 3x32x32, ``train/`` + ``test/``.
* `convert_npz`: every array of an .npz file becomes a column.
* `convert_csv`: one integer label column plus numeric feature columns -> float32 features.

Image columns keep their source's dtype and range (uint8 0..255 for MNIST and
CIFAR-10); scale them in the loader's transform.
"""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from distprop.data.safe_pickle import load_data_pickle
from distprop.data.storage import first_line
from distprop.data.writer import check_same_length, write_dataset
from distprop.errors import ConfigError, DataError

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"


# What the classification converters record as their columns' roles (see DatasetWriter).
IMAGE_ROLES = {"input": "image", "label": "label"}
FEATURE_ROLES = {"input": "features", "label": "label"}


def _write(out, columns: dict, shuffle: bool, seed: int, write_options: dict, source: str,
           roles: dict | None = None) -> list[str]:
    rows = check_same_length(columns, source)
    if shuffle:
        order = np.random.default_rng(seed).permutation(rows)
        columns = {name: values[order] for name, values in columns.items()}
    return write_dataset(out, columns, **{"roles": roles, **write_options})


def convert_digits(out, *, test_fraction: float = 0.2, seed: int = 0, **write_options) -> dict[str, list[str]]:
    """Write scikit-learn's UCI digits (1797 8x8 images, 10 classes) to ``out/train``
    and ``out/test``, a seeded random `test_fraction` of the samples in test."""
    from sklearn.datasets import load_digits  # optional dependency, only for this converter

    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    splits = {"test": order[:n_test], "train": order[n_test:]}
    return {name: write_dataset(os.path.join(os.fspath(out), name),
                                {"image": images[rows], "label": labels[rows]},
                                **{"roles": IMAGE_ROLES, **write_options})
            for name, rows in splits.items()}


# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """An IDX file (gzipped or not) as a native-endian ndarray."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            raw = file.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header promises {expected} data bytes for shape {list(dims)} "
                        f"but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def convert_mnist(images_path, labels_path, out, *, shuffle: bool = True, seed: int = 0,
                  **write_options) -> list[str]:
    """Write an MNIST (or Fashion-MNIST) pair of IDX files: uint8 images 1xHxW, int64 labels."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{os.fspath(images_path)}: expected IDX images of shape (n, rows, cols), "
                        f"found shape {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{os.fspath(labels_path)}: expected {len(images)} labels (one per image in "
                        f"{os.fspath(images_path)}), found shape {list(labels.shape)}")
    columns = {"image": images[:, None].astype(np.uint8), "label": labels.astype(np.int64)}
    return _write(out, columns, shuffle, seed, write_options, os.fspath(images_path), IMAGE_ROLES)


def read_cifar10_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images n x 3 x 32 x 32, int64 labels) from one CIFAR-10 python batch file,
    unpickled with only plain data and numpy arrays allowed."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            batch = load_data_pickle(file)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (a CIFAR-10 python batch)") from None
    except Exception as error:  # any unpickling failure: corrupt, truncated, or refused global
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({error})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    for key in ("data", "labels"):
        if key not in batch:
            raise DataError(f"{path}: no {key!r} entry (found: {', '.join(map(str, batch))})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' should be uint8 of shape (n, 3072), found {data.dtype} "
                        f"{list(data.shape)}")
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' should hold {len(data)} integers, found {labels.dtype} "
                        f"{list(labels.shape)}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def convert_cifar10(directory, out, *, shuffle: bool = True, seed: int = 0,
                    **write_options) -> dict[str, list[str]]:
    """Write the CIFAR-10 python batches in `directory` (data_batch_1..5, test_batch,
    as in cifar-10-batches-py) to ``out/train`` and ``out/test``."""
    directory = os.fspath(directory)
    written = {}
    for split, names in (("train", CIFAR10_TRAIN_BATCHES), ("test", (CIFAR10_TEST_BATCH,))):
        parts = [read_cifar10_batch(os.path.join(directory, name)) for name in names]
        columns = {"image": np.concatenate([images for images, _ in parts]),
                   "label": np.concatenate([labels for _, labels in parts])}
        written[split] = _write(os.path.join(os.fspath(out), split), columns, shuffle, seed, write_options,
                                directory, IMAGE_ROLES)
    return written


def convert_npz(path, out, *, shuffle: bool = True, seed: int = 0, **write_options) -> list[str]:
    """Write every array of an .npz file as a column (equal first dimensions);
    object arrays are refused, since loading them would need pickle."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            columns = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error})") from None
    if not columns:
        raise DataError(f"{path}: the archive holds no arrays")
    return _write(out, columns, shuffle, seed, write_options, path)


def convert_csv(path, out, *, label_column: str, feature_columns=None, shuffle: bool = True, seed: int = 0,
                **write_options) -> list[str]:
    """Write a CSV file with a header: `label_column` (integers) becomes ``label``; the
    `feature_columns` (default: all others, all numeric) become a float32 ``features``
    tensor column of shape (number of features,)."""
    path = os.fspath(path)
    try:
        table = pacsv.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable CSV file ({first_line(error)})") from None
    names = table.column_names
    if label_column not in names:
        raise DataError(f"{path}: no column {label_column!r} (columns: {', '.join(names)})")
    features = [n for n in names if n != label_column] if feature_columns is None else list(feature_columns)
    if not features:
        raise DataError(f"{path}: no feature columns besides the label {label_column!r}")
    for name in [label_column] + features:
        if name not in names:
            raise DataError(f"{path}: no column {name!r} (columns: {', '.join(names)})")
        column = table.column(name)
        if column.null_count:
            raise DataError(f"{path}: column {name!r} has {column.null_count} empty values")
        numeric = pa.types.is_integer(column.type) or (name != label_column and pa.types.is_floating(column.type))
        if not numeric:
            kind = "integer" if name == label_column else "numeric"
            raise DataError(f"{path}: column {name!r} has type {column.type}, expected {kind}")
    columns = {
        "features": np.stack([table.column(n).to_numpy().astype(np.float32) for n in features], axis=1),
        "label": table.column(label_column).to_numpy().astype(np.int64),
    }
    return _write(out, columns, shuffle, seed, write_options, path, FEATURE_ROLES)
