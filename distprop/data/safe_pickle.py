"""Loading pickle files that should hold only plain data and numpy arrays.

The CIFAR-10 "python version" batches are pickles. Unpickling calls whatever
functions the file names, so a tampered file could run arbitrary code; the project
rule is no unrestricted pickle for data read from disk. This unpickler resolves
only the few globals that plain containers and numpy arrays need, and refuses
everything else before it is called.
"""

from __future__ import annotations

import pickle

import numpy as np

_ARRAY_RECONSTRUCT = np.zeros(1).__reduce__()[0]     # numpy's _reconstruct (protocols 0-4)
_ARRAY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numpy's _frombuffer (protocol 5)


def _latin1_bytes(text, encoding):
    """Python 3 writes a bytes object in protocol 2 as ``_codecs.encode(text, "latin1")``.
    Only that call is allowed: `codecs.encode` itself would let a file pick any codec
    (zlib, bz2, ...) and feed it any object."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode other than a string to latin1 bytes")
    return text.encode("latin1")


def _empty_bytes():
    """Python 3 writes an empty bytes object in protocol 2 as ``bytes()``; no
    arguments allowed (``bytes(n)`` would allocate whatever size the file asks)."""
    return b""


# (module, name) as written in the pickle -> the object it may resolve to. numpy 1
# wrote "numpy.core", numpy 2 writes "numpy._core"; old files must keep loading.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _ARRAY_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _ARRAY_FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,  # protocol 2 names builtins as Python 2 did
}


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data and "
                                         "numpy arrays are allowed") from None


def load_data_pickle(file) -> object:
    """Unpickle `file` (a binary file object) allowing only containers, numbers,
    strings, bytes and numpy arrays. Python 2 strings come back as bytes."""
    return _DataOnlyUnpickler(file, encoding="bytes").load()
