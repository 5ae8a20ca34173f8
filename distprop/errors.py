"""Exceptions for mistakes in the user's input.

They carry a one-line message that names what is wrong and where (file, column,
parameter, rank). The command line prints that line and exits non-zero instead of
showing a traceback from deep inside a library.
"""


class UserError(Exception):
    """Bad input from the user: a file, a config value, an argument."""


class DataError(UserError, ValueError):
    """A dataset that cannot be read as asked: missing, corrupt, wrong schema, too small."""


class ConfigError(UserError, ValueError):
    """A configuration value or combination that cannot work."""
