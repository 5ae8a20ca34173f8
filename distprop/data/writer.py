"""Writing datasets: a directory of Parquet (or Arrow IPC) files in distprop's layout.

Defaults come from measurements on the development machine (2 cores, pyarrow 26,
20k-sample 3x32x32 float32 and 60k-sample 28x28 uint8 sets, one thread decoding
row groups):

* tensors as non-nullable ``FixedSizeList`` with shape metadata: 1.1-1.3 GB/s,
  against about 0.9 for the same data as nullable lists, 0.9 as the
  ``fixed_shape_tensor`` extension type and 0.6 as polars-style nested lists.
  (Raw bytes as ``FixedSizeBinary`` decode at 4-5 GB/s, but every other tool then
  sees opaque bytes instead of arrays, so distprop does not write them.)
* no compression: on float data that does not compress, snappy and lz4 cost 5-15%
  and zstd half the speed; on uint8 images, which they shrink 4.5x (zstd 7.7x),
  snappy decodes 3x slower, lz4 1.7x, zstd 2.2x. Choose ``compression="zstd"``
  when disk or network matters more than decode time;
* 1024-row row groups: as fast as larger ones, and small enough that a shuffle
  window of a few row groups stays within tens of megabytes;
* ``format="ipc"`` (uncompressed Arrow IPC, memory-mapped when read) skips decoding
  entirely: tens of GB/s from the page cache. Parquet stays the default because
  every tool reads it and it is what object stores and data lakes hold.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distprop.data.format import SHAPE_KEY, arrow_column, roles_metadata
from distprop.data.storage import Location, dataset_files_under, resolve
from distprop.errors import ConfigError, DataError

PARQUET_COMPRESSIONS = ("none", "snappy", "zstd", "lz4", "gzip", "brotli")
IPC_COMPRESSIONS = ("none", "lz4", "zstd")


class DatasetWriter:
    """Writes a dataset incrementally; call `write` with chunks of samples, then `close`
    (or use it as a context manager). Row groups hold exactly `row_group_size` rows
    whatever the chunk sizes (except the last of each file), and a new file starts
    every `rows_per_file` rows (None: a single file).

    `path` is a directory (created if needed) or a ``pyarrow.fs`` URI. A directory
    that already holds dataset files is refused unless ``overwrite=True``, which
    deletes those files first (other files are left alone).

    `metadata` goes into the schema as it is; `roles` records which column is the
    model's input and which its label (``{"input": "image", "label": "label"}``), so
    that `distprop train` needs no column options for the dataset.
    """

    def __init__(self, path, *, rows_per_file: int | None = None, row_group_size: int = 1024,
                 compression: str = "none", format: str = "parquet", tensor_type: str = "list",
                 overwrite: bool = False, filesystem: pafs.FileSystem | None = None,
                 metadata: Mapping[str, str] | None = None, roles: Mapping[str, str] | None = None):
        if format not in ("parquet", "ipc"):
            raise ConfigError(f"format must be 'parquet' or 'ipc', not {format!r}")
        allowed = PARQUET_COMPRESSIONS if format == "parquet" else IPC_COMPRESSIONS
        if compression not in allowed:
            raise ConfigError(f"compression for {format} must be one of {', '.join(allowed)}, not {compression!r}")
        if row_group_size < 1 or (rows_per_file is not None and rows_per_file < 1):
            raise ConfigError(f"row_group_size and rows_per_file must be >= 1 (got {row_group_size}, "
                              f"{rows_per_file})")
        if tensor_type not in ("list", "fixed_shape_tensor"):
            raise ConfigError(f"tensor_type must be 'list' or 'fixed_shape_tensor', not {tensor_type!r}")
        self.location = resolve(path, filesystem)
        self.rows_per_file, self.row_group_size = rows_per_file, row_group_size
        self.compression, self.format, self.tensor_type = compression, format, tensor_type
        self.metadata = dict(metadata or {})  # the schema's key/value metadata (class names, tokenizer)
        self.roles = dict(roles or {})
        self.files: list[str] = []
        self._schema: pa.Schema | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file_writer = None
        self._file_stream = None
        self._file_rows = 0
        _prepare_directory(self.location, overwrite)

    def write(self, columns: Mapping[str, np.ndarray]) -> None:
        """Append samples: `columns` maps each column name to an array whose first axis
        is the sample axis (same length for all; same names, dtypes and per-sample
        shapes as earlier chunks)."""
        table = self._to_table(columns)
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            self._flush(final=False)

    def close(self) -> list[str]:
        """Write what is buffered, close the last file; returns the files written.
        Without any rows, one empty file still records the columns."""
        self._flush(final=True)
        if not self.files and self._schema is not None:
            self._open_file()
        self._close_file()
        return self.files

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            self.close()
        else:
            self._close_file()

    def _to_table(self, columns: Mapping[str, np.ndarray]) -> pa.Table:
        if not columns:
            raise DataError(f"{self.location.display}: no columns to write")
        # Arrow arrays (encoded images, token lists) are written as they are.
        arrays = {name: values if isinstance(values, pa.Array) else np.asarray(values)
                  for name, values in columns.items()}
        check_same_length(arrays, self.location.display)
        fields, data = [], []
        for name, values in arrays.items():
            if isinstance(values, pa.Array):
                field, array = pa.field(name, values.type), values
            else:
                try:
                    field, array = arrow_column(name, values, self.tensor_type)
                except DataError as error:
                    raise DataError(f"{self.location.display}: {error}") from None
            fields.append(field)
            data.append(array)
        metadata = {**self.metadata, **roles_metadata(self.roles, arrays, self.location.display)} \
            if self.roles else self.metadata
        schema = pa.schema(fields, metadata=metadata or None)
        if self._schema is None:
            self._schema = schema
        elif not schema.equals(self._schema, check_metadata=True):
            raise DataError(f"{self.location.display}: this chunk's columns ({_describe(schema)}) differ "
                            f"from the first chunk's ({_describe(self._schema)})")
        return pa.Table.from_arrays(data, schema=schema)

    def _flush(self, final: bool) -> None:
        while self._pending_rows >= self.row_group_size or (final and self._pending_rows):
            if self._file_writer is None:
                self._open_file()
            room = self.row_group_size
            if self.rows_per_file is not None:
                room = min(room, self.rows_per_file - self._file_rows)
            pending = pa.concat_tables(self._pending)
            take = min(room, self._pending_rows)
            self._write_row_group(pending.slice(0, take).combine_chunks())
            rest = pending.slice(take)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            self._file_rows += take
            if self.rows_per_file is not None and self._file_rows >= self.rows_per_file:
                self._close_file()

    def _open_file(self) -> None:
        suffix = ".parquet" if self.format == "parquet" else ".arrow"
        path = f"{self.location.path.rstrip('/')}/part-{len(self.files):05d}{suffix}"
        self._file_stream = self.location.filesystem.open_output_stream(path)
        scalar_columns = [f.name for f in self._schema if pa.types.is_primitive(f.type)]
        if self.format == "parquet":
            # Statistics and dictionaries help scalar columns; for tensors, lists and bytes they only cost time.
            self._file_writer = pq.ParquetWriter(self._file_stream, self._schema, compression=self.compression,
                                                 use_dictionary=scalar_columns, write_statistics=scalar_columns)
        else:
            codec = None if self.compression == "none" else self.compression
            self._file_writer = pa.ipc.new_file(self._file_stream, self._schema,
                                                options=pa.ipc.IpcWriteOptions(compression=codec))
        self._file_rows = 0
        self.files.append(path)

    def _write_row_group(self, table: pa.Table) -> None:
        if self.format == "parquet":
            self._file_writer.write_table(table, row_group_size=table.num_rows)
        else:
            self._file_writer.write_table(table, max_chunksize=table.num_rows)

    def _close_file(self) -> None:
        if self._file_writer is not None:
            self._file_writer.close()
            self._file_stream.close()
            self._file_writer = self._file_stream = None


def check_same_length(columns: Mapping[str, np.ndarray], where: str) -> int:
    """The common number of rows of `columns` (arrays); DataError naming `where` and the
    first column whose length differs."""
    def ndim(values) -> int:
        return 1 if isinstance(values, pa.Array) else np.ndim(values)

    first = next(iter(columns))
    rows = len(columns[first]) if ndim(columns[first]) else None
    for name, values in columns.items():
        if ndim(values) == 0 or len(values) != rows:
            found = "a 0-d array" if ndim(values) == 0 else f"{len(values)} rows"
            expected = "a 0-d array" if rows is None else f"{rows}"
            raise DataError(f"{where}: column {name!r} has {found} but column {first!r} has {expected}")
    return rows


def write_dataset(path, columns: Mapping[str, np.ndarray], *, rows_per_file: int | None = None,
                  row_group_size: int = 1024, compression: str = "none", format: str = "parquet",
                  tensor_type: str = "list", overwrite: bool = False, filesystem=None,
                  roles: Mapping[str, str] | None = None) -> list[str]:
    """Write `columns` (name -> array, first axis = samples, equal lengths) as a dataset
    directory at `path` and return the files written.

    Arrays of rank >= 2 become tensor columns holding their per-sample shape; 1-D
    arrays become scalar columns (use integer arrays for labels). See `DatasetWriter`
    for the options and the module docstring for why the defaults are what they are.
    """
    with DatasetWriter(path, rows_per_file=rows_per_file, row_group_size=row_group_size,
                       compression=compression, format=format, tensor_type=tensor_type,
                       overwrite=overwrite, filesystem=filesystem, roles=roles) as writer:
        writer.write(columns)
    return writer.files


def _prepare_directory(location: Location, overwrite: bool) -> None:
    filesystem = location.filesystem
    info = filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.File:
        raise DataError(f"{location.display}: is a file; a dataset is written as a directory")
    if info.type == pafs.FileType.Directory:
        existing = dataset_files_under(location)  # the files a loader would read
        if existing and not overwrite:
            raise DataError(f"{location.display}: already holds a dataset ({len(existing)} files); "
                            "pass overwrite=True (--overwrite) to replace it")
        for path in existing:
            filesystem.delete_file(path)
    else:
        filesystem.create_dir(location.path, recursive=True)


def _describe(schema: pa.Schema) -> str:
    def one(field: pa.Field) -> str:
        shape = (field.metadata or {}).get(SHAPE_KEY)
        return f"{field.name}: {field.type}" + (f" shape {shape.decode()}" if shape else "")
    return ", ".join(one(f) for f in schema)
