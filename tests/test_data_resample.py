"""Resampling a planned image region into the batch: the compiled kernels give
Pillow's bytes exactly (bilinear with antialiasing, both pass orders, float box
edges, 1 and 3 channels, mirrored or not), the fused ToTensor/Normalize/dtype tail
writes what `Tail.write` writes, and the Pillow fallback (no numba, or a dtype the
kernels do not take) gives the same batches as the kernels."""

import numpy as np
import pytest
from media_helpers import write_images

from distprop.data import ArrowLoader, resample
from distprop.data.resample import pillow_resample, resample_image, resample_into
from distprop.data.transforms import (CenterCrop, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize,
                                      Tail, ToDtype, ToImage, ToTensor)


def noise(rng, height, width, channels):
    """Noise, not a smooth picture: every rounding difference shows."""
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def random_case(rng):
    """Pixels, a float box inside them, an output size (shrinking, enlarging, or one
    of each along the two axes, so both of Pillow's pass orders run) and a flip."""
    channels = int(rng.choice([1, 3]))
    height, width = (int(v) for v in rng.integers(2, 160, 2))
    pixels = noise(rng, height, width, channels)
    x0, y0 = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
    x1, y1 = rng.uniform(x0 + 0.5, width), rng.uniform(y0 + 0.5, height)
    if rng.random() < 0.25:  # whole-pixel boxes, as a plain Resize or CenterCrop plans them
        x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    size = tuple(int(v) for v in rng.integers(1, 120, 2))
    return pixels, (float(x0), float(y0), float(x1), float(y1)), size, bool(rng.random() < 0.5)


def test_the_kernels_are_used_here():
    # The test extra installs numba: without it the comparisons below would compare Pillow with itself.
    assert resample.kernels() is not None


@pytest.mark.parametrize("seed", range(4))
def test_kernels_give_pillows_bytes(seed):
    rng = np.random.default_rng(seed)
    for case in range(60):
        pixels, box, size, flip = random_case(rng)
        ours = resample_image(pixels, box, size, flip)
        reference = pillow_resample(pixels, box, size, flip)
        assert ours.shape == reference.shape == (*size, pixels.shape[2])
        np.testing.assert_array_equal(ours, reference, err_msg=f"seed {seed} case {case}: {pixels.shape} "
                                                               f"box {box} -> {size} flip {flip}")


def test_kernels_give_pillows_bytes_on_photo_sized_crops():
    """The benchmark's case: a 500x375 image (or its 1/2-scale decode) cropped and
    resized to 224, and a plain resize with a center crop's box."""
    rng = np.random.default_rng(7)
    crop = RandomResizedCrop(224)
    for scale in (1, 2):
        pixels = noise(rng, 375 // scale, 500 // scale, 3)
        for _ in range(6):
            top, left, h, w = crop.region(375, 500, rng)
            box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
            np.testing.assert_array_equal(resample_image(pixels, box, (224, 224), True),
                                          pillow_resample(pixels, box, (224, 224), True))
    pixels = noise(rng, 375, 500, 3)
    np.testing.assert_array_equal(resample_image(pixels, (0.0, 0.0, 500.0, 375.0), (256, 341), False),
                                  pillow_resample(pixels, (0.0, 0.0, 500.0, 375.0), (256, 341), False))


@pytest.mark.parametrize("transforms, dtype", [
    ([ToTensor(), Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))], np.float32),
    ([ToTensor()], np.float32),
    ([ToImage(), ToDtype(np.float64, scale=True), Normalize((0.5,), (0.25,))], np.float64),
    ([ToImage(), ToDtype(np.int16)], np.int16),
    ([], np.uint8),
    ([ToImage(), ToDtype(np.float16, scale=True)], np.float16),  # no kernel: Pillow, then Tail.write
])
def test_the_fused_tail_writes_what_tail_write_writes(transforms, dtype):
    rng = np.random.default_rng(3)
    tail = Tail.build(transforms, 3)
    assert tail.dtype == dtype
    for _ in range(10):
        pixels, box, size, flip = random_case(rng)
        pixels = np.ascontiguousarray(np.repeat(pixels[:, :, :1], 3, axis=2) if pixels.shape[2] == 1 else pixels)
        ours = np.full(tail.sample_shape(size), 7, dtype)
        resample_into(pixels, box, flip, ours, tail)
        reference = np.empty_like(ours)
        tail.write(pillow_resample(pixels, box, size, flip), reference)
        np.testing.assert_array_equal(ours, reference)


def test_a_strided_view_is_written_in_place():
    """The batch slot is a view into a larger array; only its cells change."""
    rng = np.random.default_rng(4)
    pixels = noise(rng, 50, 70, 3)
    batch = np.full((3, 3, 20, 30), -1.0, np.float32)
    tail = Tail.build([ToTensor()], 3)
    resample_into(pixels, (3.5, 2.25, 60.0, 41.0), False, batch[1], tail)
    expected = np.empty((3, 20, 30), np.float32)
    tail.write(pillow_resample(pixels, (3.5, 2.25, 60.0, 41.0), (20, 30), False), expected)
    np.testing.assert_array_equal(batch[1], expected)
    assert (batch[0] == -1).all() and (batch[2] == -1).all()


TRANSFORM_LISTS = [
    [RandomResizedCrop(24), RandomHorizontalFlip(), ToTensor(), Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))],
    [Resize(30), CenterCrop(24)],
    [Resize((20, 28)), ToImage(), ToDtype(np.float16, scale=True)],
]


@pytest.mark.parametrize("transforms", TRANSFORM_LISTS)
def test_the_loader_gives_the_same_batches_without_numba(tmp_path, monkeypatch, transforms):
    write_images(tmp_path / "d.parquet", 20, size=(40, 48), row_group_size=6)

    def batches():
        loader = ArrowLoader(tmp_path, 5, seed=1, image_transforms=transforms, drop_last=False)
        return [{name: np.array(values) for name, values in batch.items()} for batch in loader]

    compiled = batches()
    monkeypatch.setattr(resample, "kernels", lambda: None)
    fallback = batches()
    assert len(compiled) == len(fallback) == 4
    for ours, reference in zip(compiled, fallback):
        for name in reference:
            np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)
