"""Batches from worker processes are views of shared memory, not copies: a batch, or
any view of it, keeps its data for as long as it is referenced, whatever the loader
does meanwhile (more batches, another epoch, `close`), and its memory is reused once
it is dropped. References: the same loader with no workers (every batch a fresh
array), compared after the whole run."""

import gc

import numpy as np
import pytest
from media_helpers import write_documents, write_images

from distprop.data import ArrowLoader
from distprop.data.transforms import Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor

TRANSFORMS = [RandomResizedCrop(16), RandomHorizontalFlip(), ToTensor(), Normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    write_images(path / "d.parquet", 60, size=(30, 36), row_group_size=7)
    return path


def loader(images, workers, **options):
    return ArrowLoader(images, 4, seed=5, image_transforms=TRANSFORMS, drop_last=False, num_workers=workers,
                       **options)


def reference(images, epochs=(0,)):
    out = []
    for epoch in epochs:
        plain = loader(images, 0)
        plain.set_epoch(epoch)
        out += [{name: np.array(values) for name, values in batch.items()} for batch in plain]
    return out


def assert_same(kept, expected):
    assert len(kept) == len(expected)
    for number, (ours, theirs) in enumerate(zip(kept, expected)):
        assert ours.keys() == theirs.keys()
        for name in theirs:
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"batch {number}, {name}")


def is_view(array: np.ndarray) -> bool:
    return not array.flags.owndata


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_kept_for_two_epochs_keep_their_data(images, workers):
    """More batches are kept than there are slots: those past the limit are copies,
    and none of the kept ones is overwritten by the workers."""
    parallel = loader(images, workers)
    try:
        kept = []
        for epoch in (0, 1):
            parallel.set_epoch(epoch)
            kept += list(parallel)
        slots = parallel._pool.slots.count
        assert len(kept) > slots
        assert sum(is_view(batch["image"]) for batch in kept) == slots - 1  # one slot stays for the workers
        assert_same(kept, reference(images, (0, 1)))
    finally:
        parallel.close()


def test_a_view_outlives_its_batch(images):
    """Only a slice of each batch is kept, and a reshaped view of another column: the
    slot stays lent until they go."""
    parallel = loader(images, 2)
    try:
        kept = []
        for batch in parallel:
            kept.append({"image": batch["image"][1:3], "label": batch["label"].reshape(2, 2)[1]})
        gc.collect()
        assert any(is_view(view["image"]) for view in kept)
    finally:
        parallel.close()
    expected = [{"image": batch["image"][1:3], "label": batch["label"][2:]} for batch in reference(images)]
    assert_same(kept, expected)


def test_dropped_batches_are_not_copied_and_their_slots_come_back(images):
    parallel = loader(images, 2)
    try:
        for epoch in (0, 1):
            parallel.set_epoch(epoch)
            for batch in parallel:
                assert is_view(batch["image"]) and is_view(batch["label"])
                del batch
        gc.collect()
        assert parallel._pool.free.lent == 0
    finally:
        parallel.close()


def test_a_batch_stays_readable_after_close(images):
    parallel = loader(images, 1)
    first = next(iter(parallel))
    assert is_view(first["image"])
    parallel.close()
    gc.collect()
    assert_same([first], reference(images)[:1])


def test_a_user_transform_sees_the_lent_arrays_and_may_keep_them(images):
    seen = []

    def keep(batch):
        seen.append(batch)
        return {"image": batch["image"], "label": batch["label"] + 0}

    parallel = loader(images, 2, transform=keep)
    try:
        delivered = list(parallel)
    finally:
        parallel.close()
    expected = reference(images)
    assert_same(delivered, expected)
    assert_same(seen, expected)


def test_token_batches_are_lent_too(tmp_path):
    rng = np.random.default_rng(3)
    write_documents(tmp_path / "t.parquet", [rng.integers(1, 100, int(rng.integers(1, 30))).tolist()
                                             for _ in range(40)])
    options = {"sequence_length": 16, "pack": True, "seed": 2, "drop_last": False}
    expected = [{name: np.array(values) for name, values in batch.items()}
                for batch in ArrowLoader(tmp_path, 3, **options)]
    parallel = ArrowLoader(tmp_path, 3, num_workers=2, **options)
    try:
        kept = list(parallel)
    finally:
        parallel.close()
    assert any(is_view(batch["input_ids"]) for batch in kept)
    assert_same(kept, expected)
