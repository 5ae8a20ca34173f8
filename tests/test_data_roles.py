"""Column roles: a dataset records which column is the model's input and which its
label, and `distprop train` takes them when the config names no columns."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from distprop.data import DatasetIndex
from distprop.data.converters import convert_csv, convert_digits
from distprop.data.writer import write_dataset
from distprop.errors import DataError
from distprop.train.config import TrainConfig
from distprop.train.data import describe_columns


def write_split(root, roles=None, **columns):
    columns = columns or {"pixels": np.zeros((6, 2, 2), np.float32), "target": np.arange(6, dtype=np.int64),
                          "weight": np.ones(6, np.float32)}
    return write_dataset(root / "train", columns, roles=roles)


def test_roles_are_recorded_in_the_schema_and_read_back(tmp_path):
    files = write_split(tmp_path, roles={"input": "pixels", "label": "target"})
    metadata = pq.read_schema(files[0]).metadata
    assert json.loads(metadata[b"distprop.roles"]) == {"input": "pixels", "label": "target"}
    assert DatasetIndex.open(tmp_path / "train").roles == {"input": "pixels", "label": "target"}


def test_a_dataset_without_roles_has_none(tmp_path):
    write_split(tmp_path)
    assert DatasetIndex.open(tmp_path / "train").roles == {}


@pytest.mark.parametrize("roles, message", [
    ({"input": "pixel"}, "the input role names column 'pixel', which is not written (columns: pixels, target, weight)"),
    ({"weights": "weight"}, "unknown column role 'weights' (roles: input, label)"),
])
def test_a_role_naming_no_column_or_no_role_is_refused(tmp_path, roles, message):
    with pytest.raises(DataError) as info:
        write_split(tmp_path, roles=roles)
    assert str(info.value) == f"{tmp_path / 'train'}: {message}"


def test_unreadable_roles_are_a_one_line_error(tmp_path):
    import pyarrow as pa

    (tmp_path / "train").mkdir()
    table = pa.table({"x": [1.0], "label": [0]}).replace_schema_metadata({"distprop.roles": "[not json"})
    pq.write_table(table, tmp_path / "train" / "part.parquet")
    with pytest.raises(DataError, match=r"part\.parquet: unreadable column roles in the schema metadata"):
        DatasetIndex.open(tmp_path / "train")


def test_converters_record_their_columns_roles(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed: pip install 'distprop[datasets]'")
    convert_digits(tmp_path / "digits")
    assert DatasetIndex.open(tmp_path / "digits" / "test").roles == {"input": "image", "label": "label"}
    (tmp_path / "iris.csv").write_text("a,b,species\n1,2,0\n3,4,1\n")
    convert_csv(tmp_path / "iris.csv", tmp_path / "csv", label_column="species")
    assert DatasetIndex.open(tmp_path / "csv").roles == {"input": "features", "label": "label"}


def test_the_job_takes_the_recorded_roles_and_the_config_overrides_them(tmp_path):
    write_split(tmp_path, roles={"input": "pixels", "label": "target"})
    spec, label, rows = describe_columns(TrainConfig(), str(tmp_path))
    assert (spec.name, spec.shape, label, rows) == ("pixels", (2, 2), "target", 6)
    spec, label, _ = describe_columns(TrainConfig(input_column="weight", label_column="target"), str(tmp_path))
    assert (spec.name, label) == ("weight", "target")


def test_without_roles_the_job_finds_the_columns_by_name(tmp_path):
    write_split(tmp_path, features=np.zeros((4, 3), np.float32), label=np.arange(4, dtype=np.int64),
                other=np.zeros(4, np.float32))
    spec, label, _ = describe_columns(TrainConfig(), str(tmp_path))
    assert (spec.name, label) == ("features", "label")
    write_split(tmp_path / "b", pixels=np.zeros((4, 3), np.float32), target=np.arange(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"no label column 'label' \(columns: pixels, target\); set label_column"):
        describe_columns(TrainConfig(), str(tmp_path / "b"))
