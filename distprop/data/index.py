"""The dataset index: files, their blocks and row counts, and one checked schema.

Everything here comes from file footers (Parquet) or the IPC file's schema and
record batches, so building the index costs the same on every rank. For Parquet and
for uncompressed IPC files on a local disk (memory-mapped) no data is read; pyarrow
has no way to count an IPC record batch's rows without loading it, so compressed
IPC files are decompressed, and remote ones read, once here. A *block* is the unit
read at once: a Parquet row group or an IPC record batch. Global row ``i`` is row
``i - block_starts[b]`` of the block ``b`` that holds it, blocks numbered in file
order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distprop.data.format import ARRAY, LIST, ColumnSpec, column_spec, first_row_shape, list_to_numpy, read_roles
from distprop.data.storage import Location, dataset_kind, first_line, list_dataset_files, open_input, resolve
from distprop.errors import ConfigError, DataError

# columns=: None (all), a list of names, or {name: (dtype or None, shape or None)}
ColumnsArg = None | Sequence[str] | Mapping[str, tuple]


@dataclass(frozen=True)
class DataFile:
    """One file of the dataset."""

    location: Location
    kind: str                        # "parquet" or "ipc"
    metadata: pq.FileMetaData | None  # the Parquet footer, reused so readers skip re-parsing it


@dataclass(frozen=True)
class Block:
    """One row group (Parquet) or record batch (IPC) with at least one row."""

    file: int        # position in DatasetIndex.files
    part: int        # row-group / record-batch number inside the file
    num_rows: int

    def describe(self, index: "DatasetIndex") -> str:
        unit = "row group" if index.files[self.file].kind == "parquet" else "record batch"
        return f"{index.files[self.file].location.display} ({unit} {self.part})"


class DatasetIndex:
    """Files, blocks and column specs of a dataset, checked for consistency.

    Build it with `DatasetIndex.open`. `fingerprint` is a short hash of the file names
    (relative to the dataset root), the row count of every block and the selected
    columns' dtypes and shapes: ranks that compare equal fingerprints see the same
    dataset, so the same permutation selects the same samples everywhere.
    """

    def __init__(self, location: Location, files: list[DataFile], blocks: list[Block],
                 columns: dict[str, ColumnSpec], roles: dict[str, str] | None = None):
        self.location = location
        self.roles = roles or {}  # role -> column, as the first file records them (format.read_roles)
        self.files = files
        self.blocks = blocks
        self.columns = columns
        self.block_rows = np.array([b.num_rows for b in blocks], dtype=np.int64)
        self.block_starts = np.concatenate([[0], np.cumsum(self.block_rows)[:-1]]).astype(np.int64)
        self.num_rows = int(self.block_rows.sum())
        self.fingerprint = self._fingerprint()

    @classmethod
    def open(cls, path_or_uri, columns: ColumnsArg = None, filesystem=None,
             sequences: Sequence[str] = ()) -> "DatasetIndex":
        """Index the dataset at a path or URI (a directory searched recursively, or one
        file); raises DataError naming the file (and column) for anything unreadable,
        inconsistent across files, or not as `columns` expects.

        Variable-length list columns are tensors whose shape is read from the first
        row (the first block is checked whole here, every other block when it is
        read), except those named in `sequences`, which keep rows of any length."""
        location = resolve(path_or_uri, filesystem)
        wanted, expected = _normalize_columns(columns)
        files, blocks, specs = [], [], None
        for number, file_location in enumerate(list_dataset_files(location)):
            data_file, schema, block_rows = read_footer(file_location)
            file_specs = _select_columns(schema, wanted, file_location.display)
            if specs is None:
                specs, first = file_specs, file_location.display
                roles = read_roles(schema, first)
            else:
                _check_same_columns(file_specs, specs, file_location.display, first, strict_names=wanted is None)
            files.append(data_file)
            blocks.extend(Block(number, part, rows) for part, rows in enumerate(block_rows) if rows > 0)
        if not blocks:
            raise DataError(f"{location.display}: the dataset has no rows")
        for name in sequences:
            if name not in specs or specs[name].kind != LIST or specs[name].dtype.kind not in "iu":
                found = specs[name].describe() if name in specs else "no such column"
                raise DataError(f"{first}: column {name!r} should hold token sequences (lists of integers); "
                                f"found {found}")
        specs = {name: _list_shape(spec, files[blocks[0].file], blocks[0])
                 if spec.kind == LIST and name not in sequences else spec for name, spec in specs.items()}
        _check_expected(specs, expected, first)
        return cls(location, files, blocks, specs, roles)

    def block_of_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block number, row within that block) for each global row id."""
        block = np.searchsorted(self.block_starts, rows, side="right") - 1
        return block, rows - self.block_starts[block]

    def _fingerprint(self) -> str:
        root = self.location.path.rstrip("/")
        names = [f.location.path[len(root):].lstrip("/") or f.location.path.rsplit("/", 1)[-1]
                 for f in self.files]
        plan = {
            "files": names,
            "blocks": [[b.file, b.part, b.num_rows] for b in self.blocks],
            # The kind is named only where it is not a plain array, so that fingerprints
            # (and the loader states saved with them) of numeric datasets stay as they were.
            "columns": [[s.name, s.dtype.str, None if s.shape is None else list(s.shape)]
                        + ([s.kind] if s.kind != ARRAY else []) for s in self.columns.values()],
        }
        return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _normalize_columns(columns: ColumnsArg) -> tuple[list[str] | None, dict[str, tuple]]:
    if columns is None:
        return None, {}
    if isinstance(columns, str):
        raise ConfigError(f"columns must be a list of names or a mapping, not the string {columns!r}")
    if isinstance(columns, Mapping):
        expected = {}
        for name, expectation in columns.items():
            dtype, shape = expectation if expectation is not None else (None, None)
            expected[name] = (None if dtype is None else np.dtype(dtype),
                              None if shape is None else tuple(int(d) for d in shape))
        return list(columns), expected
    names = list(columns)
    if not names:
        raise ConfigError("columns is empty: name at least one column (or pass None for all)")
    if len(set(names)) != len(names):
        raise ConfigError(f"columns names a column twice: {names}")
    return names, {}


def read_footer(location: Location) -> tuple[DataFile, pa.Schema, list[int]]:
    kind = dataset_kind(location.path)
    try:
        with open_input(location, memory_map=kind == "ipc") as source:
            if kind == "parquet":
                parquet = pq.ParquetFile(source)
                metadata = parquet.metadata
                rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
                return DataFile(location, kind, metadata), parquet.schema_arrow, rows
            reader = pa.ipc.open_file(source)
            rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            return DataFile(location, kind, None), reader.schema, rows
    except (pa.ArrowException, OSError, ValueError) as error:
        what = "Parquet" if kind == "parquet" else "Arrow IPC"
        raise DataError(f"{location.display}: not a readable {what} file ({first_line(error)})") from None


def read_block_columns(data_file: DataFile, part: int, names: list[str]) -> pa.Table:
    """Columns `names` of one block, opened for this one read."""
    with open_input(data_file.location, memory_map=data_file.kind == "ipc") as source:
        if data_file.kind == "parquet":
            return pq.ParquetFile(source, metadata=data_file.metadata).read_row_group(
                part, columns=names, use_threads=False)
        return pa.ipc.open_file(source).get_batch(part).select(names)


def _list_shape(spec: ColumnSpec, data_file: DataFile, block: Block) -> ColumnSpec:
    """`spec` with the shape of its column's first row, after checking that the rest
    of the first block matches it."""
    where = f"{data_file.location.display} ({'row group' if data_file.kind == 'parquet' else 'record batch'} " \
            f"{block.part})"
    try:
        column = read_block_columns(data_file, block.part, [spec.name]).column(0)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise DataError(f"{where}: cannot read column {spec.name!r} ({first_line(error)})") from None
    if column.null_count:
        raise DataError(f"{where}: column {spec.name!r} has null lists")
    resolved = ColumnSpec(spec.name, spec.dtype, first_row_shape(column), LIST)
    try:
        list_to_numpy(column, resolved, where)
    except DataError as error:
        raise DataError(f"{error}; variable-length lists are tensors only when every row has the same "
                        "length (for token sequences ask the loader for sequence_length=...)") from None
    return resolved


def _select_columns(schema: pa.Schema, wanted: list[str] | None, where: str) -> dict[str, ColumnSpec]:
    names = schema.names if wanted is None else wanted
    specs = {}
    for name in names:
        if schema.get_field_index(name) < 0:
            raise DataError(f"{where}: no column {name!r} (columns: {', '.join(schema.names)})")
        specs[name] = column_spec(schema.field(name), where)
    return specs


def _check_expected(specs: dict[str, ColumnSpec], expected: dict[str, tuple], where: str) -> None:
    for name, (dtype, shape) in expected.items():
        spec = specs[name]
        if dtype is not None and spec.dtype != dtype:
            raise DataError(f"{where}: column {name!r} has dtype {spec.dtype}, expected {dtype}")
        if shape is not None and spec.shape != shape:
            raise DataError(f"{where}: column {name!r} has per-sample shape {spec.shape}, expected {shape}")


def _check_same_columns(specs: dict[str, ColumnSpec], reference: dict[str, ColumnSpec], where: str,
                        first: str, strict_names: bool) -> None:
    if strict_names and set(specs) != set(reference):
        missing = [n for n in reference if n not in specs]
        extra = [n for n in specs if n not in reference]
        detail = "; ".join(part for part in (f"missing {missing}" if missing else "",
                                             f"extra {extra}" if extra else "") if part)
        raise DataError(f"{where}: columns differ from {first} ({detail})")
    for name, spec in specs.items():
        if spec != reference[name]:
            raise DataError(f"{where}: column {name!r} is {spec.describe()} but {first} has "
                            f"{reference[name].describe()}")
