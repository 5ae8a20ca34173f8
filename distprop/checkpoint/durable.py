"""Writing files so that a crash leaves either the old content or the new, never a mix.

POSIX makes `rename` atomic, not durable: until the file's data and the directory
entry are on disk, a power loss can leave a renamed but empty file (PostgreSQL's
`durable_rename` and LevelDB fsync both the file before and the directory after).
Temporary names live in the destination's own directory: a rename across file
systems fails (EXDEV), and a system temp directory may be small.
"""

from __future__ import annotations

import os
import uuid


def fsync_path(path) -> None:
    """Flush a file's (or a directory's entries') data to the storage device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(directory, name: str, kind: str = "tmp") -> str:
    """A hidden, unique name beside `name` in `directory`: `.NAME.KIND-xxxxxxxx`."""
    return os.path.join(directory, f".{name}.{kind}-{uuid.uuid4().hex[:8]}")


def write_text_durably(path, text: str) -> None:
    """Write a small file in full or not at all: into a temporary file in the same
    directory, fsynced, renamed over `path`, then the directory fsynced."""
    directory, name = os.path.split(os.path.abspath(path))
    temporary = temporary_name(directory, name)
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_path(directory)
