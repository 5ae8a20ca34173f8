"""Where dataset files live: local paths and pyarrow filesystem URIs.

A location is resolved once into a `pyarrow.fs.FileSystem` and a path on it, so the
rest of the package has one code path for local disks, ``file://`` URIs and object
stores (``s3://``, ``gs://``, ``hdfs://``: whatever `pyarrow.fs.FileSystem.from_uri`
knows). Only local files are memory-mapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from distprop.errors import DataError

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
IPC_SUFFIXES = (".arrow", ".feather", ".ipc")


@dataclass(frozen=True)
class Location:
    """A file or directory on a pyarrow filesystem."""

    filesystem: pafs.FileSystem
    path: str
    display: str  # how error messages name it: the path or URI the user gave

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def child(self, path: str) -> "Location":
        """The location of `path` (a full path on the same filesystem)."""
        relative = path[len(self.path):].lstrip("/")
        display = self.display.rstrip("/") + "/" + relative if relative else self.display
        return Location(self.filesystem, path, display)


def resolve(path_or_uri, filesystem: pafs.FileSystem | None = None) -> Location:
    """A Location for a local path, an ``os.PathLike``, or a URI such as ``file:///data``
    or ``s3://bucket/prefix`` (or a path on an explicit `filesystem`)."""
    display = os.fspath(path_or_uri)
    if filesystem is not None:
        return Location(filesystem, display, display)
    if "://" in display:
        try:
            filesystem, path = pafs.FileSystem.from_uri(display)
        except (pa.ArrowException, OSError, ValueError) as error:
            raise DataError(f"{display}: cannot open this URI ({first_line(error)})") from None
        return Location(filesystem, path, display)
    return Location(pafs.LocalFileSystem(), os.path.abspath(display), display)


def _is_hidden(name: str) -> bool:
    # Hidden files and directories, and the _SUCCESS, _common_metadata, _temporary/
    # ... that Spark and Hadoop leave next to the data; pyarrow.dataset skips them too.
    return name.startswith((".", "_"))


def dataset_kind(path: str) -> str | None:
    """'parquet', 'ipc', or None for a file that is not part of a dataset."""
    name = path.rsplit("/", 1)[-1].lower()
    if _is_hidden(name):
        return None
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(IPC_SUFFIXES):
        return "ipc"
    return None


def list_dataset_files(location: Location) -> list[Location]:
    """The dataset files at `location` (one file, or a directory searched recursively),
    sorted by path so every rank lists them in the same order."""
    try:
        info = location.filesystem.get_file_info(location.path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{location.display}: cannot access ({first_line(error)})") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{location.display}: no such file or directory")
    if info.type == pafs.FileType.File:
        if dataset_kind(location.path) is None:
            raise DataError(f"{location.display}: not a dataset file (expected a name ending in "
                            f"{', '.join(PARQUET_SUFFIXES + IPC_SUFFIXES)})")
        return [location]
    try:
        paths = dataset_files_under(location)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{location.display}: cannot list directory ({first_line(error)})") from None
    if not paths:
        raise DataError(f"{location.display}: directory holds no .parquet, .arrow or .feather files")
    return [location.child(p) for p in paths]


def dataset_files_under(location: Location) -> list[str]:
    """Paths of the dataset files in the directory at `location`, recursively and
    sorted, leaving out those inside hidden or underscore directories (a notebook's
    .ipynb_checkpoints/ copy, Spark's _temporary/) so they are not read as data."""
    entries = location.filesystem.get_file_info(pafs.FileSelector(location.path, recursive=True))
    root = location.path.rstrip("/")
    return sorted(e.path for e in entries
                  if e.type == pafs.FileType.File and dataset_kind(e.path)
                  and not any(_is_hidden(part) for part in e.path[len(root):].split("/")[:-1]))


def open_input(location: Location, memory_map: bool = False):
    """A random-access file for reading. With `memory_map`, a local file is mapped,
    so uncompressed Arrow IPC data is used in place without a copy. Parquet gains
    nothing from a map (its pages are decoded into new buffers anyway), and a map
    turns a file truncated while in use into SIGBUS instead of an error, so Parquet
    is read through ordinary file reads."""
    if memory_map and location.is_local:
        return pa.memory_map(location.path, "r")
    return location.filesystem.open_input_file(location.path)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for
    one-line DataErrors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
