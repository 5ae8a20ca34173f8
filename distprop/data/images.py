"""Decoding one encoded image to an HWC uint8 array, resampled once to what the
sample transforms ask for.

JPEG goes through libjpeg-turbo (simplejpeg), everything else (PNG, WebP, GIF, BMP,
TIFF, the rare CMYK JPEG) through Pillow. simplejpeg was chosen by measurement on
the development machine: it decoded 500x375 q90 JPEGs at 1.6-1.9x Pillow's rate and
at 1.8x PyTurboJPEG's (which also needs a system libturbojpeg; simplejpeg's wheel
carries its own).

The geometric transforms (crops, resizes, flips) do not touch pixels: they are
planned on the image's size, read from its header (`Geometry`), and the decoder
then produces the planned output in one step. Where the planned output is at most
half the size of the region it comes from, libjpeg-turbo (or Pillow's ``draft``)
decodes at 1/2, 1/4 or 1/8 scale, never below the output size (FFCV and
torchvision decode at full size; the pixels differ from theirs by about 1-2 levels
of 255 on average, the detail the output can show is kept); the region is then
resampled once, with Pillow's bilinear filter with antialiasing (torchvision's
default for PIL images; see `distprop.data.resample`).
"""

from __future__ import annotations

import io

import numpy as np

from distprop.data.resample import resample_image
from distprop.errors import DataError

try:  # the `images` extra; without it JPEGs go through Pillow as well
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is missing
    simplejpeg = None

_JPEG_MAGIC = b"\xff\xd8"

# Pillow modes accepted for each channel count, and what they are converted to. A
# conversion that drops information the image carries (an alpha channel, colour in
# a grayscale dataset) is refused rather than done silently.
_MODES = {
    3: {"RGB": None, "L": "RGB", "1": "RGB", "P": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "I;16": None},
    1: {"L": None, "1": "L", "I;16": None},
}


class ImageError(DataError):
    """An image that cannot be decoded as asked: corrupt, truncated, unsupported, wrong
    channels, too small. The loader adds where it is (file, row group, row)."""


class Geometry:
    """The planned output of the geometric transforms: source region `box`
    ``(left, top, right, bottom)`` in source pixels, resampled to `size` ``(height,
    width)``, then mirrored left-right if `flip`."""

    __slots__ = ("source_size", "box", "size", "flip")

    def __init__(self, height: int, width: int):
        self.source_size = (height, width)
        self.box = (0.0, 0.0, float(width), float(height))
        self.size = (height, width)
        self.flip = False

    def crop(self, top: float, left: float, height: float, width: float) -> None:
        """Keep the region (in output pixels of the plan so far) and make it the output."""
        out_h, out_w = self.size
        if self.flip:  # the region is given in mirrored coordinates
            left = out_w - left - width
        x0, y0, x1, y1 = self.box
        sx, sy = (x1 - x0) / out_w, (y1 - y0) / out_h
        self.box = (x0 + left * sx, y0 + top * sy, x0 + (left + width) * sx, y0 + (top + height) * sy)
        self.size = (int(round(height)), int(round(width)))

    def resize(self, height: int, width: int) -> None:
        self.size = (int(height), int(width))


class ImageDecoder:
    """Decodes encoded images into ``(height, width, channels)`` uint8 arrays, with
    `channels` 3 (RGB; grayscale, palette and CMYK images are converted) or 1
    (grayscale)."""

    def __init__(self, channels: int = 3):
        if channels not in _MODES:
            raise ValueError(f"channels must be 1 or 3, not {channels!r}")
        self.channels = channels

    def size(self, data) -> tuple[int, int]:
        """(height, width) from the image's header, without decoding its pixels."""
        if simplejpeg is not None and bytes(data[:2]) == _JPEG_MAGIC:
            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            except ValueError as error:
                raise ImageError(f"is a corrupt or truncated JPEG ({error})") from None
            return height, width
        image = self._open(data)
        return image.height, image.width

    def decode(self, data, geometry: Geometry | None = None) -> np.ndarray:
        """The image, or the planned `geometry` of it, as HWC uint8."""
        pixels, box = self.decode_region(data, geometry)
        if geometry is None:
            return pixels
        return resample_image(pixels, box, geometry.size, geometry.flip)

    def decode_region(self, data, geometry: Geometry | None = None) -> tuple[np.ndarray, tuple]:
        """The decoded pixels, HWC uint8 (at reduced scale where the planned `geometry`
        allows), and the planned region in them, ``(left, top, right, bottom)``."""
        pixels = None
        if simplejpeg is not None and bytes(data[:2]) == _JPEG_MAGIC:
            pixels = self._decode_jpeg(data, geometry)
        if pixels is None:
            pixels = self._decode_pillow(data, geometry)
        if geometry is None:
            return pixels, (0.0, 0.0, float(pixels.shape[1]), float(pixels.shape[0]))
        height, width = geometry.source_size
        sx, sy = pixels.shape[1] / width, pixels.shape[0] / height
        x0, y0, x1, y1 = geometry.box
        return pixels, (x0 * sx, y0 * sy, x1 * sx, y1 * sy)

    # -- JPEG through libjpeg-turbo ----------------------------------------------------

    def _decode_jpeg(self, data, geometry: Geometry | None) -> np.ndarray | None:
        try:
            _, _, _, colorspace = simplejpeg.decode_jpeg_header(data)
        except ValueError as error:
            raise ImageError(f"is a corrupt or truncated JPEG ({error})") from None
        if colorspace in ("CMYK", "YCCK"):
            return None  # libjpeg-turbo cannot convert these to RGB; Pillow can
        if self.channels == 1 and colorspace != "Gray":
            raise ImageError(f"is a colour JPEG ({colorspace}) but the loader expects 1 channel")
        factor = _reduction(geometry)
        height, width = geometry.source_size if geometry is not None else (0, 0)
        try:
            # min_factor with the sizes at exactly that factor: libjpeg-turbo decodes at 1/factor.
            array = simplejpeg.decode_jpeg(data, colorspace="GRAY" if self.channels == 1 else "RGB",
                                           fastdct=True, fastupsample=True, min_factor=factor, min_height=-(-height // factor) if factor > 1 else 0,
                                           min_width=-(-width // factor) if factor > 1 else 0)
        except ValueError as error:  # corrupt data; truncation too, since strict=True is the default
            raise ImageError(f"is a corrupt or truncated JPEG ({error})") from None
        return array[:, :, None] if array.ndim == 2 else array

    # -- everything else through Pillow ------------------------------------------------

    def _open(self, data):
        from PIL import Image, UnidentifiedImageError

        try:
            return Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError("is not an image format Pillow can read") from None
        except (OSError, ValueError) as error:
            raise ImageError(f"cannot be opened ({error})") from None

    def _decode_pillow(self, data, geometry: Geometry | None) -> np.ndarray:
        image = self._open(data)
        try:
            factor = _reduction(geometry)
            if factor > 1 and image.format == "JPEG":
                image.draft(image.mode, (-(-image.width // factor), -(-image.height // factor)))
            image.load()
        except (OSError, ValueError, SyntaxError) as error:  # Pillow raises all three for bad data
            raise ImageError(f"is a corrupt or truncated {image.format or 'image'} ({error})") from None
        array = np.asarray(self._convert(image))
        return array[:, :, None] if array.ndim == 2 else array

    def _convert(self, image):
        modes = _MODES[self.channels]
        mode = image.mode
        if mode == "P" and "transparency" in image.info:
            mode = "PA"
        if mode not in modes:
            expected = "RGB" if self.channels == 3 else "grayscale"
            raise ImageError(f"has mode {mode} ({len(image.getbands())} channels) but the loader expects "
                             f"{self.channels} ({expected}); converting would drop "
                             f"{'its alpha channel' if 'A' in mode else 'information'}")
        if mode == "I;16":  # 16-bit grayscale: keep the high byte, as an 8-bit image of it
            array = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
            from PIL import Image

            image = Image.fromarray(array)
            return image.convert("RGB") if self.channels == 3 else image
        target = modes[mode]
        return image.convert(target) if target else image


def _reduction(geometry: Geometry | None) -> int:
    """The largest of 1, 2, 4, 8 that the whole image may be divided by while the planned
    region keeps at least the output's pixels. Only these: libjpeg-turbo's other
    scales (3/8, 5/8, ...) measured less faithful, and those between 1/2 and 1 slower
    than a full decode."""
    if geometry is None:
        return 1
    x0, y0, x1, y1 = geometry.box
    out_h, out_w = geometry.size
    largest = min((y1 - y0) / out_h, (x1 - x0) / out_w)
    factor = 1
    while factor < 8 and 2 * factor <= largest:
        factor *= 2
    return factor

