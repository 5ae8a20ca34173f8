"""distprop's column conventions for Arrow and Parquet, and the zero-copy path to numpy.

A dataset column is either

* a **scalar** column: a primitive integer, floating-point or boolean Arrow type, one
  value per sample (labels are int64 scalars), or
* a **tensor** column: one fixed-shape array per sample, stored as

  - a ``FixedSizeList`` of a numeric type whose field metadata ``distprop.shape``
    holds the per-sample shape as JSON (``[3, 32, 32]``); without that key the
    shape is ``(list_size,)``. This is what distprop writes: measured on the
    development machine it decodes fastest from Parquet, and pandas, polars,
    DuckDB and Hugging Face datasets all read it as an ordinary fixed-size list;
  - nested ``FixedSizeList``s (what polars writes for its ``Array`` type): the
    shape is the list sizes from outer to inner;
  - Arrow's canonical ``arrow.fixed_shape_tensor`` extension type.

  - a variable-length ``list`` (or ``large_list``, nested at any depth) whose rows all
    have the same length, as pandas and Hugging Face ``datasets`` write sequences:
    the shape comes from the first row, and every block read checks that all rows
    match it (`ColumnSpec.kind` ``"list"``);

* a **sequence** column: a variable-length ``list<int>`` of token ids, read when the
  loader is asked for token sequences (see `distprop.data.tokens`), or
* an **image** column: encoded images (JPEG, PNG, WebP, ...) as ``binary`` values or
  as Hugging Face's ``Image`` struct ``{bytes, path}``, decoded per sample (see
  `distprop.data.images`); `ColumnSpec.kind` ``"image"``.

Reading never takes the values through Python objects: a scalar column's buffer,
or a tensor column's flattened child buffer (``flatten()`` honours slice offsets,
which ``.values`` does not), is viewed as an ndarray and reshaped; Arrow copies
only where the memory layout forces it (booleans are bit-packed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distprop.errors import DataError

SHAPE_KEY = b"distprop.shape"
# Schema metadata: which column plays which part in training, as JSON
# ({"input": "image", "label": "label"}), written by the converters so that a job
# needs no column options for a dataset they made.
ROLES_KEY = b"distprop.roles"
ROLES = ("input", "label")


# ColumnSpec.kind
ARRAY = "array"        # numeric scalar or fixed-shape tensor (fixed-size lists, tensor extension)
LIST = "list"          # variable-length lists: a tensor when all rows match, or token sequences
IMAGE = "image"        # encoded image bytes


@dataclass(frozen=True)
class ColumnSpec:
    """What one column holds per sample: a numpy dtype and a shape (``()`` for scalars).

    For `LIST` columns `shape` is None until it is known (the index reads it from the
    first row, unless the column holds token sequences of any length); for `IMAGE`
    columns dtype is uint8 and shape ``()`` stands for "one encoded image"."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...] | None
    kind: str = ARRAY

    def describe(self) -> str:
        if self.kind == IMAGE:
            return "encoded image"
        if self.shape is None:
            return f"{self.dtype} list"
        shape = "x".join(str(d) for d in self.shape) if self.shape else "scalar"
        return f"{self.dtype} {shape}" + (" list" if self.kind == LIST else "")


def roles_metadata(roles, columns, where: str) -> dict[bytes, bytes]:
    """Schema metadata recording `roles` (role -> column name); each role must be one
    of `ROLES` and name one of `columns`."""
    for role, column in roles.items():
        if role not in ROLES:
            raise DataError(f"{where}: unknown column role {role!r} (roles: {', '.join(ROLES)})")
        if column not in columns:
            raise DataError(f"{where}: the {role} role names column {column!r}, which is not written "
                            f"(columns: {', '.join(columns)})")
    return {ROLES_KEY: json.dumps(dict(roles), sort_keys=True).encode()}


def read_roles(schema: pa.Schema, where: str) -> dict[str, str]:
    """The column roles a schema records (role -> column name); {} when none."""
    raw = (schema.metadata or {}).get(ROLES_KEY)
    if raw is None:
        return {}
    try:
        roles = json.loads(raw)
        valid = isinstance(roles, dict) and all(isinstance(v, str) for v in roles.values())
    except ValueError:
        valid = False
    if not valid:
        raise DataError(f"{where}: unreadable column roles in the schema metadata: {raw!r}")
    return {role: column for role, column in roles.items() if role in ROLES}


def _is_numeric(arrow_type: pa.DataType) -> bool:
    return (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
            or pa.types.is_boolean(arrow_type))


def column_spec(field: pa.Field, where: str) -> ColumnSpec:
    """The ColumnSpec of an Arrow field; DataError (naming `where` and the column)
    for a type distprop cannot turn into fixed-shape numpy arrays."""
    arrow_type = field.type
    if is_image_type(arrow_type):
        return ColumnSpec(field.name, np.dtype(np.uint8), (), IMAGE)
    if _is_variable_list(arrow_type):
        value_type = _list_value_type(arrow_type)
        if not _is_numeric(value_type):
            raise DataError(f"{where}: column {field.name!r} holds lists of {value_type}; "
                            "list columns must hold integers, floats or booleans")
        return ColumnSpec(field.name, np.dtype(value_type.to_pandas_dtype()), None, LIST)
    if isinstance(arrow_type, pa.FixedShapeTensorType):
        value_type = arrow_type.value_type
        shape = tuple(int(d) for d in arrow_type.shape)
        if _is_permuted(arrow_type):  # `shape` is the stored layout; samples come back permuted
            shape = tuple(shape[p] for p in arrow_type.permutation)
    elif pa.types.is_fixed_size_list(arrow_type):
        shape, value_type = _nested_list_shape(arrow_type)
        declared = _declared_shape(field, where)
        if declared is not None:
            if len(shape) != 1 or int(np.prod(declared, dtype=np.int64)) != shape[0]:
                raise DataError(f"{where}: column {field.name!r} declares shape {list(declared)} in its "
                                f"metadata but holds fixed-size lists of {list(shape)}")
            shape = declared
    elif _is_numeric(arrow_type):
        value_type, shape = arrow_type, ()
    else:
        raise DataError(f"{where}: column {field.name!r} has type {arrow_type} (distprop reads numeric "
                        "scalars, tensors, lists of numbers and encoded images)")
    if not _is_numeric(value_type):
        raise DataError(f"{where}: column {field.name!r} holds {value_type} values; "
                        "tensor columns must hold integers, floats or booleans")
    return ColumnSpec(field.name, np.dtype(value_type.to_pandas_dtype()), shape)


def column_kind(field: pa.Field) -> str | None:
    """`IMAGE`, `LIST` (variable-length lists), `ARRAY`, or None for a type distprop
    does not read, judged from the type alone."""
    if is_image_type(field.type):
        return IMAGE
    if _is_variable_list(field.type):
        return LIST
    try:
        column_spec(field, "")
    except DataError:
        return None
    return ARRAY


def is_image_type(arrow_type: pa.DataType) -> bool:
    """Encoded images: ``binary``/``large_binary``, or Hugging Face's ``Image`` struct
    (a ``bytes`` binary field, usually beside a ``path`` string)."""
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return True
    if pa.types.is_struct(arrow_type):
        index = arrow_type.get_field_index("bytes")
        return index >= 0 and is_image_type(arrow_type.field(index).type) and not pa.types.is_struct(
            arrow_type.field(index).type)
    return False


def _is_variable_list(arrow_type: pa.DataType) -> bool:
    """A list type with a variable-length level somewhere (fixed-size levels may nest in it)."""
    while pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) \
            or pa.types.is_fixed_size_list(arrow_type):
        if not pa.types.is_fixed_size_list(arrow_type):
            return True
        arrow_type = arrow_type.value_type
    return False


def _list_value_type(arrow_type: pa.DataType) -> pa.DataType:
    while pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) \
            or pa.types.is_fixed_size_list(arrow_type):
        arrow_type = arrow_type.value_type
    return arrow_type


def _is_permuted(tensor_type: pa.FixedShapeTensorType) -> bool:
    permutation = tensor_type.permutation
    return permutation is not None and list(permutation) != list(range(len(permutation)))


def _nested_list_shape(arrow_type: pa.DataType) -> tuple[tuple[int, ...], pa.DataType]:
    shape = []
    while pa.types.is_fixed_size_list(arrow_type):
        shape.append(arrow_type.list_size)
        arrow_type = arrow_type.value_type
    return tuple(shape), arrow_type


def _declared_shape(field: pa.Field, where: str) -> tuple[int, ...] | None:
    raw = (field.metadata or {}).get(SHAPE_KEY)
    if raw is None:
        return None
    try:
        shape = tuple(int(d) for d in json.loads(raw))
    except (ValueError, TypeError):
        raise DataError(f"{where}: column {field.name!r} has unreadable shape metadata {raw!r}") from None
    if any(d < 0 for d in shape):
        raise DataError(f"{where}: column {field.name!r} has a negative dimension in its shape {list(shape)}")
    return shape


def arrow_column(name: str, values: np.ndarray, tensor_type: str = "list") -> tuple[pa.Field, pa.Array]:
    """The Arrow field and array for a column of samples (first axis = samples).

    1-D arrays become scalar columns; higher ranks become tensor columns, as a
    ``FixedSizeList`` with ``distprop.shape`` metadata (``tensor_type="list"``) or as
    the ``arrow.fixed_shape_tensor`` extension type (``"fixed_shape_tensor"``).
    Fields are declared non-nullable, which measured about 30% faster to decode
    than nullable ones. No copy is made for C-contiguous native-endian input.
    """
    values = np.ascontiguousarray(values)
    if values.dtype.kind not in "biuf":
        raise DataError(f"column {name!r} has dtype {values.dtype}; distprop stores integers, floats or booleans")
    if not values.dtype.isnative:  # Arrow refuses byte-swapped arrays (an .npz from a big-endian source)
        values = values.astype(values.dtype.newbyteorder("="))
    if values.ndim == 0:
        raise DataError(f"column {name!r} is a 0-d array; a column needs one entry per sample")
    if values.ndim == 1:
        array = pa.array(values)
        return pa.field(name, array.type, nullable=False), array
    sample_shape = values.shape[1:]
    if tensor_type == "fixed_shape_tensor":
        array = pa.FixedShapeTensorArray.from_numpy_ndarray(values)
        return pa.field(name, array.type, nullable=False), array
    flat = pa.array(values.reshape(-1))
    list_type = pa.list_(pa.field("item", flat.type, nullable=False), int(np.prod(sample_shape)))
    array = pa.FixedSizeListArray.from_arrays(flat, type=list_type)
    metadata = {SHAPE_KEY: json.dumps([int(d) for d in sample_shape]).encode()}
    return pa.field(name, list_type, nullable=False, metadata=metadata), array


def column_to_numpy(column: pa.Array | pa.ChunkedArray, spec: ColumnSpec, where: str) -> np.ndarray:
    """The column as an ndarray of shape ``(rows, *spec.shape)``, zero-copy where Arrow allows.

    Nulls have no value to give, so they raise a DataError naming `where` rather than
    turning silently into zeros or NaNs.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if column.null_count:
        raise DataError(f"{where}: column {spec.name!r} has {column.null_count} null values")
    if isinstance(column.type, pa.FixedShapeTensorType):
        if _is_permuted(column.type):
            # The storage holds the dimensions in another order: let Arrow transpose.
            return np.ascontiguousarray(column.to_numpy_ndarray())
        column = column.storage
    values = column
    while pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
        if values.null_count:
            raise DataError(f"{where}: column {spec.name!r} has null tensor elements")
    flat = values.to_numpy(zero_copy_only=False)
    return flat.reshape((len(column),) + spec.shape)


def _combined(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def list_offsets(column: pa.Array) -> np.ndarray:
    """The offsets of a ``list``/``large_list`` array as int64, slice offset honoured
    (`ListArray.offsets` gives the slice's own offsets, starting wherever the parent's
    values start)."""
    return np.asarray(column.offsets, dtype=np.int64)


def list_to_numpy(column: pa.Array | pa.ChunkedArray, spec: ColumnSpec, where: str) -> np.ndarray:
    """A `LIST` column whose rows all have `spec.shape` as ``(rows, *spec.shape)``.

    Each variable-length level is checked once for the whole block (one vectorised
    comparison of its offsets); a row of another length raises a DataError naming
    `where` and the row. The values are copied once, when they are flattened."""
    column = _combined(column)
    rows = len(column)
    values, level, per_row = column, 0, 1
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) \
            or pa.types.is_fixed_size_list(values.type):
        if values.null_count:
            raise DataError(f"{where}: column {spec.name!r} has null lists")
        expected = spec.shape[level]
        if not pa.types.is_fixed_size_list(values.type):
            lengths = np.diff(list_offsets(values))
            wrong = np.flatnonzero(lengths != expected)
            if len(wrong):
                first = int(wrong[0])
                raise DataError(f"{where} row {first // per_row}: column {spec.name!r} holds a list of "
                                f"{int(lengths[first])} values where every row's list has {expected} "
                                f"(the shape {list(spec.shape)} of the dataset's first row)")
        elif values.type.list_size != expected:  # cannot differ from the index's reading; kept as a guard
            raise DataError(f"{where}: column {spec.name!r} has fixed-size lists of {values.type.list_size}, "
                            f"expected {expected}")
        values = values.flatten()
        per_row *= expected
        level += 1
    if values.null_count:
        raise DataError(f"{where}: column {spec.name!r} has null list elements")
    return values.to_numpy(zero_copy_only=False).reshape((rows,) + spec.shape)


def first_row_shape(column: pa.Array | pa.ChunkedArray) -> tuple[int, ...]:
    """The per-row shape of a (nested) list column, read from its first row (each
    deeper level from the first element of the level above)."""
    values = _combined(column).slice(0, 1)
    shape = []
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) \
            or pa.types.is_fixed_size_list(values.type):
        length = values.type.list_size if pa.types.is_fixed_size_list(values.type) \
            else int(np.diff(list_offsets(values))[0])
        shape.append(length)
        values = values.flatten().slice(0, 1)
    return tuple(shape)


@dataclass(frozen=True)
class VarRows:
    """A block of variable-length rows (encoded images, token sequences) as numpy
    arrays without a copy where Arrow allows: row i is
    ``values[offsets[i]:offsets[i + 1]]``; `valid` is False for null rows (None: none)."""

    offsets: np.ndarray   # int64, rows + 1 entries, starting at 0
    values: np.ndarray
    valid: np.ndarray | None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def image_rows(column: pa.Array | pa.ChunkedArray) -> tuple[VarRows, pa.Array | None]:
    """An image column's encoded bytes (a `VarRows` over uint8, zero-copy), and the
    Hugging Face struct's ``path`` field where there is one (for error messages)."""
    column = _combined(column)
    paths = None
    if pa.types.is_struct(column.type):
        children = dict(zip([f.name for f in column.type], column.flatten()))  # parent offset and nulls applied
        paths = children.get("path")
        column = children["bytes"]
    validity, offsets_buffer, data = column.buffers()
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, offset_type)[column.offset:column.offset + len(column) + 1]
    values = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    start = int(offsets[0])
    valid = None
    if column.null_count:
        valid = column.is_valid().to_numpy(zero_copy_only=False)
    return VarRows(offsets.astype(np.int64) - start, values[start:int(offsets[-1])], valid), paths


def sequence_rows(column: pa.Array | pa.ChunkedArray, spec: ColumnSpec, where: str) -> VarRows:
    """A ``list<int>`` column of token sequences as a `VarRows` (null rows marked, not refused:
    the caller names the row)."""
    column = _combined(column)
    offsets = list_offsets(column)
    values = column.flatten()  # honours the slice: starts at offsets[0]
    if values.null_count:
        raise DataError(f"{where}: column {spec.name!r} has null token ids")
    valid = column.is_valid().to_numpy(zero_copy_only=False) if column.null_count else None
    return VarRows(offsets - offsets[0], values.to_numpy(zero_copy_only=False), valid)
