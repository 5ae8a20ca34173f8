"""Variable-length list columns of equal lengths read as tensors, and scalar columns
stacked into one features array: what pandas and Hugging Face datasets write."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distprop.data import ArrowLoader
from distprop.errors import ConfigError, DataError


def test_equal_length_lists_are_tensors(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    nested = np.arange(60, dtype=np.int64).reshape(10, 3, 2)
    table = pa.table({"x": pa.array(list(x), pa.list_(pa.float32())),
                      "m": pa.array([row.tolist() for row in nested], pa.large_list(pa.list_(pa.int64()))),
                      "id": np.arange(10)})
    pq.write_table(table, tmp_path / "l.parquet", row_group_size=4)
    loader = ArrowLoader(tmp_path, 10, shuffle=False, drop_last=False)
    assert loader.columns["x"].shape == (4,) and loader.columns["m"].shape == (3, 2)
    batch = next(iter(loader))
    np.testing.assert_array_equal(batch["x"], x)
    np.testing.assert_array_equal(batch["m"], nested)


def test_sliced_lists_honour_their_offset(tmp_path):
    """A table sliced before writing (as a dataset's shard is) keeps its offsets right."""
    table = pa.table({"e": pa.array([[float(i)] * 3 for i in range(10)], pa.list_(pa.float64()))}).slice(4)
    pq.write_table(table, tmp_path / "p.parquet")
    batch = next(iter(ArrowLoader(tmp_path, 6, shuffle=False)))
    np.testing.assert_array_equal(batch["e"], np.repeat(np.arange(4.0, 10.0)[:, None], 3, axis=1))


def test_a_list_of_another_length_in_a_later_row_group(tmp_path):
    rows = [[1.0, 2.0]] * 5 + [[1.0]] + [[3.0, 4.0]] * 2
    pq.write_table(pa.table({"x": pa.array(rows, pa.list_(pa.float32()))}), tmp_path / "l.parquet", row_group_size=4)
    loader = ArrowLoader(tmp_path, 2, shuffle=False)  # the first row group is fine
    with pytest.raises(DataError, match=r"l.parquet \(row group 1\) row 1: column 'x' holds a list of 1 values where "
                                        r"every row's list has 2"):
        list(loader)


def test_stack_scalar_columns_into_features(tmp_path):
    frame = {f"f{i}": np.arange(8, dtype=np.float32) * (i + 1) for i in range(5)}
    frame["count"] = np.arange(8, dtype=np.int64)
    frame["label"] = np.arange(8) % 2
    pq.write_table(pa.table(frame), tmp_path / "t.parquet")
    batch = next(iter(ArrowLoader(tmp_path, 8, shuffle=False, stack={"x": ["f*", "count"]})))
    assert sorted(batch) == ["label", "x"]
    expected = np.stack([frame[c] for c in ["f0", "f1", "f2", "f3", "f4", "count"]], axis=1)
    assert batch["x"].dtype == np.float64  # float32 and int64 promote as numpy promotes them
    np.testing.assert_array_equal(batch["x"], expected)
    with pytest.raises(DataError, match="no column matches 'g\\*'"):
        ArrowLoader(tmp_path, 8, stack={"x": "g*"})
    with pytest.raises(ConfigError, match="column 'f0' is in both 'a' and 'b'"):
        ArrowLoader(tmp_path, 8, stack={"a": ["f0"], "b": ["f*"]})
