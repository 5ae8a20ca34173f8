"""From the loader's arguments to a `BatchSpec`: which columns are read, and what
each output column is (arrays as stored, stacked scalars, images, token sequences)."""

from __future__ import annotations

import numpy as np

from distprop.data.batch import ON_ERROR, BatchSpec, prepare_block, probe_image_outputs, resolve_stacks
from distprop.data.format import IMAGE, LIST, column_kind
from distprop.data.index import DatasetIndex, read_footer
from distprop.data.reader import BlockReader
from distprop.data.storage import list_dataset_files, resolve
from distprop.data.tokens import PackedLayout, TokenOptions
from distprop.data.transforms import ImagePipeline
from distprop.errors import ConfigError, DataError


def open_index(path_or_uri, columns, filesystem, tokens_column: str | None, sequence_length) -> tuple[DatasetIndex,
                                                                                                      str | None]:
    """The dataset index, and the token column when token sequences are asked for (the
    one named, or the dataset's only list-of-integers column)."""
    if sequence_length is None:
        if tokens_column is not None:
            raise ConfigError("tokens_column is given but sequence_length is not; pass sequence_length=...")
        return DatasetIndex.open(path_or_uri, columns, filesystem), None
    if tokens_column is None:
        index = DatasetIndex.open(path_or_uri, columns, filesystem,
                                  sequences=variable_list_columns(path_or_uri, filesystem, columns))
        candidates = [s.name for s in index.columns.values()
                      if s.kind == LIST and s.shape is None and s.dtype.kind in "iu"]
        if len(candidates) != 1:
            raise DataError(f"{index.location.display}: sequence_length needs one column of token ids; found "
                            f"{len(candidates)} lists of integers ({', '.join(candidates) or 'none'}): name it with "
                            "tokens_column=")
        tokens_column = candidates[0]
    # (Opened again when the column was found: the other list columns get their shapes checked.)
    return DatasetIndex.open(path_or_uri, columns, filesystem, sequences=(tokens_column,)), tokens_column


def variable_list_columns(path_or_uri, filesystem=None, columns=None) -> tuple[str, ...]:
    """Names of the list-of-numbers columns of the dataset's first file whose rows may
    differ in length (among `columns`, when given as names)."""
    _, schema, _ = read_footer(list_dataset_files(resolve(path_or_uri, filesystem))[0])
    wanted = None if columns is None or isinstance(columns, str) else set(columns)
    return tuple(f.name for f in schema if (wanted is None or f.name in wanted)
                 and column_kind(f) == LIST)


def build_spec(index: DatasetIndex, *, seed: int, image_transforms, channels: int, on_error: str, stack,
               tokens: TokenOptions | None) -> BatchSpec:
    """Everything but the image outputs' shapes, which `probe` finds."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {', '.join(map(repr, ON_ERROR))}, not {on_error!r}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, not {channels!r}")
    stacks = resolve_stacks(stack, index)
    stacked = {c for sources in stacks.values() for c in sources}
    images = {name: ImagePipeline(image_transforms, channels) for name, s in index.columns.items()
              if s.kind == IMAGE}
    if image_transforms and not images:
        raise ConfigError(f"image_transforms given but {index.location.display} has no image column "
                          f"(columns: {', '.join(f'{s.name} ({s.describe()})' for s in index.columns.values())})")
    token_column = tokens.column if tokens is not None else None
    arrays = [name for name, s in index.columns.items()
              if name not in stacked and name not in images and name != token_column]
    packed = None
    if tokens is not None:
        packed = PackedLayout(index, tokens) if tokens.pack else None
        clash = [name for name in tokens.outputs(index.columns[token_column].dtype) if name in arrays]
        if clash:
            raise ConfigError(f"{index.location.display}: column(s) {clash} would be replaced by the token "
                              "outputs of the same name; leave them out with columns=")
        if tokens.pack and (arrays or stacks or images):
            others = arrays + list(stacks) + list(images)
            raise ConfigError(f"{index.location.display}: pack=True makes samples that cross documents, so "
                              f"per-document columns {others} cannot come with them; select the token column "
                              f"alone (columns=[{token_column!r}]) or use pack=False")
    spec = BatchSpec(index, seed, arrays, stacks, images, tokens, packed, channels, on_error)
    for name in arrays:
        spec.outputs[name] = (index.columns[name].dtype, index.columns[name].shape)
    for name, sources in stacks.items():
        spec.outputs[name] = (np.result_type(*(index.columns[c].dtype for c in sources)), (len(sources),))
    if tokens is not None:
        spec.outputs.update(tokens.outputs(index.columns[token_column].dtype))
    return spec


def probe(spec: BatchSpec) -> None:
    """Fill in the image outputs' dtypes and shapes from the first decodable image, and
    order the outputs as the dataset's columns are ordered."""
    if not spec.images:
        return
    reader = BlockReader(spec.index, list(spec.images), lambda table, block: prepare_block(
        BatchSpec(spec.index, spec.seed, [], {}, spec.images), table, block))
    try:
        probe_image_outputs(spec, reader.read)
    finally:
        reader.close()
    order = {name: number for number, name in enumerate(spec.index.columns)}
    spec.outputs = dict(sorted(spec.outputs.items(), key=lambda item: order.get(item[0], len(order))))
