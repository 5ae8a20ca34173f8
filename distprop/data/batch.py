"""What a batch is made of, and making one: the same code runs in the loader's
background thread (``num_workers=0``) and in each worker process.

`BatchSpec` says which source columns are read and what each output column is:
arrays gathered as stored, scalar columns stacked into one ``(batch, features)``
array, images decoded and transformed per sample, token sequences packed or padded.
`prepare_block` turns one block (row group) read from disk into what sample
assembly takes from; `BatchBuilder` writes a batch's samples into output arrays
that the caller provides (plain arrays, or a shared-memory slot in a worker).
"""

from __future__ import annotations

import fnmatch
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from distprop.data.format import ARRAY, LIST, column_to_numpy, image_rows, list_to_numpy
from distprop.data.images import Geometry, ImageDecoder, ImageError
from distprop.data.index import DatasetIndex
from distprop.data.resample import resample_into
from distprop.data.storage import first_line
from distprop.data.tokens import (PackedAssembler, PackedLayout, TokenOptions, fill_padded, read_token_block,
                                  read_token_head)
from distprop.data.transforms import ImagePipeline
from distprop.errors import ConfigError, DataError

ON_ERROR = ("raise", "skip")

# Entropy tag of the per-sample augmentation streams, apart from the sampler's.
_AUGMENT = 2


@dataclass
class BatchSpec:
    """Everything that decides a batch's content, apart from which samples are in it."""

    index: DatasetIndex
    seed: int
    arrays: list[str]                              # output as stored
    stacks: dict[str, list[str]]                   # output -> scalar source columns
    images: dict[str, ImagePipeline]               # image column -> its transforms
    tokens: TokenOptions | None = None
    packed: PackedLayout | None = None
    channels: int = 3
    on_error: str = "raise"
    outputs: dict[str, tuple[np.dtype, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def read_columns(self) -> list[str]:
        names = list(self.arrays) + [c for sources in self.stacks.values() for c in sources] + list(self.images)
        if self.tokens is not None:
            names.append(self.tokens.column)
        return names

    @property
    def sample_block_starts(self) -> np.ndarray:
        """First sample id of each block: rows, or packed windows."""
        if self.packed is None:
            return self.index.block_starts
        return np.concatenate([[0], np.cumsum(self.packed.samples_per_block)[:-1]]).astype(np.int64)

    @property
    def samples_per_block(self) -> np.ndarray:
        return self.index.block_rows if self.packed is None else self.packed.samples_per_block

    @property
    def num_samples(self) -> int:
        return self.index.num_rows if self.packed is None else self.packed.num_samples

    def sample_bytes(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for dtype, shape in self.outputs.values())


def resolve_stacks(stack, index: DatasetIndex) -> dict[str, list[str]]:
    """``{output: [columns]}`` from ``stack=``, whose values are lists of names or glob
    patterns (``"f*"``, matched in the dataset's column order)."""
    if not stack:
        return {}
    resolved, taken = {}, {}
    for output, sources in dict(stack).items():
        patterns = [sources] if isinstance(sources, str) else list(sources)
        names = []
        for pattern in patterns:
            matches = [n for n in index.columns if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                raise DataError(f"{index.location.display}: stack {output!r}: no column matches {pattern!r}")
            names.extend(m for m in matches if m not in names)
        for name in names:
            spec = index.columns[name]
            if spec.kind != ARRAY or spec.shape != ():
                raise DataError(f"{index.location.display}: stack {output!r}: column {name!r} is "
                                f"{spec.describe()}; only scalar columns stack into features")
            if name in taken:
                raise ConfigError(f"stack: column {name!r} is in both {taken[name]!r} and {output!r}")
            taken[name] = output
        if output in index.columns and output not in names:
            raise ConfigError(f"stack: output {output!r} is also a column of the dataset; pick another name")
        resolved[output] = names
    return resolved


def block_location(index: DatasetIndex, block: int) -> str:
    return index.blocks[block].describe(index)


def prepare_block(spec: BatchSpec, table: pa.Table, block: int) -> dict:
    """One block's columns in the form sample assembly takes them from."""
    index = spec.index
    where = block_location(index, block)
    out = {}
    for name in spec.arrays:
        column_spec = index.columns[name]
        convert = list_to_numpy if column_spec.kind == LIST else column_to_numpy
        out[name] = convert(table.column(name), column_spec, where)
    for output, sources in spec.stacks.items():
        dtype = spec.outputs[output][0]
        stacked = np.empty((table.num_rows, len(sources)), dtype)
        for j, name in enumerate(sources):
            stacked[:, j] = column_to_numpy(table.column(name), index.columns[name], where)
        out[output] = stacked
    for name in spec.images:
        out[name] = image_rows(table.column(name))
    if spec.tokens is not None:
        expected = None
        if spec.packed is not None:
            expected = int(spec.packed.block_tokens[block])
        out[spec.tokens.column] = read_token_block(table.column(spec.tokens.column), index.columns[spec.tokens.column],
                                                   spec.tokens, where, expected)
    return out


def prepare_head(spec: BatchSpec, reader, block: int) -> dict:
    """The first sequence_length tokens of packed block `block` (see `read_token_head`),
    read through `reader` (a `BlockReader`) a few documents at a time: what windows
    starting in the block before take from it."""
    tokens, layout = spec.tokens, spec.packed
    average = max(1.0, layout.block_tokens[block] / max(1, spec.index.blocks[block].num_rows))
    batch_rows = int(2 * tokens.sequence_length / average) + 1  # about twice the documents needed
    with closing(reader.read_rows(block, batch_rows)) as tables:  # stopped early, the rest is not decoded
        head = read_token_head(tables, spec.index.columns[tokens.column], tokens, block_location(spec.index, block),
                               tokens.sequence_length, int(layout.block_tokens[block]))
    return {tokens.column: head}


@dataclass
class BatchRows:
    """One batch's samples grouped by the block they come from: samples
    ``local[bounds[j]:bounds[j+1]]`` of block ``blocks[j]``."""

    blocks: np.ndarray
    bounds: np.ndarray
    local: np.ndarray

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @classmethod
    def concatenate(cls, parts: list[BatchRows]) -> BatchRows:
        """Several batches' rows as one, in order (a block may then have several groups)."""
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [len(part) for part in parts[:-1]])
        return cls(np.concatenate([part.blocks for part in parts]),
                   np.concatenate([[0]] + [part.bounds[1:] + offset for part, offset in zip(parts, offsets)]),
                   np.concatenate([part.local for part in parts]))

    def describe(self, index: DatasetIndex, limit: int = 3) -> str:
        """Where the samples lie, for an error about the batch as a whole."""
        parts = []
        for j, block in enumerate(self.blocks[:limit].tolist()):
            rows = self.local[self.bounds[j]:self.bounds[j + 1]][:4].tolist()
            parts.append(f"{block_location(index, block)} rows {', '.join(map(str, rows))}"
                         f"{', ...' if self.bounds[j + 1] - self.bounds[j] > 4 else ''}")
        more = len(self.blocks) - limit
        return "; ".join(parts) + (f"; and {more} more row groups" if more > 0 else "")


@dataclass
class BuildResult:
    size: int                                          # samples written (fewer when images were skipped)
    skipped: list[str] = field(default_factory=list)   # "where: why" of each skipped sample


class BatchBuilder:
    """Writes batches of one epoch into caller-provided output arrays."""

    def __init__(self, spec: BatchSpec, epoch: int):
        self.spec, self.epoch = spec, epoch
        self.decoder = ImageDecoder(spec.channels) if spec.images else None
        self.assembler = PackedAssembler(spec.packed) if spec.packed is not None else None
        self.sample_starts = spec.sample_block_starts

    def build(self, rows: BatchRows, block_of, out: dict[str, np.ndarray], head_of=None) -> BuildResult:
        """Fill ``out[name][:size]``; `block_of(b)` returns prepared block ``b``, `head_of(b)`
        (packed tokens) the block or its head (`prepare_head`), for blocks that windows
        run on into; by default the whole block."""
        spec = self.spec
        index = spec.index
        if self.assembler is not None:  # packed windows: nothing else is in the batch
            blocks = np.repeat(rows.blocks, np.diff(rows.bounds))
            samples = rows.local + self.sample_starts[blocks]
            self.assembler.fill(samples, blocks, block_of, head_of or block_of, out)
            return BuildResult(len(rows))
        keep = np.ones(len(rows), bool)
        skipped: list[str] = []
        if spec.images or spec.tokens is not None:
            position = 0
            for j, block in enumerate(rows.blocks.tolist()):
                prepared = block_of(block)
                for i in range(int(rows.bounds[j]), int(rows.bounds[j + 1])):
                    local = int(rows.local[i])
                    sample = int(self.sample_starts[block]) + local
                    if spec.images:
                        problem = self._images(prepared, block, local, sample, out, position)
                        if problem is not None:
                            keep[i] = False
                            skipped.append(problem)
                            continue
                    if spec.tokens is not None:
                        fill_padded(prepared[spec.tokens.column], local, spec.tokens, out, position,
                                    block_location(index, block))
                    position += 1
        size = int(keep.sum())
        gathered = list(spec.arrays) + list(spec.stacks)
        if gathered:
            destination = 0
            for j, block in enumerate(rows.blocks.tolist()):
                lo, hi = int(rows.bounds[j]), int(rows.bounds[j + 1])
                local = rows.local[lo:hi] if keep[lo:hi].all() else rows.local[lo:hi][keep[lo:hi]]
                if not len(local):
                    continue
                prepared = block_of(block)
                for name in gathered:
                    # mode="clip" lets numpy write straight into `out` (mode="raise" buffers);
                    # the indices are in range by construction.
                    np.take(prepared[name], local, axis=0, out=out[name][destination:destination + len(local)],
                            mode="clip")
                destination += len(local)
        return BuildResult(size, skipped)

    def _images(self, prepared: dict, block: int, local: int, sample: int, out, position: int) -> str | None:
        """Decode and transform the sample's images into their outputs; the reason when
        the sample is skipped (on_error="skip"), else None."""
        spec = self.spec
        for number, (name, pipeline) in enumerate(spec.images.items()):
            where = f"{block_location(spec.index, block)} row {local}"
            rows, paths = prepared[name]
            try:
                if rows.valid is not None and not rows.valid[local]:
                    path = paths[local].as_py() if paths is not None and paths[local].is_valid else None
                    raise ImageError("holds no image bytes" + (f" (only the path {path!r}: embed the files, as "
                                                               "datasets' embed_external_files does)"
                                                               if path else ""))
                rng = np.random.default_rng([spec.seed, self.epoch, _AUGMENT, number, sample])
                if pipeline.middle:
                    image, region = decode_sample(self.decoder, pipeline, rows.row(local), rng), None
                else:  # resampled and run through the tail in one pass, straight into the batch
                    region = decode_region(self.decoder, pipeline, rows.row(local), rng)
            except ImageError as error:
                if spec.on_error == "skip":
                    return f"{where}: column {name!r} {error}"
                raise DataError(f"{where}: column {name!r} {error}") from None
            except DataError:
                raise
            except Exception as error:  # a custom transform's own failure: not skippable
                raise DataError(f"{where}: column {name!r}: an image transform failed "
                                f"({type(error).__name__}: {first_line(error)})") from error
            target = out[name][position]
            if region is None:
                tail = pipeline.tail_for(image)
                _check_shape(tail.sample_shape(image.shape[:2] if tail.input_layout == "HWC" else image.shape[1:]),
                             target, where, name)
                tail.write(image, target)
                continue
            pixels, box, geometry = region
            _check_shape(pipeline.tail.sample_shape(geometry.size if geometry else pixels.shape[:2]), target,
                         where, name)
            if geometry is None:
                pipeline.tail.write(pixels, target)
            else:
                resample_into(pixels, box, geometry.flip, target, pipeline.tail)
        return None


def _check_shape(shape: tuple[int, ...], target: np.ndarray, where: str, name: str) -> None:
    if shape != target.shape:
        raise DataError(f"{where}: column {name!r} gives an image of shape {shape} after its transforms, "
                        f"but the batch holds {target.shape} (end the transforms with a fixed-size "
                        "crop or Resize((h, w)))")


def decode_region(decoder: ImageDecoder, pipeline: ImagePipeline, data, rng) -> tuple[np.ndarray, tuple,
                                                                                      Geometry | None]:
    """Decode one image for its geometric transforms: the decoded pixels, the planned
    region in them and the plan (None without geometric transforms)."""
    geometry = None
    if pipeline.geometric:
        geometry = pipeline.geometry(*decoder.size(data), rng)
    pixels, box = decoder.decode_region(data, geometry)
    return pixels, box, geometry


def decode_sample(decoder: ImageDecoder, pipeline: ImagePipeline, data, rng) -> np.ndarray:
    """Decode one image and run its transforms up to (not including) the fused tail."""
    geometry = pipeline.geometry(*decoder.size(data), rng) if pipeline.geometric else None
    return pipeline.finish(decoder.decode(data, geometry), rng)


def probe_image_outputs(spec: BatchSpec, read_block) -> None:
    """Set the output dtype and shape of each image column from its first decodable image
    (all later ones must match it). `read_block(b)` returns prepared block ``b``."""
    decoder = ImageDecoder(spec.channels)
    for name, pipeline in spec.images.items():
        found = None
        problems = []
        for block in range(len(spec.index.blocks)):
            rows, _ = read_block(block)[name]
            for local in range(len(rows)):
                if rows.valid is not None and not rows.valid[local]:
                    continue
                try:
                    image = decode_sample(decoder, pipeline, rows.row(local), np.random.default_rng(0))
                except ImageError as error:
                    problems.append(f"{block_location(spec.index, block)} row {local}: column {name!r} {error}")
                    if spec.on_error != "skip":
                        raise DataError(problems[-1]) from None
                    if len(problems) >= 100:
                        break
                    continue
                found = image
                break
            if found is not None or len(problems) >= 100:
                break
        if found is None:
            raise DataError(f"{spec.index.location.display}: column {name!r}: no decodable image among the first "
                            f"{len(problems)} ({problems[0] if problems else 'all null'})")
        tail = pipeline.tail_for(found)
        spatial = found.shape[:2] if tail.input_layout == "HWC" else found.shape[1:]
        spec.outputs[name] = (tail.dtype, tail.sample_shape(spatial))
