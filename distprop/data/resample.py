"""Resampling a decoded image's planned region to the planned size, mirrored if
planned, with Pillow's bilinear filter (antialiased when shrinking, torchvision's
default for PIL images), and writing it where the sample goes.

Two implementations give the same bytes:

* compiled kernels (numba, the `images` extra; `distprop.data.resample_kernels`)
  that reproduce Pillow's fixed-point arithmetic and fuse the trailing elementwise
  transforms (ToTensor, Normalize, the CHW layout) into the same pass, so a sample is
  written into its batch slot once, without a uint8 image, a PIL copy of it or a
  float temporary in between;
* Pillow's ``Image.resize(box=...)`` and ``transpose``, then `Tail.write`, where numba
  is not installed or the output dtype is one the kernels do not take.
"""

from __future__ import annotations

import functools

import numpy as np

# Output dtypes the compiled kernels are used for (numba has no float16 arithmetic).
_KERNEL_DTYPES = frozenset(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64,
                                                 np.float32, np.float64))


@functools.cache
def _identity(channels: int) -> np.ndarray:
    return np.tile(np.arange(256, dtype=np.uint8), (channels, 1))


@functools.cache
def kernels():
    """The compiled kernels' module, or None where numba is not installed."""
    try:
        from distprop.data import resample_kernels
    except ImportError:
        return None
    return resample_kernels


def resample_image(pixels: np.ndarray, box, size: tuple[int, int], flip: bool) -> np.ndarray:
    """The region `box` ``(left, top, right, bottom)`` of HWC uint8 `pixels`, resampled
    to `size` ``(height, width)`` and mirrored left-right if `flip`, as HWC uint8."""
    out = np.empty((*size, pixels.shape[2]), np.uint8)
    resample_into(pixels, box, flip, out, None)
    return out


def resample_into(pixels: np.ndarray, box, flip: bool, out: np.ndarray, tail) -> None:
    """Write the region `box` of `pixels`, resampled to the image size of `out` and
    mirrored if `flip`, through `tail` (a `Tail` taking HWC uint8; None: none) into
    `out`, whose shape is the tail's sample shape."""
    layout = tail.layout if tail is not None else "HWC"
    planes = out.transpose(2, 0, 1) if layout == "HWC" else out  # (channels, height, width) either way
    compiled = kernels()
    if compiled is not None and out.dtype in _KERNEL_DTYPES and pixels.flags.c_contiguous:
        table = tail.table() if tail is not None else _identity(pixels.shape[2])
        x0, y0, x1, y1 = (np.float32(edge) for edge in box)  # Pillow takes the box as C floats
        compiled.resample_into(pixels, x0, y0, x1, y1, bool(flip), planes, table)
        return
    image = pillow_resample(pixels, box, planes.shape[1:], flip)
    if tail is None:
        np.copyto(out, image)
    else:
        tail.write(image, out)


def pillow_resample(pixels: np.ndarray, box, size: tuple[int, int], flip: bool) -> np.ndarray:
    """The same resampling through Pillow, as HWC uint8."""
    from PIL import Image

    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    height, width = size
    if tuple(box) != (0.0, 0.0, float(image.width), float(image.height)) or (height, width) != pixels.shape[:2]:
        image = image.resize((width, height), Image.BILINEAR, box=tuple(box))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array
