"""The job's dataset: where it is, which columns feed the model, the loaders.

`data = "digits"` writes scikit-learn's UCI digits under ``OUT/data/digits`` on
first use (always split with seed 0, so it is the same dataset whatever the
training seed); any other value is a directory with ``train/`` and ``test/``
splits in distprop's Parquet (or Arrow IPC) format.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from distprop.data import ArrowLoader, ColumnSpec, DatasetIndex
from distprop.data.format import IMAGE
from distprop.data.sampler import Stage, plan_rank
from distprop.errors import ConfigError, DataError

INPUT_NAMES = ("image", "features", "input", "x")


@dataclass(frozen=True)
class Dataset:
    train: str
    test: str
    input: ColumnSpec
    label: str
    num_classes: int
    train_samples: int


def dataset_directory(config, out: str) -> str:
    return os.path.join(out, "data", "digits") if config.data == "digits" else config.data


def check_dataset_directory(config, out: str) -> None:
    """The data path and its splits exist (digits: scikit-learn can make them)."""
    if config.data == "digits":
        if not os.path.isdir(os.path.join(dataset_directory(config, out), "train")):
            try:
                import sklearn  # noqa: F401 - only needed to write the digits once
            except ImportError:
                raise ConfigError("data 'digits' needs scikit-learn to write the dataset: "
                                  "pip install 'distprop[datasets]'") from None
        return
    if not os.path.exists(config.data):
        raise ConfigError(f"data: {config.data} does not exist")
    missing = [split for split in ("train", "test") if not os.path.isdir(os.path.join(config.data, split))]
    if missing:
        raise ConfigError(f"data: {config.data} has no {' or '.join(f'{m}/' for m in missing)} split "
                          "(a dataset directory holds train/ and test/)")


def write_digits_once(directory: str) -> None:
    """Rank 0 only: the digits into `directory`, made in a temporary directory beside
    it and renamed, so a job killed meanwhile or a concurrent one never sees half."""
    if os.path.isdir(os.path.join(directory, "train")):
        return
    from distprop.data.converters import convert_digits

    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    convert_digits(staging, seed=0)
    try:
        os.rename(staging, directory)
    except OSError:  # another job got there first
        shutil.rmtree(staging, ignore_errors=True)


def describe_columns(config, directory: str) -> tuple[ColumnSpec, str, int]:
    """The input column's spec, the label column's name (both checked) and the
    training split's sample count. Columns not set in the config are the ones the
    dataset records for those roles (DatasetWriter's `roles`), else found by name."""
    train = os.path.join(directory, "train")
    index = DatasetIndex.open(train)
    columns, roles = index.columns, index.roles
    label = config.label_column or roles.get("label", "label")
    if label not in columns:
        raise DataError(f"{train}: no label column '{label}' (columns: {', '.join(columns)}); set label_column")
    if columns[label].shape != () or columns[label].dtype.kind not in "iu":
        raise DataError(f"{train}: label column '{label}' holds {columns[label].describe()}, "
                        "expected one integer per sample")
    chosen = config.input_column or roles.get("input")
    if chosen is not None:
        if chosen not in columns:
            raise DataError(f"{train}: no input column '{chosen}' (columns: {', '.join(columns)})")
    else:
        others = [name for name in columns if name != label]
        chosen = next((name for name in INPUT_NAMES if name in others), others[0] if len(others) == 1 else None)
        if chosen is None:
            raise DataError(f"{train}: cannot tell which column is the input among {', '.join(others) or 'none'}; "
                            "set input_column")
    spec = columns[chosen]
    if spec.kind == IMAGE or spec.shape is None:  # their shape comes from decoding or packing options
        raise DataError(f"{train}: input column '{chosen}' holds {spec.describe()}s; distprop train feeds the "
                        "model a tensor of one shape per sample (write the dataset with fixed-shape tensors, "
                        "or train from a script with ArrowLoader's options for this column)")
    return spec, label, index.num_rows


def count_classes(train: str, label: str) -> int:
    """Largest label in the training split + 1 (one pass over the label column)."""
    loader = ArrowLoader(train, 65536, columns=[label], shuffle=False, drop_last=False, prefetch=0)
    largest, smallest = -1, 0
    for batch in loader:
        largest = max(largest, int(batch[label].max()))
        smallest = min(smallest, int(batch[label].min()))
    if smallest < 0:
        raise DataError(f"{train}: label column '{label}' holds negative values ({smallest}); "
                        "labels are class indices 0..C-1")
    return largest + 1


def make_loaders(config, dataset: Dataset, batch_size: int, comm, device: str) -> tuple[ArrowLoader, ArrowLoader]:
    if batch_size * comm.size > dataset.train_samples:
        raise ConfigError(f"batch_size: {batch_size} per rank x {comm.size} rank(s) is more than the "
                          f"{dataset.train_samples} samples of {dataset.train}")
    columns = [dataset.input.name, dataset.label]
    train = ArrowLoader(dataset.train, batch_size, rank=comm.rank, world_size=comm.size, seed=config.seed,
                        columns=columns, device=device)
    test = ArrowLoader(dataset.test, config.eval_batch_size, rank=comm.rank, world_size=comm.size,
                       shuffle=False, drop_last=False, columns=columns, device=device)
    return train, test


def batches_left_in_epoch(loader: ArrowLoader) -> int:
    """Batches the loader will still hand out in its current epoch, from its saved
    position (the same on every rank): what a stage of the epoch holds after the
    stages before it, less what this stage has consumed."""
    state = loader.state_dict()
    history = tuple(Stage(*map(int, stage)) for stage in state["history"])
    plan = plan_rank(state["num_samples"], state["world_size"], 0, state["batch_size"], state["drop_last"], history)
    return plan.num_batches - state["batches_consumed"]

