"""The checkpoint package's error."""

from distprop.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be written, found, read or applied (one line: what and where)."""
