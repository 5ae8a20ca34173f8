"""Token sequences: packing into windows, padding, resume and re-sharding, bad documents.

The reference is the obvious construction in plain Python: concatenate the
documents (with the end token), cut windows of L+1 tokens at every L-th token.
Tests taking `packing` run once with the compiled (numba) kernels and once with
numpy alone, as where numba is not installed."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from media_helpers import write_documents

from distprop.data import ArrowLoader, tokens
from distprop.errors import ConfigError, DataError


def documents(count: int, seed: int = 0, vocab: int = 1000) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(1, 40))).tolist() for _ in range(count)]


def reference_windows(docs, length: int, eos=None):
    """(input_ids, labels, document_ids, positions) of every window, by the definition."""
    stream, owner, place = [], [], []
    for number, doc in enumerate(docs):
        tokens = doc + ([eos] if eos is not None else [])
        stream += tokens
        owner += [number] * len(tokens)
        place += list(range(len(tokens)))
    windows = []
    for s in range((len(stream) - 1) // length):
        lo = s * length
        ids = stream[lo:lo + length + 1]
        docs_in = owner[lo:lo + length]
        windows.append((ids[:-1], ids[1:], [d - docs_in[0] for d in docs_in], place[lo:lo + length]))
    return windows


@pytest.fixture(params=["compiled", "numpy"])
def packing(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(tokens, "kernels", lambda: None)
    else:  # the test extra installs numba: without it both runs would test numpy
        assert tokens.kernels() is not None
    return request.param


@pytest.mark.parametrize("eos", [None, 0])
def test_packed_windows_are_the_concatenated_documents(tmp_path, eos, packing):
    docs = documents(60)
    write_documents(tmp_path / "t.parquet", docs, row_group_size=7)
    loader = ArrowLoader(tmp_path, 3, sequence_length=16, eos_token=eos, shuffle=False, drop_last=False,
                         positions=True)
    expected = reference_windows(docs, 16, eos)
    assert loader.num_samples == len(expected)
    got = [tuple(batch[k][j].tolist() for k in ("input_ids", "labels", "document_ids", "positions"))
           for batch in loader for j in range(len(batch["input_ids"]))]
    assert got[:len(expected)] == [tuple(w) for w in expected]


def test_positions_without_document_ids(tmp_path, packing):
    docs = documents(30, seed=4)
    write_documents(tmp_path / "t.parquet", docs, row_group_size=4)
    loader = ArrowLoader(tmp_path, 5, sequence_length=9, eos_token=0, seed=2, document_ids=False, positions=True)
    batches = list(loader)
    assert "document_ids" not in batches[0]
    expected = {tuple(w[0]): w[3] for w in reference_windows(docs, 9, eos=0)}
    assert all(expected[tuple(ids)] == places
               for batch in batches for ids, places in zip(batch["input_ids"].tolist(), batch["positions"].tolist()))


def test_shuffled_packing_covers_each_window_once(tmp_path):
    docs = documents(80, seed=1)
    write_documents(tmp_path / "t.parquet", docs, row_group_size=6)
    expected = sorted(tuple(w[0]) for w in reference_windows(docs, 12, eos=0))
    got = []
    for rank in range(3):
        loader = ArrowLoader(tmp_path, 4, sequence_length=12, eos_token=0, seed=5, rank=rank, world_size=3)
        got += [tuple(row) for batch in loader for row in batch["input_ids"].tolist()]
    assert len(got) == len(set(got)) == len(expected) // 12 * 12
    assert set(got) <= set(expected)


def test_windows_spanning_several_row_groups(tmp_path, packing):
    docs = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]  # row groups of one short document each
    write_documents(tmp_path / "t.parquet", docs, row_group_size=1)
    batch = next(iter(ArrowLoader(tmp_path, 1, sequence_length=6, shuffle=False)))
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]] and batch["labels"].tolist() == [[2, 3, 4, 5, 6, 7]]
    assert batch["document_ids"].tolist() == [[0, 0, 1, 2, 2, 2]]


def test_blocks_a_window_runs_on_into():
    """Hand-computed: blocks of 5, 1, 3 and 6 tokens (starts 0, 5, 6, 9, end 15), windows
    of 4 (+1): window s reads tokens 4s .. 4s + 4."""
    from distprop.data.tokens import PackedLayout

    layout = PackedLayout.__new__(PackedLayout)
    layout.options = type("Options", (), {"sequence_length": 4})()
    layout.token_starts = np.array([0, 5, 6, 9, 15])
    # window 0: tokens 0-4, block 0 alone; window 1: 4-8, blocks 0-2; window 2: 8-12, blocks 2-3.
    assert layout.last_block(np.array([0, 1, 2])).tolist() == [0, 2, 3]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("length", [40, 7])
def test_each_block_is_read_once_per_epoch_when_windows_span_blocks(tmp_path, monkeypatch, shuffle, length):
    """Windows that run on into the next row group take only its first documents (its
    *head*): each block is read whole once per epoch, for its own windows, even where
    the shuffled order puts the next block's turn far away (shuffle_window=2 of 20+
    blocks); longer windows (40) cross several row groups of ~4 documents."""
    from distprop.data.reader import BlockReader

    docs = documents(90, seed=4)
    write_documents(tmp_path / "t.parquet", docs, row_group_size=4)
    reads, head_rows = [], []
    read, read_rows = BlockReader.read, BlockReader.read_rows
    monkeypatch.setattr(BlockReader, "read", lambda self, block: reads.append(block) or read(self, block))

    def counted_rows(self, block, batch_rows):
        for table in read_rows(self, block, batch_rows):
            head_rows.append(table.num_rows)
            yield table

    monkeypatch.setattr(BlockReader, "read_rows", counted_rows)
    loader = ArrowLoader(tmp_path, 3, sequence_length=length, eos_token=0, shuffle=shuffle, shuffle_window=2,
                         seed=1, drop_last=False, positions=True)
    got = sorted(tuple(tuple(batch[k][j].tolist()) for k in ("input_ids", "labels", "document_ids", "positions"))
                 for batch in loader for j in range(len(batch["input_ids"])))
    assert got == sorted(tuple(map(tuple, w)) for w in reference_windows(docs, length, eos=0))
    # Read whole: every block some window starts in (the others give only heads).
    assert sorted(reads) == np.flatnonzero(loader._spec.packed.samples_per_block).tolist()
    assert head_rows and sum(head_rows) < sum(len(d) for d in docs) / 4  # heads are a small part of the data


def test_a_head_is_read_only_as_far_as_a_window_needs(tmp_path):
    """read_token_head stops reading a block's rows once it holds sequence_length tokens."""
    from distprop.data.reader import BlockReader
    from distprop.data.tokens import TokenOptions, read_token_head

    docs = [[d] * 10 for d in range(1, 101)]  # 100 documents of 10 tokens, one row group
    write_documents(tmp_path / "t.parquet", docs, row_group_size=100)
    loader = ArrowLoader(tmp_path, 1, sequence_length=25, eos_token=0)
    reader = BlockReader(loader.index, ["tokens"])
    taken = []

    def tables():
        for table in reader.read_rows(0, 2):  # two documents (22 tokens with their end tokens) at a time
            taken.append(table.num_rows)
            yield table

    options = TokenOptions("tokens", 25, eos_token=0)
    head = read_token_head(tables(), loader.index.columns["tokens"], options, "t.parquet (row group 0)", 25,
                           1100)
    assert taken == [2, 2]  # 44 tokens >= 25: the other 96 rows are never decoded
    # Cut to the 25 tokens a window can take (the third document's first 3), so a long
    # first document does not stay in memory whole.
    assert head.tokens.tolist() == [1] * 10 + [0] + [2] * 10 + [0] + [3] * 3
    assert head.starts.tolist() == [0, 11, 22, 25]
    reader.close()


def test_a_row_group_read_only_as_a_head_is_still_checked_against_its_footer(tmp_path):
    """A row group no window starts in (shorter than a window) is only ever read as the
    head of the windows crossing it: a file changed since the loader read its footer is
    refused there as in a full read, not packed into wrong windows."""
    path = tmp_path / "t.arrow"

    def write(docs):
        table = pa.table({"tokens": pa.array(docs, pa.list_(pa.int32()))})
        with pa.ipc.new_file(path, table.schema) as writer:
            for doc in docs:  # one record batch per document
                writer.write_batch(pa.record_batch({"tokens": pa.array([doc], pa.list_(pa.int32()))}))

    write([list(range(1, 12)), [50, 51, 52], list(range(100, 120))])
    loader = ArrowLoader(tmp_path, 1, sequence_length=10, eos_token=0, shuffle=False)
    assert loader._spec.packed.samples_per_block.tolist() == [2, 0, 1]  # nothing starts in record batch 1
    write([list(range(1, 12)), [50, 51, 52, 53, 54, 55], list(range(100, 120))])
    with pytest.raises(DataError, match=r"record batch 1\): column 'tokens' holds 7 tokens but the file's footer "
                                        r"counts 4"):
        list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffled_windows_with_document_ids_and_positions_match_the_definition(tmp_path, workers, packing):
    """Every output of every window, shuffled over small windows of row groups of
    varying size, with and without worker processes, is the reference's."""
    docs = documents(150, seed=9)
    write_documents(tmp_path / "t.parquet", docs, row_group_size=5)
    loader = ArrowLoader(tmp_path, 4, sequence_length=33, eos_token=0, seed=3, shuffle_window=2, drop_last=False,
                         positions=True, num_workers=workers)
    try:
        got = [tuple(tuple(batch[k][j].tolist()) for k in ("input_ids", "labels", "document_ids", "positions"))
               for batch in loader for j in range(len(batch["input_ids"]))]
    finally:
        loader.close()
    assert sorted(got) == sorted(tuple(map(tuple, w)) for w in reference_windows(docs, 33, eos=0))


def test_a_head_is_taken_from_its_block_read_whole_earlier(tmp_path, monkeypatch):
    """A block read whole keeps its head for a later batch that needs only the head;
    only the other heads are read from the file. With one reader thread the reads
    run in the schedule's order, so which heads those are follows from it."""
    from distprop.data import pipeline
    from distprop.data.pipeline import Schedule
    from distprop.data.sampler import EpochOrder

    docs = documents(150, seed=8)
    write_documents(tmp_path / "t.parquet", docs, row_group_size=5)
    loader = ArrowLoader(tmp_path, 3, sequence_length=20, eos_token=0, seed=6, shuffle_window=2, read_threads=1,
                         drop_last=False, positions=True)
    from_file = []
    prepare_head = pipeline.prepare_head
    monkeypatch.setattr(pipeline, "prepare_head",
                        lambda spec, reader, block: from_file.append(block) or prepare_head(spec, reader, block))
    got = sorted(tuple(tuple(batch[k][j].tolist()) for k in ("input_ids", "labels", "document_ids", "positions"))
                 for batch in loader for j in range(len(batch["input_ids"])))
    assert got == sorted(tuple(map(tuple, w)) for w in reference_windows(docs, 20, eos=0))

    schedule = Schedule(loader._spec, EpochOrder(loader._spec.samples_per_block, 6, 0, True, 2), loader._plan(), 0, 2)
    entries = list(zip(schedule.entry_block, schedule.entry_head))
    later_heads = {block for block, head in entries if head}
    kept, expected = set(), []
    for block, head in entries:
        if not head:
            kept |= {block} & later_heads
        elif block in kept:
            kept.remove(block)
        else:
            expected.append(block)
    assert from_file == expected
    assert 0 < len(expected) < sum(head for _, head in entries)  # some from the file, some kept


def test_each_batch_schedules_exactly_the_blocks_its_windows_read(tmp_path):
    from distprop.data.pipeline import Schedule
    from distprop.data.sampler import EpochOrder

    write_documents(tmp_path / "t.parquet", documents(90, seed=6), row_group_size=3)
    loader = ArrowLoader(tmp_path, 7, sequence_length=30, eos_token=0, seed=2, shuffle_window=3, drop_last=False)
    spec, plan = loader._spec, loader._plan()
    order = EpochOrder(spec.samples_per_block, 2, 0, True, 3)
    schedule = Schedule(spec, order, plan, 0, 3)
    starts = spec.packed.token_starts.tolist()
    for batch, (entries, rows) in enumerate(schedule.batches):
        windows = np.concatenate([order.rows(lo, hi) for lo, hi in plan.batch_positions(batch)]).tolist()
        expected = set()
        for window in windows:  # the blocks holding tokens 30 * window .. 30 * window + 30
            expected |= {b for b in range(len(starts) - 1)
                         if starts[b] <= 30 * window + 30 and starts[b + 1] > 30 * window}
        assert {schedule.entry_block[e] for e in entries.tolist()} == expected, batch


UNIT_OPTIONS = {"sequence_length": 11, "eos_token": 0, "seed": 4, "shuffle_window": 2, "drop_last": False,
                "positions": True}


@pytest.fixture(scope="module")
def built_one_at_a_time(tmp_path_factory):
    """A dataset and its batches as worker processes build them: one batch at a time."""
    path = tmp_path_factory.mktemp("units")
    write_documents(path / "t.parquet", documents(200, seed=11), row_group_size=6)
    loader = ArrowLoader(path, 4, num_workers=1, **UNIT_OPTIONS)
    try:
        return path, [{k: v.copy() for k, v in batch.items()} for batch in loader]
    finally:
        loader.close()


@pytest.mark.parametrize("unit_tokens", [1, 3 * 4 * 11, 1 << 18])
def test_batches_do_not_depend_on_how_many_are_built_together(built_one_at_a_time, monkeypatch, packing,
                                                                unit_tokens):
    """Packed batches are built a unit at a time: one batch, three, or the whole epoch
    (where one batch takes a block's head and another the whole block) give the
    batches that worker processes, which build one batch at a time, give; each batch
    a view of its unit's memory that stays valid as later ones are built."""
    from distprop.data import pipeline

    path, expected = built_one_at_a_time
    monkeypatch.setattr(pipeline, "UNIT_TOKENS", unit_tokens)
    loader = ArrowLoader(path, 4, **UNIT_OPTIONS)
    assert pipeline.batches_per_unit(loader._spec, 4) == max(1, unit_tokens // 44)
    got = list(loader)  # all held at once
    assert len(got) == len(expected) == len(loader)
    for batch, want in zip(got, expected):
        assert batch.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(batch[name], want[name])


def test_padded_documents_with_mask(tmp_path):
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    write_documents(tmp_path / "t.parquet", docs)
    batch = next(iter(ArrowLoader(tmp_path, 3, sequence_length=5, pack=False, eos_token=1, pad_token=0,
                                  shuffle=False, truncate=True)))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 0], [8, 1, 0, 0, 0], [9, 10, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(DataError, match=r"row group 0\) row 2: .* 6 tokens .* longer than sequence_length 5"):
        list(ArrowLoader(tmp_path, 3, sequence_length=5, pack=False, eos_token=1, shuffle=False))


def test_padded_mode_keeps_other_columns(tmp_path):
    table = pa.table({"tokens": pa.array([[1, 2], [3], [4, 5]], pa.list_(pa.int64())), "label": [7, 8, 9]})
    pq.write_table(table, tmp_path / "t.parquet")
    batch = next(iter(ArrowLoader(tmp_path, 3, sequence_length=4, pack=False, shuffle=False)))
    assert batch["label"].tolist() == [7, 8, 9] and batch["input_ids"].dtype == np.int64
    with pytest.raises(ConfigError, match="pack=True makes samples that cross documents"):
        ArrowLoader(tmp_path, 1, sequence_length=4)
    assert "label" not in next(iter(ArrowLoader(tmp_path, 1, sequence_length=2, columns=["tokens"])))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_and_reshard_mid_epoch_with_packing(tmp_path, workers):
    """Stop after 3 batches on 2 ranks, resume on 3 ranks (with workers): every window
    of the epoch is seen once, as by an uninterrupted run."""
    docs = documents(120, seed=2)
    write_documents(tmp_path / "t.parquet", docs, row_group_size=9)
    options = {"sequence_length": 10, "eos_token": 0, "seed": 7, "drop_last": False}
    first = [ArrowLoader(tmp_path, 4, rank=r, world_size=2, **options) for r in range(2)]
    seen = []
    for loader in first:
        iterator = iter(loader)
        seen += [tuple(row) for _ in range(3) for row in next(iterator)["input_ids"].tolist()]
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["sequence_length"] == 10
    for rank in range(3):
        resumed = ArrowLoader(tmp_path, 4, rank=rank, world_size=3, num_workers=workers, **options)
        resumed.load_state_dict(state)
        seen += [tuple(row) for batch in resumed for row in batch["input_ids"].tolist()]
        resumed.close()
    every = {tuple(w[0]) for w in reference_windows(docs, 10, 0)}
    assert set(seen) == every
    assert len(seen) - len(every) < 3  # drop_last=False pads fewer than world_size windows per stage
    with pytest.raises(ConfigError, match="sequence_length=10 but this loader has sequence_length=11"):
        ArrowLoader(tmp_path, 4, **dict(options, sequence_length=11)).load_state_dict(state)


def test_bad_documents_name_file_row_group_and_row(tmp_path):
    write_documents(tmp_path / "t.parquet", [[1, 2], [3], [4, 99], [5]], row_group_size=2)
    with pytest.raises(DataError, match=r"t.parquet \(row group 1\) row 0: .*token id 99, outside the "
                                        r"vocabulary 0..49"):
        list(ArrowLoader(tmp_path, 1, sequence_length=2, vocab_size=50, shuffle=False, drop_last=False))
    (tmp_path / "t.parquet").unlink()
    write_documents(tmp_path / "e.parquet", [[1, 2], [3], [4, 6], [], [5, 6, 7]], row_group_size=2)
    with pytest.raises(DataError, match=r"e.parquet \(row group 1\) row 1: column 'tokens' holds an empty document"):
        list(ArrowLoader(tmp_path, 1, sequence_length=2, shuffle=False, drop_last=False))
    with pytest.raises(DataError, match=r"row group 1\) row 1: column 'tokens' holds an empty document"):
        list(ArrowLoader(tmp_path, 1, sequence_length=2, pack=False, shuffle=False, drop_last=False))
    (tmp_path / "e.parquet").unlink()
    write_documents(tmp_path / "n.parquet", [[1, 2], None, [3, 4]], row_group_size=3)
    with pytest.raises(DataError, match=r"row group 0\) row 1: column 'tokens' holds a null document"):
        list(ArrowLoader(tmp_path, 1, sequence_length=2, shuffle=False, drop_last=False))


def test_token_options_are_checked(tmp_path):
    write_documents(tmp_path / "t.parquet", [[1, 2, 3]] * 10)
    with pytest.raises(ConfigError, match="sequence_length must be a positive integer"):
        ArrowLoader(tmp_path, 1, sequence_length=0)
    with pytest.raises(ConfigError, match="eos_token must be a token id in 0..9"):
        ArrowLoader(tmp_path, 1, sequence_length=2, eos_token=10, vocab_size=10)
    with pytest.raises(DataError, match="fewer than one window"):
        ArrowLoader(tmp_path, 1, sequence_length=40)
    with pytest.raises(DataError, match="column 'ids' should hold token sequences"):
        ArrowLoader(tmp_path, 1, sequence_length=2, tokens_column="ids")
