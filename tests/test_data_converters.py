"""Converters, each fed files this test writes in the real format, and `distprop data`."""

import codecs
import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest

from distprop.cli import main
from distprop.data import ArrowLoader, DatasetIndex
from distprop.data.converters import (convert_cifar10, convert_csv, convert_digits, convert_mnist, convert_npz,
                                      read_cifar10_batch, read_idx)
from distprop.data.synthetic import write_synthetic
from distprop.errors import DataError


def read_all(path, columns=None):
    """Every row of a dataset in file order, as {column: array}."""
    batches = list(ArrowLoader(path, 10_000, shuffle=False, drop_last=False, columns=columns))
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def sort_by(data, key, *others):
    order = np.lexsort([data[key].reshape(len(data[key]), -1)[:, i] for i in
                        reversed(range(data[key][0].size))])
    return [data[name][order] for name in (key,) + others]


# -- MNIST IDX ---------------------------------------------------------------------

def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.fixture
def mnist_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (25, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 25).astype(np.uint8)
    (tmp_path / "images.idx").write_bytes(idx_bytes(images))
    (tmp_path / "labels.idx.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return tmp_path / "images.idx", tmp_path / "labels.idx.gz", images, labels


def test_mnist_idx(mnist_files, tmp_path):
    images_path, labels_path, images, labels = mnist_files
    convert_mnist(images_path, labels_path, tmp_path / "out", row_group_size=8)
    data = read_all(tmp_path / "out")
    assert data["image"].shape == (25, 1, 28, 28) and data["image"].dtype == np.uint8
    assert data["label"].dtype == np.int64
    # Rows are shuffled on the way; each image keeps its label.
    by_image = {row.tobytes(): label for row, label in zip(data["image"], data["label"])}
    assert by_image == {image[None].tobytes(): int(label) for image, label in zip(images, labels)}
    unshuffled = convert_mnist(images_path, labels_path, tmp_path / "ordered", shuffle=False)
    assert unshuffled and np.array_equal(read_all(tmp_path / "ordered")["label"], labels)


def test_idx_types_and_byte_order(tmp_path):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    (tmp_path / "ints.idx").write_bytes(idx_bytes(values, 0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "ints.idx"), values)


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[:-5], "promises 19600 data bytes"),
    (lambda raw: b"\x1f\x8b" + raw[2:], "cannot read"),
    (lambda raw: b"PK\x03\x04" + raw[4:], "not an IDX file"),
    (lambda raw: raw[:6], "truncated IDX header"),
])
def test_damaged_idx_files(mnist_files, tmp_path, damage, message):
    images_path, labels_path, _, _ = mnist_files
    images_path.write_bytes(damage(images_path.read_bytes()))
    with pytest.raises(DataError, match=message) as caught:
        convert_mnist(images_path, labels_path, tmp_path / "out")
    assert str(images_path) in str(caught.value)


def test_mnist_label_count_must_match(mnist_files, tmp_path):
    images_path, _, _, _ = mnist_files
    (tmp_path / "few.idx").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="expected 25 labels"):
        convert_mnist(images_path, tmp_path / "few.idx", tmp_path / "out")


# -- CIFAR-10 python batches ---------------------------------------------------------

def cifar_batch(path, n, seed, protocol=2, numpy1_names=False):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    raw = pickle.dumps({b"batch_label": b"training batch", b"labels": labels, b"data": data,
                        b"filenames": [f"img{i}.png".encode() for i in range(n)]}, protocol=protocol)
    if numpy1_names:  # what the original files (numpy 1, Python 2) name
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(raw)
    return data.reshape(n, 3, 32, 32), np.array(labels)


@pytest.fixture
def cifar_dir(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    train = [cifar_batch(directory / f"data_batch_{i}", 4, i, protocol=2 if i % 2 else 5, numpy1_names=i == 1)
             for i in range(1, 6)]
    test = cifar_batch(directory / "test_batch", 3, 99)
    return directory, train, test


def test_cifar10_batches(cifar_dir, tmp_path):
    directory, train, test = cifar_dir
    convert_cifar10(directory, tmp_path / "out", shuffle=False)
    data = read_all(tmp_path / "out" / "train")
    np.testing.assert_array_equal(data["image"], np.concatenate([images for images, _ in train]))
    np.testing.assert_array_equal(data["label"], np.concatenate([labels for _, labels in train]))
    assert data["image"].shape[1:] == (3, 32, 32)
    assert DatasetIndex.open(tmp_path / "out" / "test").num_rows == 3


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path):
    victim = tmp_path / "should-not-exist"

    class Exploit:
        def __reduce__(self):
            return os.mkdir, (str(victim),)

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": Exploit()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load posix.mkdir") as caught:
        read_cifar10_batch(tmp_path / "data_batch_1")
    assert str(tmp_path / "data_batch_1") in str(caught.value)
    assert not victim.exists()


def test_cifar10_unpickler_allows_only_latin1_bytes_from_codecs(tmp_path):
    """Protocol 2 spells bytes as _codecs.encode(text, "latin1") (and b"" as bytes());
    other codecs or arguments are refused, not run."""
    from distprop.data.safe_pickle import load_data_pickle

    class OtherCodec:
        def __reduce__(self):
            return codecs.encode, (b"x" * 100, "zlib")

    class SizedBytes:
        def __reduce__(self):
            return bytes, (10**6,)

    for payload, message in ((OtherCodec(), "_codecs.encode"), (SizedBytes(), "positional argument")):
        (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": payload}, protocol=2))
        with pytest.raises(DataError, match=message):
            read_cifar10_batch(tmp_path / "data_batch_1")
    for protocol in range(6):
        raw = pickle.dumps({b"empty": b"", b"high": b"\xff\x00"}, protocol=protocol)
        assert load_data_pickle(io.BytesIO(raw)) == {b"empty": b"", b"high": b"\xff\x00"}


def test_cifar10_missing_or_wrong_batches(cifar_dir, tmp_path):
    directory, _, _ = cifar_dir
    (directory / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: no such file"):
        convert_cifar10(directory, tmp_path / "out")
    (directory / "data_batch_3").write_bytes(pickle.dumps({b"labels": [1]}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3: no 'data' entry"):
        convert_cifar10(directory, tmp_path / "out")
    (directory / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8),
                                                           b"labels": [1, 2]}, protocol=2))
    with pytest.raises(DataError, match=r"'data' should be uint8 of shape \(n, 3072\)"):
        convert_cifar10(directory, tmp_path / "out")
    (directory / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="not a readable CIFAR-10 batch"):
        convert_cifar10(directory, tmp_path / "out")


# -- NPZ and CSV -----------------------------------------------------------------------

def test_npz(tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 2, 5)).astype(np.float32)
    np.savez(tmp_path / "arrays.npz", x=x, y=np.arange(12))
    convert_npz(tmp_path / "arrays.npz", tmp_path / "out", seed=3)
    data = read_all(tmp_path / "out")
    np.testing.assert_array_equal(data["x"], x[data["y"]])
    assert sorted(data["y"]) == list(range(12))


def test_npz_with_big_endian_arrays(tmp_path):
    x = np.arange(12, dtype=">f4").reshape(6, 2)
    np.savez(tmp_path / "be.npz", x=x, y=np.arange(6, dtype=">i8"))
    convert_npz(tmp_path / "be.npz", tmp_path / "out", shuffle=False)
    data = read_all(tmp_path / "out")
    assert data["x"].dtype == np.float32 and data["y"].dtype == np.int64
    np.testing.assert_array_equal(data["x"], x)


def test_npz_refuses_object_arrays_and_unequal_lengths(tmp_path):
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="objects.npz: not a readable .npz file"):
        convert_npz(tmp_path / "objects.npz", tmp_path / "out")
    np.savez(tmp_path / "uneven.npz", x=np.zeros(3), y=np.zeros(4))
    with pytest.raises(DataError, match="uneven.npz: column 'y' has 4 rows but column 'x' has 3"):
        convert_npz(tmp_path / "uneven.npz", tmp_path / "out")


def test_csv(tmp_path):
    (tmp_path / "iris.csv").write_text("sepal,petal,species,weight\n1.5,2,0,7\n3.5,4,1,8\n5.5,6,2,9\n")
    convert_csv(tmp_path / "iris.csv", tmp_path / "out", label_column="species", shuffle=False)
    data = read_all(tmp_path / "out")
    np.testing.assert_array_equal(data["features"], [[1.5, 2, 7], [3.5, 4, 8], [5.5, 6, 9]])
    assert data["features"].dtype == np.float32
    np.testing.assert_array_equal(data["label"], [0, 1, 2])
    convert_csv(tmp_path / "iris.csv", tmp_path / "two", label_column="species", feature_columns=["petal"],
                shuffle=False)
    np.testing.assert_array_equal(read_all(tmp_path / "two")["features"], [[2], [4], [6]])


@pytest.mark.parametrize("text,label,message", [
    ("a,b\n1,2\n", "c", "no column 'c' (columns: a, b)"),
    ("a,b\n1,x\n2,y\n", "a", "column 'b' has type string, expected numeric"),
    ("a,b\n1.5,2\n", "a", "column 'a' has type double, expected integer"),
    ("a,b\n1,\n2,3\n", "a", "column 'b' has 1 empty values"),
    ("a,b\n1,2,3\n", "a", "not a readable CSV file"),
])
def test_bad_csv(tmp_path, text, label, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        convert_csv(tmp_path / "bad.csv", tmp_path / "out", label_column=label)
    assert str(tmp_path / "bad.csv") in str(caught.value)


# -- digits and synthetic --------------------------------------------------------------

def test_digits_train_and_test_splits(tmp_path):
    written = convert_digits(tmp_path, test_fraction=0.25, seed=1)
    assert set(written) == {"train", "test"}
    train, test = read_all(tmp_path / "train"), read_all(tmp_path / "test")
    assert len(train["label"]) + len(test["label"]) == 1797
    assert len(test["label"]) == round(1797 * 0.25)
    assert train["image"].shape[1:] == (1, 8, 8) and train["image"].dtype == np.float32
    assert 0 <= train["image"].min() and train["image"].max() <= 1
    assert set(np.unique(train["label"])) == set(range(10))


def test_synthetic_is_deterministic_and_learnable(tmp_path):
    from sklearn.linear_model import LogisticRegression

    write_synthetic(tmp_path / "a", 3000, shape=(2, 4, 4), classes=4, seed=7, rows_per_file=1000)
    write_synthetic(tmp_path / "b", 3000, shape=(2, 4, 4), classes=4, seed=7, row_group_size=333)
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["image"].shape == (3000, 2, 4, 4) and a["image"].dtype == np.float32
    counts = np.bincount(a["label"], minlength=4)
    assert counts.min() > 3000 / 4 / 3, counts
    features = a["image"].reshape(3000, -1)
    model = LogisticRegression(max_iter=500).fit(features[:2000], a["label"][:2000])
    assert model.score(features[2000:], a["label"][2000:]) > 0.8


# -- the command line --------------------------------------------------------------------

def test_cli_converters(mnist_files, cifar_dir, tmp_path, capsys):
    images_path, labels_path, _, _ = mnist_files
    directory, _, _ = cifar_dir
    np.savez(tmp_path / "a.npz", v=np.arange(6))
    (tmp_path / "t.csv").write_text("f,y\n0.5,1\n1.5,0\n")
    commands = [
        ["digits", str(tmp_path / "digits"), "--test-fraction", "0.1"],
        ["mnist", str(images_path), str(labels_path), str(tmp_path / "mnist"), "--format", "ipc"],
        ["cifar10", str(directory), str(tmp_path / "cifar"), "--row-group-size", "5"],
        ["npz", str(tmp_path / "a.npz"), str(tmp_path / "npz"), "--keep-order"],
        ["csv", str(tmp_path / "t.csv"), str(tmp_path / "csv"), "--label-column", "y"],
        ["synthetic", str(tmp_path / "syn"), "--samples", "50", "--shape", "3,2,2", "--classes", "3",
         "--rows-per-file", "20", "--compression", "zstd"],
    ]
    for command in commands:
        assert main(["data", *command]) == 0, command
    out = capsys.readouterr().out
    assert "digits/train: 1617 samples" in out and "mnist: 25 samples" in out
    assert "cifar/train: 20 samples" in out and "syn: 50 samples in 3 file(s)" in out
    assert DatasetIndex.open(tmp_path / "mnist").files[0].kind == "ipc"
    assert main(["data", "info", str(tmp_path / "syn")]) == 0
    assert "column       image: float32 3x2x2" in capsys.readouterr().out


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("f,y\n0.5,1\n")
    assert main(["data", "csv", str(tmp_path / "t.csv"), str(tmp_path / "out"), "--label-column", "z"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no column 'z'" in error and str(tmp_path / "t.csv") in error
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    assert main(["data", "synthetic", str(tmp_path / "s"), "--samples", "0"]) == 2
    assert main(["data", "synthetic", str(tmp_path / "s"), "--samples", "5", "--dtype", "float33"]) == 2
