"""write_dataset / DatasetWriter: layout on disk, and files plain pyarrow reads."""

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from distprop.data import ArrowLoader, DatasetWriter, write_dataset
from distprop.errors import ConfigError


def test_files_and_row_groups_follow_the_options(tmp_path):
    files = write_dataset(tmp_path, {"id": np.arange(100)}, row_group_size=16, rows_per_file=40)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["part-00000.parquet", "part-00001.parquet",
                                                     "part-00002.parquet"]
    metadata = [pq.ParquetFile(f).metadata for f in files]
    assert [m.num_rows for m in metadata] == [40, 40, 20]
    assert [metadata[0].row_group(i).num_rows for i in range(3)] == [16, 16, 8]


def test_chunked_writes_still_give_full_row_groups(tmp_path):
    with DatasetWriter(tmp_path, row_group_size=10) as writer:
        for start in range(0, 47, 7):
            writer.write({"id": np.arange(start, min(start + 7, 47))})
    metadata = pq.ParquetFile(writer.files[0]).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [10, 10, 10, 10, 7]
    assert pq.read_table(writer.files[0]).column("id").to_pylist() == list(range(47))


def test_tensor_columns_are_plain_fixed_size_lists_with_their_shape(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (20, 3, 4, 4), dtype=np.uint8)
    write_dataset(tmp_path, {"image": images, "label": np.arange(20)})
    table = pq.read_table(tmp_path)
    field = table.schema.field("image")
    assert pa.types.is_fixed_size_list(field.type) and field.type.list_size == 48
    assert field.type.value_type == pa.uint8() and not field.nullable
    assert field.metadata == {b"distprop.shape": b"[3, 4, 4]"}
    assert table.column("image").to_pylist()[3] == images[3].reshape(-1).tolist()
    assert table.column("label").type == pa.int64()


def test_fixed_shape_tensor_option(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    write_dataset(tmp_path, {"x": x}, tensor_type="fixed_shape_tensor")
    column = pq.read_table(tmp_path).column("x")
    assert isinstance(column.type, pa.FixedShapeTensorType)
    np.testing.assert_array_equal(column.chunk(0).to_numpy_ndarray(), x)
    np.testing.assert_array_equal(next(iter(ArrowLoader(tmp_path, 4, shuffle=False)))["x"], x)


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_ipc_format_is_readable_as_feather(tmp_path, compression):
    x = np.arange(60, dtype=np.float64).reshape(10, 6)
    files = write_dataset(tmp_path, {"x": x, "y": np.arange(10)}, format="ipc", compression=compression,
                          row_group_size=4)
    table = feather.read_table(files[0])
    assert table.num_rows == 10 and table.column("x").num_chunks == 3
    batches = list(ArrowLoader(tmp_path, 10, shuffle=False))
    np.testing.assert_array_equal(batches[0]["x"], x)


@pytest.mark.parametrize("compression", ["snappy", "zstd", "gzip"])
def test_parquet_compressions_read_back(tmp_path, compression):
    x = np.random.default_rng(1).standard_normal((30, 5)).astype(np.float32)
    write_dataset(tmp_path, {"x": x}, compression=compression)
    assert pq.ParquetFile(next(tmp_path.iterdir())).metadata.row_group(0).column(0).compression == \
        compression.upper()
    np.testing.assert_array_equal(next(iter(ArrowLoader(tmp_path, 30, shuffle=False)))["x"], x)


def test_uri_destination(tmp_path):
    write_dataset((tmp_path / "d").as_uri(), {"id": np.arange(5)})
    assert pq.read_table(tmp_path / "d").num_rows == 5


def test_an_empty_write_still_records_the_columns(tmp_path):
    files = write_dataset(tmp_path, {"id": np.arange(0), "x": np.zeros((0, 3), np.float32)})
    schema = pq.read_schema(files[0])
    assert schema.names == ["id", "x"]


@pytest.mark.parametrize("options", [dict(format="csv"), dict(compression="lzo"),
                                     dict(format="ipc", compression="snappy"), dict(row_group_size=0),
                                     dict(tensor_type="ragged")])
def test_bad_options_are_config_errors(tmp_path, options):
    with pytest.raises(ConfigError):
        write_dataset(tmp_path, {"id": np.arange(3)}, **options)
