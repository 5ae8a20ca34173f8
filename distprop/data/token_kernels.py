"""Compiled (numba) kernels of `distprop.data.tokens`: end-of-document tokens inserted
in one pass, and packed windows written with their document ids and positions in
one pass per window.

numpy does the same with a boolean mask over each block, and per block of a unit
of batches with a few dozen small calls (the takes, then the document-id segments
through np.repeat) whose fixed cost outweighs the copying (see `PackedAssembler`);
the results are the same, which the tests hold with and without numba. Imported
only where tokens are packed; compiled code is cached on disk beside this file or
in numba's cache directory.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def insert_end_tokens(values, offsets, eos, out):
    """`out` = document i (``values[offsets[i] - offsets[0]:offsets[i + 1] - offsets[0]]``)
    followed by `eos`, for every document, back to back."""
    base = offsets[0]
    for i in range(len(offsets) - 1):
        lo, hi = offsets[i] - base, offsets[i + 1] - base
        out[lo + i:hi + i] = values[lo:hi]
        out[hi + i] = eos


@njit(cache=True, nogil=True)
def gather_windows(tokens, starts, first, numbers, rows, fitting, length, input_ids, labels, document_ids,
                   positions):
    """Row ``rows[k]`` of the outputs from window ``numbers[k]`` of a block (`tokens`, its
    documents starting at `starts`), which starts at ``first + numbers[k] * length``;
    windows that run past the block's end (``numbers[k] >= fitting``) are left to the
    caller. `document_ids` and `positions` may be None. Returns how many were left."""
    left = 0
    for k in range(len(numbers)):
        if numbers[k] >= fitting:
            left += 1
            continue
        start, row = first + numbers[k] * length, rows[k]
        input_ids[row, :] = tokens[start:start + length]
        labels[row, :] = tokens[start + 1:start + 1 + length]
        document = np.searchsorted(starts, start, side="right") - 1
        column = number = 0
        while column < length:  # one segment per document the window touches
            end = min(starts[document + 1] - start, length)
            if document_ids is not None:
                document_ids[row, column:end] = number
            if positions is not None:
                offset = start - starts[document]
                for j in range(column, end):
                    positions[row, j] = j + offset
            column, number, document = end, number + 1, document + 1
    return left
