"""`distprop data images ROOT OUT`: a one-folder-per-class image tree (torchvision's
ImageFolder layout, ``ROOT/<class>/**/<file>``) as a dataset of encoded images.

Each image's file bytes are stored as they are (no decoding, no re-encoding: a JPEG
stays ~10x smaller than its pixels) in an ``image`` column of Hugging Face's
``Image`` struct ``{bytes, path}`` (path relative to ROOT), beside an int64
``label``: the index of its class in the sorted class-folder names, as
ImageFolder and DALI number them. The class names are kept in the schema metadata
the way Hugging Face ``datasets`` keeps features (a ``ClassLabel``), so ``datasets``
reads the files as an image dataset, and `class_names` reads them back.

Rows are written in a seeded random order (the loader's shuffle mixes rows within
a few row groups, and a class-sorted file would make one-class batches), streamed
in chunks, so a tree larger than memory converts in bounded memory. Every file's
header is read to check it is an image distprop can decode.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa

from distprop.data.images import ImageDecoder, ImageError
from distprop.data.writer import DatasetWriter
from distprop.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
HF_METADATA_KEY = "huggingface"
_CHUNK_ROWS = 256


def find_images(root) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted folder names) and ``(path, label)`` of every image file,
    in a deterministic order (classes, then paths, sorted)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a directory (expected ROOT/<class>/<image files>)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders (expected ROOT/<class>/<image files>)")
    samples = []
    for label, name in enumerate(classes):
        found = []
        for directory, subdirectories, files in os.walk(os.path.join(root, name), followlinks=True):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            found.extend(os.path.join(directory, f) for f in files
                         if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not found:
            raise DataError(f"{os.path.join(root, name)}: class folder without image files "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((path, label) for path in sorted(found))
    return classes, samples


def convert_image_folder(root, out, *, shuffle: bool = True, seed: int = 0, row_group_size: int = 256,
                         **write_options) -> list[str]:
    """Write the image tree at `root` to a dataset at `out`; returns the files written.
    `write_options` go to `DatasetWriter` (rows_per_file, compression, format,
    overwrite). Row groups default to 256 images: the loader holds a few row groups
    per worker, so they should stay tens of MB."""
    root = os.fspath(root)
    classes, samples = find_images(root)
    order = np.random.default_rng(seed).permutation(len(samples)) if shuffle else np.arange(len(samples))
    decoder = ImageDecoder()
    features = {"image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}
    metadata = {HF_METADATA_KEY: json.dumps({"info": {"features": features}})}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    with DatasetWriter(out, row_group_size=row_group_size, metadata=metadata,
                       **{"roles": {"input": "image", "label": "label"}, **write_options}) as writer:
        for start in range(0, len(order), _CHUNK_ROWS):
            chunk = [samples[i] for i in order[start:start + _CHUNK_ROWS].tolist()]
            blobs = [_read_image(path, decoder) for path, _ in chunk]
            images = pa.StructArray.from_arrays(
                [pa.array(blobs, pa.binary()), pa.array([os.path.relpath(p, root) for p, _ in chunk], pa.string())],
                fields=list(image_type))
            writer.write({"image": images, "label": np.array([label for _, label in chunk], np.int64)})
    return writer.files


def _read_image(path: str, decoder: ImageDecoder) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        decoder.size(data)
    except ImageError as error:
        raise DataError(f"{path}: {error}") from None
    return data


def class_names(schema: pa.Schema, column: str = "label") -> list[str] | None:
    """The class names a dataset's schema metadata gives for `column` (as written by
    `convert_image_folder` or Hugging Face ``datasets``), or None."""
    raw = (schema.metadata or {}).get(HF_METADATA_KEY.encode())
    if raw is None:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return list(names) if isinstance(names, list) else None
