"""Per-sample image transforms, named and parametrised as in torchvision.

Pass a list of them as ``ArrowLoader(..., image_transforms=[...])``::

    [RandomResizedCrop(224), RandomHorizontalFlip(), ToTensor(),
     Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]

They run in the list's order on each decoded sample, in three stages:

1. **geometric** transforms (`RandomResizedCrop`, `CenterCrop`, `Resize`,
   `RandomHorizontalFlip`), which must come first, are planned on the image's size
   and carried out by the decoder in a single resampling step (see
   `distprop.data.images`);
2. any other callable ``f(image, rng) -> image``, on the HWC uint8 array (or what
   the transform before it returned), with the sample's generator `rng`;
3. the trailing **elementwise** transforms (`ToImage`, `ToDtype`, `ToTensor`,
   `Normalize`), fused into one pass that writes the sample into its batch. With
   ``device="gpu"`` they run on the GPU instead, on the whole batch after the
   (four times smaller) uint8 copy.

Without `ToImage`/`ToTensor` images stay HWC uint8, batched as NHWC.

Random choices use the generator the loader seeds with ``(seed, epoch, sample
index)``: a sample's augmentation is the same whatever the number of ranks or
workers, and a resumed run repeats it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from distprop.backend import get_array_module
from distprop.data.images import Geometry, ImageError
from distprop.errors import ConfigError


def _pair(size, name: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    try:
        height, width = (int(d) for d in size)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} size must be an int or (height, width), not {size!r}") from None
    if height < 1 or width < 1:
        raise ConfigError(f"{name} size must be positive, not {size!r}")
    return height, width


class GeometricTransform:
    """Changes which pixels a sample shows; planned on sizes, never run on pixels."""

    def plan(self, geometry: Geometry, rng: np.random.Generator) -> None:
        raise NotImplementedError


class Resize(GeometricTransform):
    """torchvision's Resize: an int resizes the shorter side to `size` keeping the aspect
    ratio (the longer side truncated to an int, as torchvision does); ``(h, w)`` resizes
    to exactly that."""

    def __init__(self, size):
        self.exact = not isinstance(size, (int, np.integer))
        self.size = _pair(size, "Resize")

    def plan(self, geometry: Geometry, rng) -> None:
        if self.exact:
            geometry.resize(*self.size)
            return
        height, width = geometry.size
        short = self.size[0]
        if height <= width:
            geometry.resize(short, int(short * width / height))
        else:
            geometry.resize(int(short * height / width), short)

    def __repr__(self):
        return f"Resize({self.size if self.exact else self.size[0]})"


class CenterCrop(GeometricTransform):
    """torchvision's CenterCrop (offsets rounded as torchvision rounds them). An image
    smaller than the crop is an error (torchvision would pad it with zeros)."""

    def __init__(self, size):
        self.size = _pair(size, "CenterCrop")

    def plan(self, geometry: Geometry, rng) -> None:
        height, width = geometry.size
        crop_h, crop_w = self.size
        if crop_h > height or crop_w > width:
            raise ImageError(f"is {height}x{width} at CenterCrop({crop_h}, {crop_w}), smaller than the crop "
                             "(resize it first)")
        geometry.crop(int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0)), crop_h, crop_w)

    def __repr__(self):
        return f"CenterCrop({self.size})"


class RandomResizedCrop(GeometricTransform):
    """torchvision's RandomResizedCrop: a random region covering `scale` of the area
    with aspect ratio in `ratio` (log-uniform), resized to `size`; after ten failed
    tries the central crop of the clamped ratio, exactly as torchvision's get_params."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size = _pair(size, "RandomResizedCrop")
        self.scale, self.ratio = tuple(map(float, scale)), tuple(map(float, ratio))
        if not (0 < self.scale[0] <= self.scale[1] and 0 < self.ratio[0] <= self.ratio[1]):
            raise ConfigError(f"RandomResizedCrop needs 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                              f"got scale={scale}, ratio={ratio}")
        self._log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))

    def plan(self, geometry: Geometry, rng: np.random.Generator) -> None:
        top, left, height, width = self.region(*geometry.size, rng)
        geometry.crop(top, left, height, width)
        geometry.resize(*self.size)

    def region(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = height * width
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self._log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __repr__(self):
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip(GeometricTransform):
    """Mirror left-right with probability `p`."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def plan(self, geometry: Geometry, rng: np.random.Generator) -> None:
        if rng.random() < self.p:
            geometry.flip = not geometry.flip

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class ElementwiseTransform:
    """Changes layout, dtype or values only; runs of these are fused into one pass."""


class ToImage(ElementwiseTransform):
    """HWC -> CHW (torchvision.transforms.v2.ToImage), dtype kept."""

    def __repr__(self):
        return "ToImage()"


class ToDtype(ElementwiseTransform):
    """Convert to `dtype`; with ``scale=True`` integers map to [0, 1] (uint8 / 255), as in
    torchvision.transforms.v2.ToDtype."""

    def __init__(self, dtype, scale: bool = False):
        self.dtype, self.scale = np.dtype(dtype), bool(scale)
        if self.dtype.kind != "f" and self.scale:
            raise ConfigError(f"ToDtype({self.dtype}, scale=True): scaling is to [0, 1], a float dtype")

    def __repr__(self):
        return f"ToDtype({self.dtype}, scale={self.scale})"


class ToTensor(ElementwiseTransform):
    """torchvision's ToTensor: HWC uint8 -> CHW float32 in [0, 1]."""

    def __repr__(self):
        return "ToTensor()"


class Normalize(ElementwiseTransform):
    """``(x - mean) / std`` per channel, on CHW float images (after ToTensor/ToDtype)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        self.std = np.asarray(std, dtype=np.float64).reshape(-1)
        if len(self.mean) != len(self.std) or not len(self.mean) or np.any(self.std == 0):
            raise ConfigError(f"Normalize needs mean and std of the same length, std non-zero "
                              f"(got mean={list(self.mean)}, std={list(self.std)})")

    def __repr__(self):
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class Tail:
    """The trailing elementwise transforms, fused: the output layout and dtype, and
    ``out = x * multiplier[c] + offset[c]`` per channel when the output is float."""

    def __init__(self, channels: int):
        self.channels = channels
        self.input_layout = self.layout = "HWC"
        self.input_dtype = self.dtype = np.dtype(np.uint8)
        self.multiplier = np.ones(channels)
        self.offset = np.zeros(channels)
        self._table = None

    @classmethod
    def build(cls, transforms, channels: int, layout: str = "HWC", dtype=np.uint8) -> Tail:
        tail = cls(channels)
        tail.input_layout = tail.layout = layout
        tail.input_dtype = tail.dtype = np.dtype(dtype)
        for transform in transforms:
            if isinstance(transform, (ToImage, ToTensor)):
                if tail.layout != "HWC":
                    raise ConfigError(f"{transform!r} expects an HWC image, but it is CHW already")
                tail.layout = "CHW"
            if isinstance(transform, ToTensor):
                transform = ToDtype(np.float32, scale=True)
            if isinstance(transform, ToDtype):
                if transform.scale and tail.dtype.kind in "iu":
                    tail.multiplier = tail.multiplier / float(np.iinfo(tail.dtype).max)
                    tail.offset = tail.offset / float(np.iinfo(tail.dtype).max)
                tail.dtype = transform.dtype
            elif isinstance(transform, Normalize):
                if tail.layout != "CHW" or tail.dtype.kind != "f":
                    raise ConfigError(f"{transform!r} needs a CHW float image: put ToTensor() (or ToImage() and "
                                      "ToDtype(np.float32, scale=True)) before it")
                if len(transform.mean) not in (1, channels):
                    raise ConfigError(f"{transform!r} has {len(transform.mean)} channels, the images have "
                                      f"{channels}")
                tail.multiplier = tail.multiplier / transform.std
                tail.offset = (tail.offset - transform.mean) / transform.std
        return tail

    @property
    def affine(self) -> bool:
        return bool(np.any(self.multiplier != 1) or np.any(self.offset != 0))

    def sample_shape(self, spatial: tuple[int, int]) -> tuple[int, ...]:
        return (self.channels, *spatial) if self.layout == "CHW" else (*spatial, self.channels)

    def write(self, image: np.ndarray, out: np.ndarray) -> None:
        """Write one sample (in the input layout) into `out` (its slot in the batch)."""
        if self.layout != self.input_layout:
            image = image.transpose(2, 0, 1)
        if not self.affine:
            np.copyto(out, image, casting="unsafe")
            return
        axis = (slice(None), None, None) if self.layout == "CHW" else (None, None, slice(None))
        multiplier = self.multiplier.astype(self.dtype)[axis]
        np.multiply(image, multiplier, out=out, casting="unsafe")
        if np.any(self.offset != 0):
            out += self.offset.astype(self.dtype)[axis]

    def table(self) -> np.ndarray:
        """``(channels, 256)``: what each uint8 value becomes in each channel, computed
        by `write` itself (so a kernel that looks values up writes the same bytes).
        Only for tails that take HWC uint8."""
        if self._table is None:
            values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (1, 256, self.channels))
            table = np.empty((self.sample_shape((1, 256))), self.dtype)
            self.write(values, table)
            self._table = np.ascontiguousarray(table.reshape(self.channels, 256) if self.layout == "CHW"
                                               else table.reshape(256, self.channels).T)
        return self._table

    def apply_to_batch(self, batch):
        """The same on a whole NHWC batch in the input layout and dtype, on whatever
        device it is (numpy or cupy)."""
        xp = get_array_module(batch)
        if self.layout != self.input_layout:
            batch = batch.transpose(0, 3, 1, 2)
        batch = xp.ascontiguousarray(batch).astype(self.dtype, copy=False)
        if self.affine:
            shape = (1, -1, 1, 1) if self.layout == "CHW" else (1, 1, 1, -1)
            batch = batch * xp.asarray(self.multiplier.astype(self.dtype)).reshape(shape)
            batch += xp.asarray(self.offset.astype(self.dtype)).reshape(shape)
        return batch


class ImagePipeline:
    """A list of transforms split into its three stages (see the module docstring)."""

    def __init__(self, transforms: Sequence, channels: int):
        transforms = list(transforms or ())
        split = 0
        while split < len(transforms) and isinstance(transforms[split], GeometricTransform):
            split += 1
        self.geometric = transforms[:split]
        rest = transforms[split:]
        tail_start = len(rest)
        while tail_start and isinstance(rest[tail_start - 1], ElementwiseTransform):
            tail_start -= 1
        self.middle, tail = rest[:tail_start], rest[tail_start:]
        for transform in rest:
            if isinstance(transform, GeometricTransform):
                raise ConfigError(f"{transform!r} comes after {rest[0]!r}: put the geometric transforms "
                                  "(crops, resizes, flips) first")
            if not isinstance(transform, ElementwiseTransform) and not callable(transform):
                raise ConfigError(f"image transform {transform!r} is not callable")
        self.channels = channels
        self.tail = Tail.build(tail, channels) if not self.middle else None
        self._tail_transforms = tail

    def defer_tail(self) -> Tail | None:
        """Hand the fused tail to the caller, to run on the whole batch on the GPU: the
        samples then stay HWC uint8. None when there is nothing to defer (or a custom
        transform makes the tail depend on its output)."""
        if self.tail is None or (self.tail.layout == "HWC" and self.tail.dtype == np.uint8):
            return None
        deferred, self.tail = self.tail, Tail.build([], self.channels)
        return deferred

    def geometry(self, height: int, width: int, rng) -> Geometry:
        geometry = Geometry(height, width)
        for transform in self.geometric:
            transform.plan(geometry, rng)
        return geometry

    def finish(self, image: np.ndarray, rng) -> np.ndarray:
        """Run the middle stage on a decoded, resampled image: custom transforms, and
        any run of elementwise transforms between them, fused."""
        run: list = []
        for transform in self.middle + [None]:
            if isinstance(transform, ElementwiseTransform):
                run.append(transform)
                continue
            if run:
                tail = self._tail_of(run, image)
                out = np.empty(tail.sample_shape(_spatial(image, tail.input_layout)), tail.dtype)
                tail.write(image, out)
                image, run = out, []
            if transform is not None:
                image = transform(image, rng)
        return image

    def tail_for(self, sample: np.ndarray) -> Tail:
        """The fused tail for samples shaped like `sample` (what the middle stage returns)."""
        return self.tail if self.tail is not None else self._tail_of(self._tail_transforms, sample)

    def _tail_of(self, transforms, sample: np.ndarray) -> Tail:
        layout = "HWC" if sample.ndim == 3 and sample.shape[-1] == self.channels else "CHW"
        return Tail.build(transforms, self.channels, layout=layout, dtype=sample.dtype)


def _spatial(image: np.ndarray, layout: str) -> tuple[int, int]:
    return image.shape[:2] if layout == "HWC" else image.shape[1:]
