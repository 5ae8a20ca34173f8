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

import functools
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from distprop.data.format import VarRows, list_offsets, sequence_rows
from distprop.data.index import DatasetIndex
from distprop.data.storage import first_line, open_input
from distprop.errors import ConfigError, DataError

# What packed windows write, in the order the compiled kernel takes them.
WINDOW_OUTPUTS = ("input_ids", "labels", "document_ids", "positions")


@functools.cache
def kernels():
    """The compiled kernels' module, or None where numba is not installed."""
    try:
        from distprop.data import token_kernels
    except ImportError:
        return None
    return token_kernels


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


@dataclass
class TokenBlock:
    """One block's documents, their tokens back to back (packed: each followed by the end
    token, if any, so `tokens` is the block's stretch of T); document i starts at
    ``starts[i]`` (``starts[-1]`` is the end)."""

    tokens: np.ndarray
    starts: np.ndarray
    _views: dict = field(default_factory=dict, repr=False)

    def window_count(self, first: int, length: int) -> int:
        """How many of the windows starting at ``first + k*length`` end inside the block,
        their label included."""
        return max(0, (len(self.tokens) - 1 - first) // length)

    def windows(self, first: int, length: int, shift: int) -> np.ndarray:
        """``tokens`` as ``(windows, length)``: row k is ``tokens[first + shift + k*length:]
        [:length]``, for every window starting at ``first + k*length`` that ends inside the
        block (its label included). A strided view, made once per block."""
        key = (first, length, shift)
        view = self._views.get(key)
        if view is None:
            count = self.window_count(first, length)
            view = self._views[key] = np.lib.stride_tricks.as_strided(
                self.tokens[first + shift:], (count, length), (length * self.tokens.itemsize, self.tokens.itemsize),
                writeable=False)
        return view

    def head(self, needed: int) -> TokenBlock:
        """The first `needed` tokens (all, if fewer) and the document starts among them:
        a copy, so that the rest of the block is not kept alive by it."""
        if len(self.tokens) <= needed:
            return self
        inside = self.starts[:int(np.searchsorted(self.starts, needed, side="left"))]
        return TokenBlock(self.tokens[:needed].copy(), np.append(inside, needed))


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
    if not options.pack or options.eos_token is None:
        tokens, starts = rows.values, rows.offsets
    else:
        count = len(rows)
        starts = rows.offsets + np.arange(count + 1)  # each earlier document has gained an end token
        tokens = np.empty(int(starts[-1]), rows.values.dtype)
        compiled = kernels()
        if compiled is not None:
            compiled.insert_end_tokens(rows.values, rows.offsets, tokens.dtype.type(options.eos_token), tokens)
        else:
            ends = starts[1:] - 1
            keep = np.ones(len(tokens), bool)
            keep[ends] = False
            tokens[keep] = rows.values
            tokens[ends] = options.eos_token
    if options.pack and expected_tokens is not None and len(tokens) != expected_tokens:
        raise DataError(f"{where}: column {options.column!r} holds {len(tokens)} tokens but the file's footer "
                        f"counts {expected_tokens} (was the file changed after the loader was built?)")
    return TokenBlock(tokens, starts)


def read_token_head(tables, column_spec, options: TokenOptions, where: str, needed: int,
                    expected_tokens: int | None) -> TokenBlock:
    """The block's first `needed` tokens of T (all of it, if shorter), from `tables`: its
    rows from the start, a few at a time. A window starting in the block before takes
    at most sequence_length tokens from this one; decoding the whole row group for it,
    whose own turn may be far away in the shuffled order, would cost most of a second
    full read. (Parquet stores a row group's pages back to back and stops decoding
    early, but the rows are whole documents: a long first document is read whole.)
    Where the rows run out first, the head is the whole block, and is checked against
    `expected_tokens` (the footer's count) as a full read would be."""
    chunks, tokens = [], 0
    for table in tables:
        for chunk in table.column(options.column).chunks:
            offsets = list_offsets(chunk)
            chunks.append(chunk)
            tokens += int(offsets[-1] - offsets[0]) + (len(chunk) if options.eos_token is not None else 0)
        if tokens >= needed:
            expected_tokens = None  # stopped early: only part of the block
            break
    head = read_token_block(pa.chunked_array(chunks, type=chunks[0].type), column_spec, options, where,
                            expected_tokens)
    return head.head(needed)  # only what windows take, so the rest of a long document is freed now


class PackedAssembler:
    """Fills packed windows into a batch, or a unit of several, from token blocks:
    `block_of(b)` is the prepared block ``b`` (its TokenBlock under the token column's
    name), `head_of(b)` the same or only the block's first tokens (see
    `read_token_head`), for the blocks that windows run on into."""

    def __init__(self, layout: PackedLayout):
        self.layout, self.options = layout, layout.options
        self.length = layout.options.sequence_length

    def fill(self, samples: np.ndarray, blocks: np.ndarray, block_of, head_of, out: dict) -> None:
        """Write windows `samples` into rows ``0..len(samples)-1`` of the outputs, in that
        order; window ``samples[i]`` starts in block ``blocks[i]``. The windows are taken
        block by block (one pass over each block, whichever batches of the unit they
        belong to) and written to their rows."""
        layout, column, length = self.layout, self.options.column, self.length
        starts = samples * length
        compiled = kernels()
        by_block = np.argsort(blocks, kind="stable")
        sorted_blocks = blocks[by_block]
        bounds = np.flatnonzero(np.diff(sorted_blocks)) + 1
        touched = {}  # blocks whose document starts the windows may cross -> their TokenBlock
        spanning = []  # (row, block) of the windows that run on into the next block(s)
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(samples)]):
            block = int(sorted_blocks[lo])
            rows = by_block[lo:hi]
            tokens = touched[block] = block_of(block)[column]
            first = int(layout.first_offset[block])
            number = samples[rows] - layout.first_window[block]  # the windows' places in the block
            fitting = tokens.window_count(first, length)  # those that end inside the block
            if compiled is not None:
                left = compiled.gather_windows(tokens.tokens, tokens.starts, first, number, rows, fitting, length,
                                               *(out.get(name) for name in WINDOW_OUTPUTS))
                if not left:  # (most blocks: a block's one window that runs on is rarely in the unit)
                    continue
            elif fitting:
                # The windows starting in a block lie every `length` tokens: gathered as
                # rows of strided views, one np.take per output (mode="clip": the few
                # that run past the block's end are clipped there and written again below).
                for name, shift in (("input_ids", 0), ("labels", 1)):
                    out[name][rows] = tokens.windows(first, length, shift).take(number, axis=0, mode="clip")
            spanning += [(row, block) for row in rows[number >= fitting].tolist()]
        for row, block in spanning:
            window = self._spanning(int(starts[row]), block, touched[block], head_of, touched)
            out["input_ids"][row], out["labels"][row] = window[:-1], window[1:]
        # The compiled kernel wrote the other windows' document ids and positions.
        unwritten = [row for row, _ in spanning] if compiled is not None else slice(0, len(samples))
        wanted = [name for name in ("document_ids", "positions") if name in out]
        if wanted and (compiled is None or spanning):
            # Blocks in dataset order hold T in order, so their starts concatenate sorted
            # (a head's are the first of its block's).
            boundaries = np.concatenate([touched[b].starts[:-1] + layout.token_starts[b] for b in sorted(touched)])
            documents = self._documents(starts[unwritten], boundaries)
            for name in wanted:
                out[name][unwritten] = documents[name]

    def _spanning(self, start: int, block: int, tokens: TokenBlock, head_of, touched: dict) -> np.ndarray:
        """The window at `start` (in T), which starts in `block` (`tokens`) and runs on into
        the next block(s); those are added to `touched`."""
        pieces, stop = [], start + self.length + 1
        offset = start - int(self.layout.token_starts[block])
        while True:
            take = min(stop - start, len(tokens.tokens) - offset)
            if take > 0:
                pieces.append(tokens.tokens[offset:offset + take])
                start += take
            if start >= stop:
                return np.concatenate(pieces)
            block, offset = block + 1, 0
            tokens = touched.get(block) or head_of(block)[self.options.column]
            touched[block] = tokens

    def _documents(self, starts: np.ndarray, boundaries: np.ndarray) -> dict[str, np.ndarray]:
        """document_ids and positions (``(windows, length)`` each) of the windows starting
        at `starts`, from the sorted global start offsets of all documents the windows
        touch. A window is cut into segments at the document starts inside it; each output
        is made in one pass, segment by segment (np.repeat): the segment's number, and its
        tokens' places counted from the segment's document start."""
        count, length = len(starts), self.length
        first = np.searchsorted(boundaries, starts, side="right")   # the first start after each window's first token
        inside = np.searchsorted(boundaries, starts + length, side="left") - first
        segments = inside + 1
        window = np.repeat(np.arange(count), segments)
        number = np.arange(len(window)) - np.repeat(np.cumsum(segments) - segments, segments)  # 0, 1, .. per window
        # The start column of each segment: 0, then each document start inside the window.
        column = np.zeros(len(window), np.int64)
        later = number > 0
        column[later] = boundaries[np.repeat(first, segments)[later] + number[later] - 1] - starts[window[later]]
        lengths = np.diff(np.append(column + window * length, count * length))
        out = {}
        if self.options.document_ids:
            out["document_ids"] = np.repeat(number.astype(np.int32), lengths).reshape(count, length)
        if self.options.positions:
            # A window's first segment continues a document that began before it (a start <= 0).
            begun = np.where(later, column, (boundaries[first - 1] - starts)[window])
            places = np.tile(np.arange(length), count) - np.repeat(begun, lengths)
            out["positions"] = places.reshape(count, length)
        return out


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
