"""Bad input gets a one-line DataError naming the file (and column), never a pyarrow
traceback nor a silently wrong result."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import write_ids

from distprop.data import ArrowLoader, write_dataset
from distprop.errors import DataError


def data_error(*fragments, call):
    """Run `call`, expect a one-line DataError containing every fragment."""
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def test_missing_path(tmp_path):
    data_error(tmp_path / "nowhere", "no such file or directory", call=lambda: ArrowLoader(tmp_path / "nowhere", 4))


def test_empty_directory(tmp_path):
    (tmp_path / "README.txt").write_text("not data")
    data_error(tmp_path, "no .parquet, .arrow or .feather files", call=lambda: ArrowLoader(tmp_path, 4))


def test_a_file_that_is_not_a_dataset_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    data_error(path, "not a dataset file", call=lambda: ArrowLoader(path, 4))


@pytest.mark.parametrize("content", [b"definitely not parquet" * 10, b""])
def test_unreadable_file(tmp_path, content):
    write_ids(tmp_path, 20, rows_per_file=10)
    (tmp_path / "part-00001.parquet").write_bytes(content)
    data_error(tmp_path / "part-00001.parquet", "not a readable Parquet file", call=lambda: ArrowLoader(tmp_path, 4))


def test_truncated_file(tmp_path):
    write_ids(tmp_path, 40, rows_per_file=20)
    victim = tmp_path / "part-00001.parquet"
    with open(victim, "r+b") as file:
        file.truncate(os.path.getsize(victim) // 2)
    data_error(victim, "not a readable Parquet file", call=lambda: ArrowLoader(tmp_path, 4))


def test_truncated_ipc_file(tmp_path):
    write_ids(tmp_path, 40, format="ipc")
    victim = tmp_path / "part-00000.arrow"
    with open(victim, "r+b") as file:
        file.truncate(os.path.getsize(victim) - 20)
    data_error(victim, "not a readable Arrow IPC file", call=lambda: ArrowLoader(tmp_path, 4))


def test_an_arrow_stream_is_not_an_ipc_file(tmp_path):
    table = pa.table({"id": pa.array(np.arange(10))})
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data_error(tmp_path / "stream.arrow", "not a readable Arrow IPC file", call=lambda: ArrowLoader(tmp_path, 4))


def test_file_replaced_after_the_loader_was_built(tmp_path):
    """Found while reading, in the background thread, and raised in the consumer."""
    write_ids(tmp_path, 40, rows_per_file=20, row_group_size=5)
    loader = ArrowLoader(tmp_path, 4, shuffle=False)
    write_ids(tmp_path, 30, rows_per_file=20, row_group_size=7, overwrite=True)
    data_error("part-0000", "row group", call=lambda: list(loader))


@pytest.mark.parametrize("change,found", [
    ("dtype", "column 'x' is float64 2x3 but"),
    ("shape", "column 'x' is float32 3x2 but"),
    ("missing", "missing ['id']"),
    ("extra", "extra ['extra']"),
])
def test_schema_differs_between_files(tmp_path, change, found):
    write_ids(tmp_path, 10)
    x = np.zeros((5, 2, 3), np.float32)
    columns = {"x": x, "id": np.arange(5)}
    if change == "dtype":
        columns["x"] = x.astype(np.float64)
    elif change == "shape":
        columns["x"] = np.zeros((5, 3, 2), np.float32)
    elif change == "missing":
        del columns["id"]
    else:
        columns["extra"] = np.arange(5)
    write_dataset(tmp_path / "z_later", columns)  # sorts after the first file
    data_error("z_later/part-00000.parquet", found, call=lambda: ArrowLoader(tmp_path, 2))


def test_missing_requested_column_in_one_file(tmp_path):
    write_ids(tmp_path, 10)
    write_dataset(tmp_path / "z", {"id": np.arange(4)})
    data_error("z/part-00000.parquet", "no column 'x'", call=lambda: ArrowLoader(tmp_path, 2, columns=["x", "id"]))


def test_missing_requested_column(tmp_path):
    write_ids(tmp_path, 10)
    data_error("part-00000.parquet", "no column 'label'", "columns: x, id",
               call=lambda: ArrowLoader(tmp_path, 2, columns=["x", "label"]))


def test_wrong_dtype_or_shape_against_what_the_caller_expects(tmp_path):
    write_ids(tmp_path, 10)
    data_error("part-00000.parquet", "column 'x' has dtype float32, expected float64",
               call=lambda: ArrowLoader(tmp_path, 2, columns={"x": ("float64", None)}))
    data_error("part-00000.parquet", "column 'x' has per-sample shape (2, 3), expected (3, 32, 32)",
               call=lambda: ArrowLoader(tmp_path, 2, columns={"x": (None, (3, 32, 32))}))


def test_fewer_samples_than_world_size_times_batch_size(tmp_path):
    write_ids(tmp_path, 30)
    message = data_error(tmp_path, "30 samples", "4 x 8 = 32", "drop_last",
                         call=lambda: ArrowLoader(tmp_path, 8, rank=1, world_size=4))
    assert "drop_last=False" in message
    assert len(ArrowLoader(tmp_path, 8, rank=1, world_size=4, drop_last=False)) == 1


def test_a_dataset_without_rows(tmp_path):
    write_dataset(tmp_path, {"id": np.arange(0)})
    data_error(tmp_path, "no rows", call=lambda: ArrowLoader(tmp_path, 1))


def test_null_values_are_not_silently_filled(tmp_path):
    pq.write_table(pa.table({"id": pa.array([1, None, 3])}), tmp_path / "nulls.parquet")
    data_error("nulls.parquet", "column 'id'", "null", call=lambda: list(ArrowLoader(tmp_path, 3)))


def test_null_tensor_elements(tmp_path):
    values = pa.array([1.0, None, 3.0, 4.0], pa.float32())
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(values, 2)}), tmp_path / "n.parquet")
    data_error("n.parquet", "column 'x'", "null", call=lambda: list(ArrowLoader(tmp_path, 2)))


@pytest.mark.parametrize("column,found", [
    (pa.array(["a", "b"]), "type string"),
    (pa.array([[1, 2], [3]]), "variable-length lists"),
    (pa.FixedSizeListArray.from_arrays(pa.array(["a", "b"]), 1), "holds string values"),
])
def test_unsupported_column_types(tmp_path, column, found):
    pq.write_table(pa.table({"bad": column}), tmp_path / "t.parquet")
    data_error("t.parquet", "column 'bad'", found, call=lambda: ArrowLoader(tmp_path, 1))


def test_shape_metadata_that_does_not_fit_the_lists(tmp_path):
    field = pa.field("x", pa.list_(pa.float32(), 6), metadata={b"distprop.shape": b"[4, 4]"})
    column = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(12, np.float32)), 6)
    pq.write_table(pa.table([column], schema=pa.schema([field])), tmp_path / "m.parquet")
    data_error("m.parquet", "column 'x' declares shape [4, 4]", "[6]", call=lambda: ArrowLoader(tmp_path, 1))


def test_an_unknown_uri_scheme(tmp_path):
    data_error("nosuch://bucket/data", "cannot open this URI", call=lambda: ArrowLoader("nosuch://bucket/data", 1))


def test_writer_refuses_columns_of_different_lengths(tmp_path):
    data_error(tmp_path, "column 'label' has 3 rows but column 'image' has 4",
               call=lambda: write_dataset(tmp_path, {"image": np.zeros((4, 2)), "label": np.arange(3)}))


def test_writer_refuses_object_columns(tmp_path):
    data_error(tmp_path, "column 'name' has dtype <U1",
               call=lambda: write_dataset(tmp_path, {"name": np.array(["a", "b"])}))


def test_writer_refuses_to_overwrite_silently(tmp_path):
    write_ids(tmp_path, 10)
    data_error(tmp_path, "already holds a dataset", "overwrite", call=lambda: write_ids(tmp_path, 5))
    write_ids(tmp_path, 5, overwrite=True)
    assert ArrowLoader(tmp_path, 5).num_samples == 5


def test_writer_refuses_a_chunk_with_other_columns(tmp_path):
    from distprop.data import DatasetWriter

    with DatasetWriter(tmp_path) as writer:
        writer.write({"x": np.zeros((3, 2), np.float32)})
        data_error(tmp_path, "differ from the first chunk",
                   call=lambda: writer.write({"x": np.zeros((3, 4), np.float32)}))
