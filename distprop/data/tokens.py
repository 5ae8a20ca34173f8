"""Token sequences: a ``list<int>`` column of token ids, one document per row.

Packed (``pack=True``), the GPT-style pre-training layout: the documents, each
followed by `eos_token` if one is given, are concatenated in dataset order into
one token stream T, and sample ``s`` is the window ``T[s*L : s*L + L + 1]``:
``input_ids = window[:-1]``, ``labels = window[1:]``. Consecutive windows share
one token (as Megatron-LM's GPT dataset does), so every token but the first is a
label exactly once; windows cross document boundaries. ``document_ids`` (which
document each input token belongs to, numbered from 0 within the sample) and
``positions`` (the token's place in its document, restarting at 0) let attention
and position embeddings stay within documents (Megatron's reset_attention_mask /
reset_position_ids, torchtitan's document masking).

Where the windows lie is a pure function of each block's token count, read from
the Parquet footer (the token column's value count) or an IPC file's offsets, so
the loader's sampler shuffles and shards *windows* exactly as it does rows, and its
state stays a few integers: no token buffer to save, resuming and re-sharding on
another world size are exact. A block whose rows disagree with its footer's count
(an empty or null document) is refused when it is read, naming the row.

Padded (``pack=False``): each row is a sample, ``input_ids`` padded to L with
`pad_token` and an ``attention_mask`` (True on real tokens); a longer document is
an error unless ``truncate=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distprop.data.format import VarRows, sequence_rows
from distprop.data.index import DatasetIndex
from distprop.data.storage import first_line, open_input
from distprop.errors import ConfigError, DataError


@dataclass(frozen=True)
class TokenOptions:
    """What the loader was asked for (see `ArrowLoader`)."""

    column: str
    sequence_length: int
    pack: bool = True
    eos_token: int | None = None
    pad_token: int = 0
    vocab_size: int | None = None
    document_ids: bool = True
    positions: bool = False
    truncate: bool = False

    def __post_init__(self):
        for name in ("sequence_length", "vocab_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eos_token", "pad_token"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 0 or (self.vocab_size is not None and value >= self.vocab_size)):
                raise ConfigError(f"{name} must be a token id in 0..{(self.vocab_size or 2**31) - 1}, got {value!r}")

    def outputs(self, dtype: np.dtype) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Output columns and their per-sample dtype and shape."""
        length = (self.sequence_length,)
        if self.pack:
            out = {"input_ids": (dtype, length), "labels": (dtype, length)}
            if self.document_ids:
                out["document_ids"] = (np.dtype(np.int32), length)
            if self.positions:
                out["positions"] = (np.dtype(np.int32), length)
            return out
        return {"input_ids": (dtype, length), "attention_mask": (np.dtype(np.bool_), length)}


def block_token_counts(index: DatasetIndex, column: str) -> np.ndarray:
    """Tokens in each block, before end-of-document tokens: the Parquet footer's value
    count of the column's leaf, or the offsets of an IPC record batch."""
    counts = np.zeros(len(index.blocks), np.int64)
    for number, block in enumerate(index.blocks):
        data_file = index.files[block.file]
        if data_file.kind == "parquet":
            counts[number] = _parquet_value_count(data_file.metadata, block.part, column,
                                                  data_file.location.display)
        else:
            counts[number] = _ipc_value_count(data_file, block.part, column)
    return counts


def _parquet_value_count(metadata, part: int, column: str, where: str) -> int:
    row_group = metadata.row_group(part)
    leaves = [i for i in range(row_group.num_columns)
              if row_group.column(i).path_in_schema.split(".")[0] == column]
    if len(leaves) != 1:
        raise DataError(f"{where}: column {column!r} should be one list of integers, found {len(leaves)} "
                        "leaf columns")
    return int(row_group.column(leaves[0]).num_values)


def _ipc_value_count(data_file, part: int, column: str) -> int:
    try:
        with open_input(data_file.location, memory_map=True) as source:
            array = pa.ipc.open_file(source).get_batch(part).column(column)
            offsets = array.offsets
            return int(offsets[len(offsets) - 1].as_py() - offsets[0].as_py())
    except (pa.ArrowException, OSError, ValueError) as error:
        raise DataError(f"{data_file.location.display} (record batch {part}): cannot read ({first_line(error)})") \
            from None


class PackedLayout:
    """Where the packed windows lie: block ``b`` holds tokens ``token_starts[b]`` up to
    ``token_starts[b + 1]`` of T (end-of-document tokens included), and the windows
    that *start* in it are its samples (``samples_per_block[b]`` of them)."""

    def __init__(self, index: DatasetIndex, options: TokenOptions):
        self.options = options
        self.block_tokens = block_token_counts(index, options.column)
        if options.eos_token is not None:
            self.block_tokens = self.block_tokens + index.block_rows
        self.token_starts = np.concatenate([[0], np.cumsum(self.block_tokens)]).astype(np.int64)
        length = options.sequence_length
        total = int(self.token_starts[-1])
        self.num_samples = max(0, (total - 1) // length)
        first = -(-self.token_starts[:-1] // length)  # first window starting at or after the block start
        end = np.minimum(-(-self.token_starts[1:] // length), self.num_samples)
        self.samples_per_block = np.maximum(end - first, 0)
        if self.num_samples == 0:
            raise DataError(f"{index.location.display}: column {options.column!r} holds {total} tokens, "
                            f"fewer than one window of sequence_length + 1 = {length + 1}")


@dataclass
class TokenBlock:
    """One block's documents. Packed: one stretch of T, `tokens` with end-of-document
    tokens inserted, and for each token its document (row in the block) and place in
    it. Padded: the documents' tokens back to back, row i at
    ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray
    document: np.ndarray | None = None
    position: np.ndarray | None = None
    offsets: np.ndarray | None = None


def check_documents(rows: VarRows, options: TokenOptions, where: str, column: str) -> None:
    """Refuse null or empty documents and token ids outside the vocabulary, naming the row."""
    if rows.valid is not None and not rows.valid.all():
        raise DataError(f"{where} row {int(np.flatnonzero(~rows.valid)[0])}: column {column!r} holds a null "
                        "document")
    lengths = np.diff(rows.offsets)
    if len(lengths) and lengths.min() == 0:
        raise DataError(f"{where} row {int(np.flatnonzero(lengths == 0)[0])}: column {column!r} holds an empty "
                        "document")
    if options.vocab_size is not None and len(rows.values):
        bad = np.flatnonzero((rows.values < 0) | (rows.values >= options.vocab_size))
        if len(bad):
            row = int(np.searchsorted(rows.offsets, bad[0], side="right")) - 1
            raise DataError(f"{where} row {row}: column {column!r} holds token id {int(rows.values[bad[0]])}, "
                            f"outside the vocabulary 0..{options.vocab_size - 1}")


def read_token_block(column, spec, options: TokenOptions, where: str, expected_tokens: int | None) -> TokenBlock:
    """A block of the token column, checked, as a stretch of T (packing) or as rows."""
    rows = sequence_rows(column, spec, where)
    check_documents(rows, options, where, options.column)
    if not options.pack:
        return TokenBlock(rows.values, offsets=rows.offsets)
    count = len(rows)
    eos = options.eos_token is not None
    lengths = np.diff(rows.offsets) + eos
    total = int(lengths.sum())
    if expected_tokens is not None and total != expected_tokens:
        raise DataError(f"{where}: column {options.column!r} holds {total} tokens but the file's footer counts "
                        f"{expected_tokens} (was the file changed after the loader was built?)")
    if eos:
        tokens = np.empty(total, rows.values.dtype)
        ends = rows.offsets[1:] + np.arange(count)  # where each document's end token goes
        keep = np.ones(total, bool)
        keep[ends] = False
        tokens[keep] = rows.values
        tokens[ends] = options.eos_token
    else:
        tokens = rows.values
    document = position = None
    if options.document_ids or options.positions:
        document = np.repeat(np.arange(count, dtype=np.int64), lengths)
    if options.positions:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        position = (np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32)
    return TokenBlock(tokens, document, position)


class PackedAssembler:
    """Fills packed samples from token blocks, fetched through `block(b)` (which returns
    the prepared block ``b`` of the dataset, with its TokenBlock under the column's name)."""

    def __init__(self, index: DatasetIndex, layout: PackedLayout):
        self.index, self.layout, self.options = index, layout, layout.options
        self.sample_starts = np.concatenate([[0], np.cumsum(layout.samples_per_block)]).astype(np.int64)

    def sample_ids(self, block: int, local: np.ndarray) -> np.ndarray:
        """Window numbers of the `local`-th windows starting in `block`."""
        first = -(-int(self.layout.token_starts[block]) // self.options.sequence_length)
        return first + local

    def fill(self, sample: int, block_of, out: dict[str, np.ndarray], j: int) -> None:
        """Write window `sample` into row `j` of the output arrays."""
        length = self.options.sequence_length
        start, stop = sample * length, sample * length + length + 1
        block = int(np.searchsorted(self.layout.token_starts, start, side="right")) - 1
        pieces, documents, positions = [], [], []
        while start < stop:
            tokens = block_of(block)[self.options.column]
            offset = start - int(self.layout.token_starts[block])
            take = min(stop - start, len(tokens.tokens) - offset)
            if take > 0:
                pieces.append(tokens.tokens[offset:offset + take])
                if tokens.document is not None:
                    documents.append(tokens.document[offset:offset + take] + int(self.index.block_starts[block]))
                if tokens.position is not None:
                    positions.append(tokens.position[offset:offset + take])
                start += take
            block += 1
        window = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        out["input_ids"][j] = window[:-1]
        out["labels"][j] = window[1:]
        if "document_ids" in out:
            document = documents[0] if len(documents) == 1 else np.concatenate(documents)
            out["document_ids"][j] = document[:-1] - document[0]
        if "positions" in out:
            out["positions"][j] = (positions[0] if len(positions) == 1 else np.concatenate(positions))[:-1]


def fill_padded(tokens: TokenBlock, row: int, options: TokenOptions, out: dict[str, np.ndarray], j: int,
                where: str) -> None:
    """Write one document, padded to sequence_length, into row `j` of the outputs."""
    document = tokens.tokens[tokens.offsets[row]:tokens.offsets[row + 1]]
    eos = options.eos_token is not None
    length = len(document) + eos
    limit = options.sequence_length
    if length > limit and not options.truncate:
        raise DataError(f"{where} row {row}: column {options.column!r} holds a document of {length} tokens"
                        f"{' (end token included)' if eos else ''}, longer than sequence_length {limit} "
                        "(pass truncate=True to cut it, or pack=True)")
    ids, mask = out["input_ids"][j], out["attention_mask"][j]
    kept = min(len(document), limit)
    ids[:kept] = document[:kept]
    if eos and kept < limit:
        ids[kept] = options.eos_token
        kept += 1
    ids[kept:] = options.pad_token
    mask[:kept] = True
    mask[kept:] = False
