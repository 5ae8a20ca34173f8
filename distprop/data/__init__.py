"""Arrow/Parquet input pipeline: dataset format and writer, index, sampler, loader, converters.

Typical use::

    from distprop.data import ArrowLoader, write_dataset
    write_dataset("data/train", {"image": images, "label": labels})
    loader = ArrowLoader("data/train", batch_size=128, rank=rank, world_size=world_size)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            step(batch["image"], batch["label"])

Encoded images with ``image_transforms=[...]`` from `distprop.data.transforms`,
token sequences with ``sequence_length=``, worker processes with ``num_workers=``:
see `ArrowLoader`.
"""

from distprop.data.converters import convert_cifar10, convert_csv, convert_digits, convert_mnist, convert_npz
from distprop.data.format import ColumnSpec
from distprop.data.image_folder import convert_image_folder
from distprop.data.index import DatasetIndex
from distprop.data.loader import ArrowLoader, DataWarning
from distprop.data.text_corpus import convert_text
from distprop.data.synthetic import write_synthetic
from distprop.data.writer import DatasetWriter, write_dataset

__all__ = [
    "ArrowLoader", "ColumnSpec", "DataWarning", "DatasetIndex", "DatasetWriter", "write_dataset",
    "convert_digits", "convert_mnist", "convert_cifar10", "convert_npz", "convert_csv", "write_synthetic",
    "convert_image_folder", "convert_text",
]
