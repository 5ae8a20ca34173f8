"""Arrow/Parquet input pipeline: dataset format and writer, index, sampler, loader, converters.

Typical use::

    from distprop.data import ArrowLoader, write_dataset
    write_dataset("data/train", {"image": images, "label": labels})
    loader = ArrowLoader("data/train", batch_size=128, rank=rank, world_size=world_size)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            step(batch["image"], batch["label"])
"""

from distprop.data.converters import convert_cifar10, convert_csv, convert_digits, convert_mnist, convert_npz
from distprop.data.format import ColumnSpec
from distprop.data.index import DatasetIndex
from distprop.data.loader import ArrowLoader
from distprop.data.synthetic import write_synthetic
from distprop.data.writer import DatasetWriter, write_dataset

__all__ = [
    "ArrowLoader", "ColumnSpec", "DatasetIndex", "DatasetWriter", "write_dataset",
    "convert_digits", "convert_mnist", "convert_cifar10", "convert_npz", "convert_csv", "write_synthetic",
]
