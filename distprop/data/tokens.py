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
from functools import cached_property

import numpy as np
import pyarrow as pa

from distprop.data.format import VarRows, list_offsets, sequence_rows
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
        self.first_window = first                                    # its sample id, per block
        self.first_offset = first * length - self.token_starts[:-1]  # where it starts in the block
        if self.num_samples == 0:
            raise DataError(f"{index.location.display}: column {options.column!r} holds {total} tokens, "
                            f"fewer than one window of sequence_length + 1 = {length + 1}")

    def last_block(self, samples: np.ndarray) -> np.ndarray:
        """The last block each of windows `samples` takes tokens from (its label included)."""
        length = self.options.sequence_length
        return np.searchsorted(self.token_starts, samples * length + length, side="right") - 1


class TokenBlock:
    """One block's documents as a stretch of T: packed, each followed by the end token
    (`eos_token`, if any). Made from the rows as read, without a copy; what assembly
    needs is derived from them on first use, by whoever assembles batches (so a reader
    thread only reads):

    * ``tokens``: the stretch of T, ``starts``: where document i starts in it
      (``starts[-1]`` is the end);
    * per token, ``document_index`` (its document's number in the block) and
      ``position`` (its place in its document);
    * `windows`: one of those as the rows of a strided view, one row per window.
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray, eos_token: int | None):
        self.values, self.offsets, self.eos_token = values, offsets, eos_token
        self.size = int(offsets[-1]) + (len(offsets) - 1 if eos_token is not None else 0)
        self._windows: dict[tuple[str, int], np.ndarray] = {}

    @cached_property
    def starts(self) -> np.ndarray:
        if self.eos_token is None:
            return self.offsets
        return self.offsets + np.arange(len(self.offsets))  # each earlier document has gained an end token

    @cached_property
    def tokens(self) -> np.ndarray:
        if self.eos_token is None:
            return self.values
        tokens = np.empty(self.size, self.values.dtype)
        ends = self.starts[1:] - 1
        keep = np.ones(self.size, bool)
        keep[ends] = False
        tokens[keep] = self.values
        tokens[ends] = self.eos_token
        return tokens

    @cached_property
    def document_index(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.starts) - 1, dtype=np.int32), np.diff(self.starts))

    @cached_property
    def position(self) -> np.ndarray:
        return np.arange(self.size, dtype=np.int32) - np.repeat(self.starts[:-1].astype(np.int32),
                                                                np.diff(self.starts))

    def windows(self, name: str, first: int, length: int, shift: int = 0) -> np.ndarray:
        """``name`` (tokens, document_index, position) as ``(windows, length)``: row k is
        ``name[first + shift + k*length:][:length]``, for every window that ends inside
        the block (its label included)."""
        view = self._windows.get((name, shift))
        if view is None:
            array = getattr(self, name)
            count = max(0, (self.size - 1 - first) // length)
            view = self._windows[(name, shift)] = np.lib.stride_tricks.as_strided(
                array[first + shift:], (count, length), (length * array.itemsize, array.itemsize), writeable=False)
        return view


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
        low, high = rows.values.min(), rows.values.max()
        if low < 0 or high >= options.vocab_size:
            bad = np.flatnonzero((rows.values < 0) | (rows.values >= options.vocab_size))
            row = int(np.searchsorted(rows.offsets, bad[0], side="right")) - 1
            raise DataError(f"{where} row {row}: column {column!r} holds token id {int(rows.values[bad[0]])}, "
                            f"outside the vocabulary 0..{options.vocab_size - 1}")


def read_token_block(column, spec, options: TokenOptions, where: str, expected_tokens: int | None) -> TokenBlock:
    """A block of the token column, checked, as a stretch of T (packing) or as rows."""
    rows = sequence_rows(column, spec, where)
    check_documents(rows, options, where, options.column)
    block = TokenBlock(rows.values, rows.offsets, options.eos_token if options.pack else None)
    if options.pack and expected_tokens is not None and block.size != expected_tokens:
        raise DataError(f"{where}: column {options.column!r} holds {block.size} tokens but the file's footer "
                        f"counts {expected_tokens} (was the file changed after the loader was built?)")
    return block


def read_token_head(tables, column_spec, options: TokenOptions, where: str, needed: int) -> TokenBlock:
    """The block's first documents, at least `needed` tokens of T (or all of it), from
    `tables`: its rows from the start, a few at a time. A window starting in the block
    before takes at most sequence_length tokens from this one, so this is all of it
    that window needs; reading the whole row group for it would cost an extra full read
    of the block whenever its own turn is far away in the shuffled order."""
    chunks, tokens = [], 0
    for table in tables:
        for chunk in table.column(options.column).chunks:
            offsets = list_offsets(chunk)
            chunks.append(chunk)
            tokens += int(offsets[-1] - offsets[0]) + (len(chunk) if options.eos_token is not None else 0)
        if tokens >= needed:
            break
    rows = pa.chunked_array(chunks, type=chunks[0].type) if chunks else pa.array([], pa.list_(pa.int32()))
    return read_token_block(rows, column_spec, options, where, None)


class PackedAssembler:
    """Fills packed windows into a batch from token blocks: `block_of(b)` is the
    prepared block ``b`` (its TokenBlock under the token column's name), `head_of(b)`
    the same or only the block's first documents (see `read_token_head`), for the
    blocks that windows run on into."""

    _DERIVED = {"input_ids": ("tokens", 0), "labels": ("tokens", 1), "document_ids": ("document_index", 0),
                "positions": ("position", 0)}

    def __init__(self, layout: PackedLayout):
        self.layout, self.options = layout, layout.options
        self.length = layout.options.sequence_length

    def fill(self, samples: np.ndarray, groups: list[tuple[int, int, int]], block_of, head_of, out: dict) -> None:
        """Write windows `samples` (in batch order) into rows ``0..len(samples)-1`` of the
        outputs; `groups` are ``(block, lo, hi)``: rows lo..hi-1 start in that block."""
        layout, column, length = self.layout, self.options.column, self.length
        outputs = [(out[name], source, shift) for name, (source, shift) in self._DERIVED.items() if name in out]
        for block, lo, hi in groups:
            tokens = block_of(block)[column]
            first = int(layout.first_offset[block])
            number = samples[lo:hi] - layout.first_window[block]  # the windows' places in the block
            # The windows starting in a block lie every `length` tokens: gathered as rows
            # of strided views, one np.take per output (mode="clip" writes straight into
            # the output); the few that run past the block's end are clipped there and
            # written again below.
            for target, source, shift in outputs:
                windows = tokens.windows(source, first, length, shift)
                if len(windows):
                    np.take(windows, number, axis=0, out=target[lo:hi], mode="clip")
            if "document_ids" in out:  # numbered from 0 within each window
                out["document_ids"][lo:hi] -= out["document_ids"][lo:hi, :1]
            for row in (np.flatnonzero(number >= len(tokens.windows("tokens", first, length))) + lo).tolist():
                self._spanning(row, int(samples[row]) * length, block, tokens, head_of, out)

    def _spanning(self, row: int, start: int, block: int, tokens: TokenBlock, head_of, out: dict) -> None:
        """Write the window at `start` (in T) into batch row `row`: it starts in `block`
        (`tokens`) and runs on into the next block(s), each of which starts a document."""
        pieces, stop = [], start + self.length + 1  # (block's tokens, offset, count)
        offset = start - int(self.layout.token_starts[block])
        while start < stop:
            take = min(stop - start, tokens.size - offset)
            if take > 0:
                pieces.append((tokens, offset, take))
                start += take
            block, offset = block + 1, 0
            if start < stop:
                tokens = head_of(block)[self.options.column]
        window = np.concatenate([t.tokens[o:o + n] for t, o, n in pieces])
        out["input_ids"][row], out["labels"][row] = window[:-1], window[1:]
        if "document_ids" in out:
            numbers, base = [], 0
            for t, o, n in pieces:
                index = t.document_index[o:o + n]
                numbers.append(index - index[0] + base)
                base = int(numbers[-1][-1]) + 1
            out["document_ids"][row] = np.concatenate(numbers)[:self.length]
        if "positions" in out:
            out["positions"][row] = np.concatenate([t.position[o:o + n] for t, o, n in pieces])[:self.length]


def fill_padded(tokens: TokenBlock, row: int, options: TokenOptions, out: dict[str, np.ndarray], j: int,
                where: str) -> None:
    """Write one document, padded to sequence_length, into row `j` of the outputs."""
    document = tokens.tokens[tokens.starts[row]:tokens.starts[row + 1]]
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
