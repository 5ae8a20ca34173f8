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
            raise DataError(f"{display}: cannot open this URI ({_first_line(error)})") from None
        return Location(filesystem, path, display)
    return Location(pafs.LocalFileSystem(), os.path.abspath(display), display)


def dataset_kind(path: str) -> str | None:
    """'parquet', 'ipc', or None for a file that is not part of a dataset."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.startswith((".", "_")):  # hidden files, _SUCCESS, _common_metadata, ...
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
        raise DataError(f"{location.display}: cannot access ({_first_line(error)})") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{location.display}: no such file or directory")
    if info.type == pafs.FileType.File:
        if dataset_kind(location.path) is None:
            raise DataError(f"{location.display}: not a dataset file (expected a name ending in "
                            f"{', '.join(PARQUET_SUFFIXES + IPC_SUFFIXES)})")
        return [location]
    try:
        entries = location.filesystem.get_file_info(pafs.FileSelector(location.path, recursive=True))
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{location.display}: cannot list directory ({_first_line(error)})") from None
    paths = sorted(e.path for e in entries if e.type == pafs.FileType.File and dataset_kind(e.path))
    if not paths:
        raise DataError(f"{location.display}: directory holds no .parquet, .arrow or .feather files")
    return [location.child(p) for p in paths]


def open_input(location: Location, memory_map: bool = False):
    """A random-access file for reading. With `memory_map`, a local file is mapped,
    so uncompressed Arrow IPC data is used in place without a copy. Parquet gains
    nothing from a map (its pages are decoded into new buffers anyway), and a map
    turns a file truncated while in use into SIGBUS instead of an error, so Parquet
    is read through ordinary file reads."""
    if memory_map and location.is_local:
        return pa.memory_map(location.path, "r")
    return location.filesystem.open_input_file(location.path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
