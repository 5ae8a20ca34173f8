"""ArrowLoader on real files: shards, order, padding, resume, layouts, threads, URIs."""

import json
import re
from collections import Counter
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from data_helpers import batch_ids, rank_loaders, write_ids
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from media_helpers import write_images

from distprop.data import ArrowLoader
from distprop.data.loader import DataWarning
from distprop.data.transforms import CenterCrop
from distprop.errors import ConfigError, DataError


@pytest.fixture
def dataset(tmp_path):
    """101 rows (odd on purpose) in 3 files of row groups of 8."""
    path = tmp_path / "ds"
    x = write_ids(path, 101, row_group_size=8, rows_per_file=40)
    return path, x


def flat(batches):
    return [i for batch in batches for i in batch]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 70), world_size=st.integers(1, 4), batch_size=st.integers(1, 7),
       drop_last=st.booleans(), row_group_size=st.integers(1, 16))
def test_shards_are_exact_and_disjoint(tmp_path_factory, n, world_size, batch_size, drop_last, row_group_size):
    assume(not (drop_last and n < world_size * batch_size))  # refused with a DataError, tested separately
    path = tmp_path_factory.mktemp("ds")
    x = write_ids(path, n, row_group_size=row_group_size, rows_per_file=25)
    per_rank = []
    for loader in rank_loaders(path, world_size, batch_size, drop_last=drop_last, seed=5, shuffle_window=2):
        batches = list(loader)
        assert len(batches) == len(loader)
        for batch in batches:
            np.testing.assert_array_equal(batch["x"], x[batch["id"]])
        per_rank.append([b["id"].tolist() for b in batches])
    assert len({len(r) for r in per_rank}) == 1, "every rank yields the same number of batches"
    assert len({tuple(map(len, r)) for r in per_rank}) == 1, "batch k has the same size on every rank"
    seen = [i for rank in per_rank for i in flat(rank)]
    if drop_last:
        assert len(seen) == len(set(seen))
        assert len(seen) == n // (world_size * batch_size) * world_size * batch_size
    else:
        assert set(seen) == set(range(n))
        assert len(seen) - n < world_size


def test_batches_hold_the_right_rows_dtypes_and_shapes(dataset):
    path, x = dataset
    loader = ArrowLoader(path, 16)
    batch = next(iter(loader))
    assert batch["x"].shape == (16, 2, 3) and batch["x"].dtype == np.float32
    assert batch["id"].shape == (16,) and batch["id"].dtype == np.int64
    assert batch["x"].flags.c_contiguous and batch["x"].flags.writeable
    np.testing.assert_array_equal(batch["x"], x[batch["id"]])
    assert list(loader.columns) == ["x", "id"]


def test_same_seed_and_epoch_give_the_same_batches_on_fresh_loaders(dataset):
    path, _ = dataset
    first, second = ArrowLoader(path, 10, seed=3), ArrowLoader(path, 10, seed=3)
    first.set_epoch(4)
    second.set_epoch(4)
    assert batch_ids(first) == batch_ids(second)


def test_another_epoch_gives_another_order_of_the_same_samples(dataset):
    path, _ = dataset
    loader = ArrowLoader(path, 10, drop_last=False)
    epoch0 = batch_ids(loader)
    loader.set_epoch(1)
    epoch1 = batch_ids(loader)
    assert epoch0 != epoch1
    assert sorted(flat(epoch0)) == sorted(flat(epoch1)) == list(range(101))


def test_an_exhausted_epoch_repeats_until_set_epoch(dataset):
    path, _ = dataset
    loader = ArrowLoader(path, 10)
    assert batch_ids(loader) == batch_ids(loader)


def test_without_shuffle_batches_follow_the_files(dataset):
    path, _ = dataset
    assert flat(batch_ids(ArrowLoader(path, 10, shuffle=False, drop_last=False))) == list(range(101))


def test_drop_last_false_pads_by_wrapping_and_keeps_batch_sizes_equal(dataset):
    path, _ = dataset
    loaders = rank_loaders(path, 4, 10, drop_last=False)
    per_rank = [batch_ids(loader) for loader in loaders]
    # ceil(101 / 4) = 26 samples per rank: batches of 10, 10, 6 on every rank.
    assert [list(map(len, r)) for r in per_rank] == [[10, 10, 6]] * 4
    assert all(len(loader) == 3 for loader in loaders)
    seen = flat(flat(per_rank))
    assert set(seen) == set(range(101)) and len(seen) == 104
    # The 3 repeats come from the start of the epoch's order (rank 0's first batch)
    # and fill the end of the last rank's last batch.
    repeats = {i for i, count in Counter(seen).items() if count == 2}
    assert len(repeats) == 3
    assert repeats <= set(per_rank[0][0]) and repeats <= set(per_rank[3][-1])


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("cut", [0, 1, 5, 13, 14])
def test_mid_epoch_resume_yields_exactly_the_rest(dataset, cut, drop_last):
    path, _ = dataset
    options = dict(seed=11, drop_last=drop_last, world_size=1)
    reference = ArrowLoader(path, 7, **options)
    reference.set_epoch(2)
    full = batch_ids(reference)
    assert len(full) == (14 if drop_last else 15)
    cut = min(cut, len(full))
    original = ArrowLoader(path, 7, **options)
    original.set_epoch(2)
    stream = iter(original)
    head = [next(stream)["id"].tolist() for _ in range(cut)]
    state = json.loads(json.dumps(original.state_dict()))  # checkpoints are JSON-safe
    assert state["epoch"] == 2 and state["batches_consumed"] == cut

    restored = ArrowLoader(path, 7, **options)
    restored.load_state_dict(state)
    restored.set_epoch(2)  # the usual loop calls this; it must keep the position
    rest = batch_ids(restored)
    assert head + rest == full
    assert [b["id"].tolist() for b in stream] == rest  # the original goes on identically


def test_every_rank_resumes_its_own_shard_from_rank_0s_state(dataset):
    path, _ = dataset
    full = [batch_ids(loader) for loader in rank_loaders(path, 3, 4, seed=9)]
    originals = rank_loaders(path, 3, 4, seed=9)
    for loader in originals:
        stream = iter(loader)
        next(stream), next(stream)
        stream.close()
    for rank, loader in enumerate(rank_loaders(path, 3, 4, seed=9)):
        loader.load_state_dict(originals[0].state_dict())
        assert batch_ids(loader) == full[rank][2:]


def test_reading_runs_ahead_by_prefetch_and_the_state_counts_only_batches_handed_out(dataset):
    path, _ = dataset
    built, ahead = [], threading.Event()

    def record(batch):  # runs where batches are built: in the background
        built.append(batch["id"].tolist())
        if len(built) >= 1 + 4:
            ahead.set()
        return batch

    loader = ArrowLoader(path, 5, prefetch=4, transform=record)
    stream = iter(loader)
    first = next(stream)
    assert ahead.wait(timeout=60), f"the loader built {len(built)} batches, not the one taken plus 4 ahead"
    assert len(built) <= 1 + 4 + 1, "read ahead further than prefetch allows (one more may wait to be queued)"
    assert loader.state_dict()["batches_consumed"] == 1
    assert first["id"].tolist() == built[0] and next(stream)["id"].tolist() == built[1]
    stream.close()


@pytest.mark.parametrize("new_world,new_batch", [(2, 7), (3, 5), (1, 4), (4, 3)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_with_another_world_size_reshards_the_rest_of_the_epoch(dataset, new_world, new_batch, drop_last):
    path, _ = dataset
    old = rank_loaders(path, 3, 7, seed=2, drop_last=drop_last)
    consumed = []
    for loader in old:
        loader.set_epoch(1)
        stream = iter(loader)
        consumed += flat(next(stream)["id"].tolist() for _ in range(2))
        stream.close()
    state = old[0].state_dict()

    new = rank_loaders(path, new_world, new_batch, seed=2, drop_last=drop_last)
    for loader in new:
        loader.load_state_dict(state)
    rest = [batch_ids(loader) for loader in new]
    assert len({len(r) for r in rest}) == 1, "equal batch counts after re-sharding"
    yielded = flat(flat(rest))
    assert set(yielded).isdisjoint(consumed)
    if drop_last:
        assert len(yielded) == len(set(yielded))
        assert 101 - len(consumed) - len(yielded) < new_world * new_batch
    else:
        assert set(yielded) | set(consumed) == set(range(101))
        assert len(yielded) - (101 - len(consumed)) < new_world

    # Saving again mid-way through the re-sharded stretch and restoring on yet
    # another world size still never repeats a sample.
    again = rank_loaders(path, new_world, new_batch, seed=2, drop_last=drop_last)
    taken = []
    for loader in again:
        loader.load_state_dict(state)
        stream = iter(loader)
        taken += flat(b["id"].tolist() for _, b in zip(range(1), stream))
        stream.close()
    final = rank_loaders(path, 2, 3, seed=2, drop_last=drop_last)
    for loader in final:
        loader.load_state_dict(again[0].state_dict())
    last = flat(flat(batch_ids(loader) for loader in final))
    assert set(last).isdisjoint(consumed + taken)
    if not drop_last:
        assert set(last) | set(consumed) | set(taken) == set(range(101))


def test_next_epoch_after_a_resharded_resume_is_a_full_epoch(dataset):
    path, _ = dataset
    old = ArrowLoader(path, 5, world_size=2, rank=0)
    stream = iter(old)
    next(stream)
    new = ArrowLoader(path, 5)
    new.load_state_dict(old.state_dict())
    new.set_epoch(1)
    assert len(batch_ids(new)) == len(new) == 20


def test_restoring_a_state_from_another_setup_is_refused(dataset, tmp_path):
    path, _ = dataset
    state = ArrowLoader(path, 5, seed=1).state_dict()
    with pytest.raises(ConfigError, match="seed=1"):
        ArrowLoader(path, 5, seed=2).load_state_dict(state)
    other = tmp_path / "other"
    write_ids(other, 50)
    with pytest.raises(DataError, match="another dataset"):
        ArrowLoader(other, 5, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="999 batches"):
        ArrowLoader(path, 5, seed=1).load_state_dict(dict(state, batches_consumed=999))


def test_transform_runs_in_the_background_thread(dataset):
    path, _ = dataset
    threads = set()

    def transform(batch):
        threads.add(threading.current_thread().name)
        return {"x": batch["x"] * 2, "id": batch["id"]}

    loader = ArrowLoader(path, 10, transform=transform)
    batch = next(iter(loader))
    assert threads == {"distprop-loader"}
    assert batch["x"][0, 0, 0] == batch["id"][0] * 200


def test_an_error_in_the_background_reaches_the_consumer_with_its_message(dataset):
    path, _ = dataset

    def transform(batch):
        raise KeyError("augmentation failed on purpose")

    with pytest.raises(KeyError, match="augmentation failed on purpose"):
        list(ArrowLoader(path, 10, transform=transform))


def loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("distprop-loader")]


def test_an_abandoned_iterator_stops_its_threads(dataset):
    path, _ = dataset
    loader = ArrowLoader(path, 2, prefetch=2)
    for batch in loader:
        break
    deadline = time.monotonic() + 5
    while loader_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert loader_threads() == []
    assert loader.state_dict()["batches_consumed"] == 1
    assert len(batch_ids(loader)) == len(loader) - 1  # a new pass continues the epoch


def test_prefetch_zero_reads_in_the_calling_thread(dataset):
    path, _ = dataset
    threads = set()

    def transform(batch):
        threads.add(threading.current_thread().name)
        return batch

    inline = batch_ids(ArrowLoader(path, 10, prefetch=0, transform=transform))
    assert threads == {threading.current_thread().name}
    assert inline == batch_ids(ArrowLoader(path, 10, prefetch=3))


def test_memory_is_bounded_by_a_few_row_groups(tmp_path, monkeypatch):
    """The most blocks held decoded at once depends on the window, not the dataset size."""
    from distprop.data import reader

    write_ids(tmp_path, 2000, row_group_size=10)
    live, peak = set(), [0]
    original_read = reader.BlockReader.read

    class Tracked(dict):
        def __del__(self):
            live.discard(id(self))

    def read(self, block):
        result = Tracked(original_read(self, block))
        live.add(id(result))
        peak[0] = max(peak[0], len(live))
        return result

    monkeypatch.setattr(reader.BlockReader, "read", read)
    for _ in ArrowLoader(tmp_path, 10, shuffle_window=3, read_threads=2):
        pass
    assert 3 <= peak[0] <= 2 * 3, peak[0]  # the window being consumed and the next one


def test_columns_selects_and_orders_columns(dataset):
    path, _ = dataset
    batch = next(iter(ArrowLoader(path, 4, columns=["id"])))
    assert list(batch) == ["id"]
    checked = ArrowLoader(path, 4, columns={"id": ("int64", ()), "x": (np.float32, (2, 3))})
    assert list(next(iter(checked))) == ["id", "x"]


def test_ipc_files_are_read_memory_mapped(tmp_path):
    x = write_ids(tmp_path, 50, format="ipc", rows_per_file=20)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".arrow"] * 3
    for batch in ArrowLoader(tmp_path, 5, drop_last=False):
        np.testing.assert_array_equal(batch["x"], x[batch["id"]])


def test_every_tensor_layout_reads_back_the_same(tmp_path):
    x = np.arange(30 * 12, dtype=np.float64).reshape(30, 3, 2, 2)
    ids = pa.array(np.arange(30))
    flat_values = pa.array(x.reshape(-1))
    nested = flat_values
    for size in (2, 2, 3):
        nested = pa.FixedSizeListArray.from_arrays(nested, size)
    layouts = {
        "tensor": pa.FixedShapeTensorArray.from_numpy_ndarray(x),
        "nested": nested,  # what polars writes for Array(shape=(3, 2, 2))
        "sliced": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([np.zeros(12), x.reshape(-1)])),
                                                    12).slice(1),  # a non-zero offset
    }
    for name, column in layouts.items():
        pq.write_table(pa.table({"x": column, "id": ids}), tmp_path / f"{name}.parquet", row_group_size=7)
        loader = ArrowLoader(tmp_path / f"{name}.parquet", 6, drop_last=False)
        expected_shape = (12,) if name == "sliced" else (3, 2, 2)
        assert loader.columns["x"].shape == expected_shape
        for batch in loader:
            np.testing.assert_array_equal(batch["x"].reshape(-1, 3, 2, 2), x[batch["id"]], err_msg=name)


def test_permuted_fixed_shape_tensors_come_back_in_logical_order(tmp_path):
    x = np.arange(10 * 6, dtype=np.int32).reshape(10, 2, 3)
    # Stored as (3, 2) per sample; permutation [1, 0] makes the logical shape (2, 3).
    tensor_type = pa.fixed_shape_tensor(pa.int32(), [3, 2], permutation=[1, 0])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(x.transpose(0, 2, 1).reshape(-1)), 6)
    column = pa.ExtensionArray.from_storage(tensor_type, storage)
    pq.write_table(pa.table({"x": column, "id": pa.array(np.arange(10))}), tmp_path / "p.parquet")
    batch = next(iter(ArrowLoader(tmp_path / "p.parquet", 10, shuffle=False)))
    np.testing.assert_array_equal(batch["x"], x)


def test_file_uri_and_explicit_filesystem(dataset):
    path, _ = dataset
    expected = batch_ids(ArrowLoader(path, 10))
    assert batch_ids(ArrowLoader(path.as_uri(), 10)) == expected
    filesystem, inner = pafs.FileSystem.from_uri(path.as_uri())
    assert batch_ids(ArrowLoader(inner, 10, filesystem=filesystem)) == expected


def test_a_non_local_filesystem_takes_the_generic_path(tmp_path):
    """Object stores are reached through a pyarrow FileSystem object like this one
    (not a LocalFileSystem, so nothing is memory-mapped): parquet and IPC both."""
    x = write_ids(tmp_path / "pq", 40)
    write_ids(tmp_path / "ipc", 40, format="ipc")
    remote_like = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    for name in ("pq", "ipc"):
        for batch in ArrowLoader(name, 8, filesystem=remote_like):
            np.testing.assert_array_equal(batch["x"], x[batch["id"]])


def test_files_in_hidden_or_underscore_directories_are_not_data(tmp_path):
    """A notebook's .ipynb_checkpoints/ copy or Spark's _temporary/ inside the dataset
    would otherwise be read as more samples (pyarrow.dataset skips them too); a hidden
    directory above the dataset's root is fine."""
    root = tmp_path / ".cache" / "ds"
    write_ids(root, 20)
    for hidden in (".ipynb_checkpoints", "_temporary/0", "sub/.hidden"):
        write_ids(root / hidden, 20)
    (root / "README.txt").write_text("not data")
    (root / "_SUCCESS").write_bytes(b"")
    assert ArrowLoader(root, 5).num_samples == 20
    write_ids(root, 10, overwrite=True)  # the writer sees the same files: it leaves these alone
    assert (root / "_temporary" / "0" / "part-00000.parquet").exists()
    assert ArrowLoader(root, 5).num_samples == 10


def test_fingerprint_ignores_where_the_dataset_lives(tmp_path):
    write_ids(tmp_path / "a", 30)
    write_ids(tmp_path / "b", 30)
    write_ids(tmp_path / "c", 31)
    a, b, c = (ArrowLoader(tmp_path / name, 5) for name in "abc")
    assert a.fingerprint == b.fingerprint != c.fingerprint


class FakeComm:
    """allgather over loaders built in one process, as ranks would hand them over."""

    def __init__(self, loaders):
        self.loaders = loaders

    def allgather(self, _mine):
        return [loader._consistency_record() for loader in self.loaders]


def test_check_consistent_catches_ranks_that_disagree(dataset):
    path, _ = dataset
    loaders = rank_loaders(path, 3, 5)
    loaders[0].check_consistent(FakeComm(loaders))
    loaders[2].set_epoch(1)
    with pytest.raises(DataError, match="rank 2 has {'epoch': 1}"):
        loaders[0].check_consistent(FakeComm(loaders))
    loaders[2].set_epoch(0)
    stream = iter(loaders[1])  # a position restored on one rank only: it has fewer batches to go
    next(stream)
    with pytest.raises(DataError, match="rank 1 has {'batches_left': 5}"):
        loaders[0].check_consistent(FakeComm(loaders))
    stream.close()
    others = rank_loaders(path, 3, 5) + [ArrowLoader(path, 5, rank=2, world_size=3, shuffle=False)]
    with pytest.raises(DataError, match="rank 2 has {'shuffle': False}"):
        others[0].check_consistent(FakeComm(others[:2] + others[3:]))
    duplicated = [ArrowLoader(path, 5, rank=0, world_size=2) for _ in range(2)]
    with pytest.raises(DataError, match=r"claim ranks \[0, 0\]"):
        duplicated[0].check_consistent(FakeComm(duplicated))


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(rank=3, world_size=3), dict(prefetch=-1),
                                 dict(seed=-1), dict(shuffle_window=0), dict(device="tpu"),
                                 dict(batch_size=2.5)])
def test_bad_arguments_are_config_errors(dataset, bad):
    path, _ = dataset
    options = dict(batch_size=4)
    options.update(bad)
    batch_size = options.pop("batch_size")
    with pytest.raises(ConfigError):
        ArrowLoader(path, batch_size, **options)


def test_cpu_path_never_imports_cupy(dataset):
    path, _ = dataset
    program = ("import sys; from distprop.data import ArrowLoader; "
               f"list(ArrowLoader({str(path)!r}, 10)); assert 'cupy' not in sys.modules")
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60)


@pytest.mark.gpu
def test_gpu_device_yields_cupy_arrays_equal_to_the_cpu_ones(dataset):
    from distprop import backend

    path, _ = dataset
    expected = list(ArrowLoader(path, 10, seed=1))
    got = list(ArrowLoader(path, 10, seed=1, device="gpu"))
    transformed = list(ArrowLoader(path, 10, seed=1, device="gpu", transform=lambda b: {"x": b["x"] + 1}))
    for want, have, plus_one in zip(expected, got, transformed):
        assert backend.device_of(have["x"]) == "gpu"
        np.testing.assert_array_equal(backend.to_numpy(have["x"]), want["x"])
        np.testing.assert_array_equal(backend.to_numpy(have["id"]), want["id"])
        np.testing.assert_array_equal(backend.to_numpy(plus_one["x"]), want["x"] + 1)


def test_the_order_follows_the_shuffle_window(dataset):
    """With a window of one block, each row group's rows stay together in the order;
    wider windows mix them, differently for each width."""
    path, _ = dataset
    orders = {}
    for window in (1, 2, 7):
        loader = ArrowLoader(path, 101, seed=3, shuffle_window=window, drop_last=False)
        (orders[window],) = batch_ids(loader)
        assert sorted(orders[window]) == list(range(101))
    blocks = [i // 8 for i in orders[1]]  # row groups of 8 rows (files of 40 and 21)
    runs = [b for k, b in enumerate(blocks) if k == 0 or b != blocks[k - 1]]
    assert len(runs) == len(set(runs)) == 13, "a block's rows were not kept together"
    assert orders[1] != orders[2] != orders[7] != orders[1]


def test_an_exhausted_epoch_is_saved_as_fully_consumed(dataset):
    path, _ = dataset
    loader = ArrowLoader(path, 10, seed=1)
    everything = batch_ids(loader)
    state = loader.state_dict()
    assert state["batches_consumed"] == len(everything) == len(loader) and state["epoch"] == 0
    resumed = ArrowLoader(path, 10, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert batch_ids(resumed) == []  # nothing left of that epoch
    assert batch_ids(resumed) == everything  # and the epoch again after that, as a fresh loader would
    expected = {"version", "fingerprint", "num_samples", "seed", "shuffle", "shuffle_window", "drop_last", "epoch",
                "world_size", "batch_size", "batches_consumed", "history"}
    assert expected <= set(state) and state["num_samples"] == 101


def test_a_closed_iterator_yields_nothing_more_and_keeps_the_position(dataset):
    path, _ = dataset
    loader = ArrowLoader(path, 10)
    stream = iter(loader)
    next(stream)
    stream.close()
    stream.close()  # a second close is harmless
    with pytest.raises(StopIteration):
        next(stream)
    assert loader.state_dict()["batches_consumed"] == 1


def test_set_epoch_and_load_state_dict_name_what_is_wrong(dataset, tmp_path):
    path, _ = dataset
    loader = ArrowLoader(path, 5, seed=1)
    with pytest.raises(ConfigError, match=r"^epoch must be an integer >= 0, got -1$"):
        loader.set_epoch(-1)
    state = loader.state_dict()
    with pytest.raises(ConfigError, match=r"^loader state has version 7, expected 1$"):
        loader.load_state_dict(dict(state, version=7))
    where = loader.index.location.display
    with pytest.raises(DataError, match="^" + re.escape(f"{where}: loader state says 21 batches were consumed but "
                                                        "that stretch of the epoch has 20")):
        loader.load_state_dict(dict(state, batches_consumed=21))
    with pytest.raises(ConfigError, match=r"^loader state has shuffle_window=4 but this loader has "
                                          r"shuffle_window=2; the sample order would differ$"):
        ArrowLoader(path, 5, seed=1, shuffle_window=2).load_state_dict(state)


def test_load_state_dict_checks_every_stage_against_the_stages_before_it(dataset):
    path, _ = dataset
    where = ArrowLoader(path, 4).index.location.display
    dropping = ArrowLoader(path, 10, drop_last=True)  # 10 full batches; 11 without drop_last
    with pytest.raises(DataError, match=re.escape(f"{where}: loader state says 11 batches were consumed")):
        dropping.load_state_dict(dict(dropping.state_dict(), batches_consumed=11))
    # 3 ranks took 5 of their 8 batches of 4 (60 of 101 samples), then 2 ranks of 7 go
    # on: 41 left, 2 full batches each (drop_last, the default).
    state = dict(ArrowLoader(path, 7, world_size=2).state_dict(), history=[[3, 4, 5]], batches_consumed=2)
    ArrowLoader(path, 7, world_size=2).load_state_dict(state)
    with pytest.raises(DataError, match=re.escape(f"{where}: loader state says 3 batches were consumed but that "
                                                  "stretch of the epoch has 2")):
        ArrowLoader(path, 7, world_size=2).load_state_dict(dict(state, batches_consumed=3))
    with pytest.raises(DataError, match=re.escape(f"{where}: loader state says 9 batches were consumed but that "
                                                  "stretch of the epoch has 8")):
        ArrowLoader(path, 7, world_size=2).load_state_dict(dict(state, history=[[3, 4, 9]]))


def test_resuming_under_another_setup_before_any_batch_adds_no_stage(dataset):
    path, _ = dataset
    state = ArrowLoader(path, 5, world_size=3).state_dict()  # nothing consumed yet
    resumed = ArrowLoader(path, 7, world_size=2)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["history"] == [] and resumed.state_dict()["batches_consumed"] == 0
    assert len(batch_ids(resumed)) == len(resumed)


def test_check_consistent_names_each_field_that_differs(dataset, tmp_path):
    path, _ = dataset
    other = tmp_path / "other"
    write_ids(other, 101, row_group_size=8, rows_per_file=40, shape=(3, 2))  # same rows, another schema
    cases = {
        "fingerprint": ArrowLoader(other, 5, rank=1, world_size=2),
        "batch_size": ArrowLoader(path, 6, rank=1, world_size=2),
        "drop_last": ArrowLoader(path, 5, rank=1, world_size=2, drop_last=False),
        "shuffle_window": ArrowLoader(path, 5, rank=1, world_size=2, shuffle_window=3),
        "seed": ArrowLoader(path, 5, rank=1, world_size=2, seed=9),
    }
    for field, loader in cases.items():
        group = [ArrowLoader(path, 5, rank=0, world_size=2), loader]
        with pytest.raises(DataError, match=rf": rank 1 has {{'{field}': .*}} but rank 0 has {{'{field}': "):
            group[0].check_consistent(FakeComm(group))
    sizes = [ArrowLoader(path, 5, rank=0, world_size=2), ArrowLoader(path, 5, rank=1, world_size=3)]
    # 101 rows in whole batches of 5: 10 per rank for 2 ranks, 6 for 3; the batch counts follow
    with pytest.raises(DataError, match=r": rank 1 has \{'world_size': 3, 'batches': 6, 'batches_left': 6\} "
                                        r"but rank 0 has \{'world_size': 2, 'batches': 10, 'batches_left': 10\}$"):
        sizes[0].check_consistent(FakeComm(sizes))


def test_a_rank_done_with_its_epoch_agrees_with_one_that_starts_it_again(dataset):
    path, _ = dataset
    done, fresh = rank_loaders(path, 2, 5)
    batch_ids(done)  # epoch 0 over; it would repeat on the next iteration
    iter(fresh).close()
    done.check_consistent(FakeComm([done, fresh]))
    with pytest.raises(DataError, match=r"^.*: rank 1 has \{'epoch': 1\} but rank 0 has \{'epoch': 0\}$"):
        fresh.set_epoch(1)
        done.check_consistent(FakeComm([done, fresh]))


def test_what_an_epoch_left_out_is_forgotten_when_the_next_one_is_chosen(tmp_path):
    write_images(tmp_path / "d.parquet", 6, size=(24, 24), replace={2: b"plain text, not an image"})
    loader = ArrowLoader(tmp_path, 2, shuffle=False, on_error="skip", image_transforms=[CenterCrop(16)])
    with pytest.warns(DataWarning, match="left out 1 sample"):
        assert [b["label"].tolist() for b in loader] == [[0, 1], [3], [4, 5]]
    assert len(loader.skipped) == 1 and "row 2" in loader.skipped[0]
    loader.set_epoch(1)
    assert loader.skipped == []  # the current epoch has left nothing out yet


def test_what_was_left_out_counts_for_the_current_pass_through_the_epoch(tmp_path):
    write_images(tmp_path / "d.parquet", 6, size=(24, 24), replace={2: b"plain text, not an image"})
    loader = ArrowLoader(tmp_path, 2, shuffle=False, on_error="skip", image_transforms=[CenterCrop(16)])
    stream = iter(loader)
    assert [next(stream)["label"].tolist() for _ in range(2)] == [[0, 1], [3]]
    stream.close()
    with pytest.warns(DataWarning, match="left out 1 sample"):  # continued: row 2 was left out in this pass
        assert [b["label"].tolist() for b in loader] == [[4, 5]]
    assert len(loader.skipped) == 1
    with pytest.warns(DataWarning, match="left out 1 sample"):  # the epoch again, from its start
        assert len(list(loader)) == 3
    assert len(loader.skipped) == 1 and "row 2" in loader.skipped[0]
