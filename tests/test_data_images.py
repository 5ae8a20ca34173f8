"""Encoded image columns: decoding, the torchvision-named transforms, bad images.

References are computed independently: Pillow decoding and resizing the same
bytes step by step, torchvision's formulas written out by hand, and, where torch is
installed, torch's own ops on the same pixels."""

import io
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from media_helpers import encode, photo, write_images
from PIL import Image

from distprop.data import ArrowLoader
from distprop.data.images import Geometry, ImageDecoder
from distprop.data.loader import DataWarning
from distprop.data.transforms import (CenterCrop, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize,
                                      ToDtype, ToImage, ToTensor)
from distprop.errors import ConfigError, DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def by_label(loader) -> dict[int, dict]:
    """Every sample of one pass, keyed by its label (= its row), as {column: array}."""
    samples = {}
    for batch in loader:
        for j, label in enumerate(batch["label"].tolist()):
            samples[label] = {name: values[j] for name, values in batch.items()}
    return samples


def pillow(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.parametrize("hf_struct", [False, True])
@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP"])
def test_images_decode_to_hwc_uint8_as_pillow_does(tmp_path, format, hf_struct):
    blobs = write_images(tmp_path / "d.parquet", 10, size=(32, 32), format=format, hf_struct=hf_struct)
    loader = ArrowLoader(tmp_path, 1, shuffle=False, image_transforms=[Resize((32, 32))])
    for label, sample in by_label(loader).items():
        reference = np.asarray(pillow(blobs[label]).resize((32, 32), Image.BILINEAR))
        difference = np.abs(sample["image"].astype(int) - reference.astype(int))
        # JPEGs: distprop decodes with the fast integer DCT and plain chroma upsampling
        assert sample["image"].dtype == np.uint8 and sample["image"].shape == (32, 32, 3)
        assert difference.max() <= (12 if format == "JPEG" else 0), (format, difference.max())
        assert difference.mean() <= (2 if format == "JPEG" else 0), (format, difference.mean())


def test_to_tensor_and_normalize_match_the_formula(tmp_path):
    blobs = write_images(tmp_path / "d.parquet", 6, size=(20, 24), format="PNG")
    transforms = [CenterCrop((16, 20)), ToTensor(), Normalize(MEAN, STD)]
    samples = by_label(ArrowLoader(tmp_path, 3, shuffle=False, image_transforms=transforms))
    for label, sample in samples.items():
        pixels = np.asarray(pillow(blobs[label]))
        top, left = int(round((pixels.shape[0] - 16) / 2)), int(round((pixels.shape[1] - 20) / 2))
        crop = pixels[top:top + 16, left:left + 20].transpose(2, 0, 1) / 255.0
        expected = (crop - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
        assert sample["image"].dtype == np.float32 and sample["image"].shape == (3, 16, 20)
        np.testing.assert_allclose(sample["image"], expected, rtol=1e-5, atol=1e-5)


def test_layout_and_dtype_transforms(tmp_path):
    write_images(tmp_path / "d.parquet", 4, size=(10, 10), format="PNG")
    chw = next(iter(ArrowLoader(tmp_path, 4, shuffle=False, image_transforms=[Resize((8, 9)), ToImage()])))
    hwc = next(iter(ArrowLoader(tmp_path, 4, shuffle=False, image_transforms=[Resize((8, 9))])))
    assert chw["image"].shape == (4, 3, 8, 9) and chw["image"].dtype == np.uint8
    np.testing.assert_array_equal(chw["image"], hwc["image"].transpose(0, 3, 1, 2))
    scaled = next(iter(ArrowLoader(tmp_path, 4, shuffle=False,
                                   image_transforms=[Resize((8, 9)), ToImage(), ToDtype(np.float32, scale=True)])))
    np.testing.assert_allclose(scaled["image"], chw["image"] / 255.0, rtol=1e-6)


def test_resize_keeps_the_aspect_ratio_as_torchvision(tmp_path):
    write_images(tmp_path / "d.parquet", 3, size=(30, 50), jitter=0, format="PNG")
    samples = by_label(ArrowLoader(tmp_path, 1, shuffle=False, image_transforms=[Resize(20)], drop_last=False))
    for sample in samples.values():
        assert sample["image"].shape == (20, 33, 3)  # torchvision: the long side is int(20 * 50 / 30)


def test_random_resized_crop_region_follows_torchvision():
    """torchvision's get_params: area fraction within scale, aspect within ratio
    (before rounding), inside the image; the fallback is the clamped central crop."""
    crop = RandomResizedCrop(224)
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = crop.region(375, 500, rng)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        assert 0.08 * 0.9 <= h * w / (375 * 500) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # A sliver image admits no sampled region: central crop, ratio clamped to 4/3 (w = round(10 * 4/3)).
    assert RandomResizedCrop(8, scale=(0.9, 1.0)).region(10, 400, rng) == (0, 193, 10, 13)


def test_random_resized_crop_and_flip_match_pillow_step_by_step():
    """The planned geometry (decoded once, resampled once) against Pillow cropping the
    full decode and resizing it: equal up to resampling at the crop's edges."""
    rng = np.random.default_rng(1)
    data = encode(photo(rng, 375, 500), "JPEG", quality=95)
    decoder = ImageDecoder()
    crop = RandomResizedCrop(64)
    for seed in range(20):
        geometry = Geometry(375, 500)
        region = crop.region(375, 500, np.random.default_rng(seed))
        crop.plan(geometry, np.random.default_rng(seed))
        geometry.flip = seed % 2 == 1
        ours = decoder.decode(data, geometry)
        top, left, h, w = region
        reference = pillow(data).crop((left, top, left + w, top + h)).resize((64, 64), Image.BILINEAR)
        if seed % 2:
            reference = reference.transpose(Image.FLIP_LEFT_RIGHT)
        difference = np.abs(ours.astype(int) - np.asarray(reference).astype(int))
        assert difference.mean() < 3.0, (seed, difference.mean())  # reduced-scale decoding: ~1-2 levels


def test_reduced_size_decoding_keeps_detail():
    """A small crop output from a big JPEG region is decoded at 1/2..1/8 scale; it must
    still match the full-size decode resized to the same output."""
    rng = np.random.default_rng(2)
    data = encode(photo(rng, 800, 1000), "JPEG", quality=95)
    geometry = Geometry(800, 1000)
    Resize((100, 125)).plan(geometry, None)
    ours = ImageDecoder().decode(data, geometry)
    reference = np.asarray(pillow(data).resize((125, 100), Image.BILINEAR))
    assert np.abs(ours.astype(int) - reference.astype(int)).mean() < 3.0


def test_augmentation_depends_on_seed_epoch_and_sample_only(tmp_path):
    write_images(tmp_path / "d.parquet", 24, size=(40, 40), row_group_size=5)
    transforms = [RandomResizedCrop(16), RandomHorizontalFlip(), ToTensor()]

    def samples(**options):
        return by_label(ArrowLoader(tmp_path, 4, drop_last=False, image_transforms=transforms, **options))

    one = samples(seed=3)
    for options in ({"seed": 3, "rank": 1, "world_size": 3}, {"seed": 3, "shuffle": False}):
        for label, sample in samples(**options).items():
            np.testing.assert_array_equal(sample["image"], one[label]["image"])
    other = samples(seed=4)
    assert any(not np.array_equal(other[k]["image"], one[k]["image"]) for k in one)
    loader = ArrowLoader(tmp_path, 4, drop_last=False, image_transforms=transforms, seed=3)
    loader.set_epoch(1)
    next_epoch = by_label(loader)
    assert any(not np.array_equal(next_epoch[k]["image"], one[k]["image"]) for k in one)


def test_custom_transforms_get_the_sample_generator(tmp_path):
    write_images(tmp_path / "d.parquet", 8, size=(12, 12), format="PNG")

    def brighten(image, rng):
        return np.minimum(image.astype(np.int32) + int(rng.integers(0, 50)), 255).astype(np.uint8)

    transforms = [Resize((8, 8)), brighten, ToTensor()]
    first = by_label(ArrowLoader(tmp_path, 4, seed=1, image_transforms=transforms))
    again = by_label(ArrowLoader(tmp_path, 2, seed=1, image_transforms=transforms))
    for label in first:
        np.testing.assert_array_equal(first[label]["image"], again[label]["image"])
    assert first[0]["image"].shape == (3, 8, 8)


def test_grayscale_images_become_rgb_and_one_channel_is_available(tmp_path):
    rng = np.random.default_rng(0)
    gray = [encode(photo(rng, 16, 16, 1), "PNG") for _ in range(4)]
    pq.write_table(pa.table({"image": pa.array(gray, pa.binary()), "label": np.arange(4)}), tmp_path / "g.parquet")
    rgb = next(iter(ArrowLoader(tmp_path, 4, shuffle=False)))["image"]
    assert rgb.shape == (4, 16, 16, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    one = next(iter(ArrowLoader(tmp_path, 4, shuffle=False, channels=1, image_transforms=[ToTensor()])))["image"]
    assert one.shape == (4, 1, 16, 16)
    np.testing.assert_allclose(one[:, 0], rgb[..., 0] / 255.0, rtol=1e-6)


def data_error(*fragments, call):
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def corrupt_cases():
    rng = np.random.default_rng(5)
    good = encode(photo(rng, 40, 40), "JPEG")
    rgba = encode(np.dstack([photo(rng, 40, 40), np.full((40, 40, 1), 200, np.uint8)]), "PNG")
    return {
        "corrupt": (b"\xff\xd8" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)), "JPEG"),
        "truncated": (good[:len(good) // 2], "truncated"),
        "not an image": (b"plain text, not an image", "is not an image format"),
        "alpha": (rgba, "mode RGBA"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_bad_images_name_file_row_group_and_row(tmp_path, case):
    data, fragment = corrupt_cases()[case]
    write_images(tmp_path / "d.parquet", 12, size=(40, 40), row_group_size=5, replace={7: data})
    loader = ArrowLoader(tmp_path, 4, shuffle=False, drop_last=False, image_transforms=[CenterCrop(32)])
    data_error("d.parquet (row group 1) row 2", "column 'image'", fragment, call=lambda: list(loader))


def test_a_colour_image_where_one_channel_is_expected(tmp_path):
    write_images(tmp_path / "d.parquet", 4, size=(16, 16))
    data_error("row group 0) row 0", "colour", call=lambda: list(ArrowLoader(tmp_path, 2, channels=1, shuffle=False,
                                                                           image_transforms=[Resize((8, 8))])))


def test_null_image_bytes_name_the_path(tmp_path):
    images = pa.StructArray.from_arrays([pa.array([encode(photo(np.random.default_rng(0), 8, 8)), None]),
                                         pa.array(["a.jpg", "b.jpg"])], names=["bytes", "path"])
    pq.write_table(pa.table({"image": images, "label": [0, 1]}), tmp_path / "n.parquet")
    data_error("row 1", "no image bytes", "b.jpg", call=lambda: list(ArrowLoader(tmp_path, 2, shuffle=False)))


def test_images_of_different_sizes_need_a_fixed_size_transform(tmp_path):
    write_images(tmp_path / "d.parquet", 6, size=(20, 20))
    data_error("column 'image' gives an image of shape", "fixed-size", call=lambda: list(ArrowLoader(tmp_path, 6)))


def test_on_error_skip_leaves_bad_images_out_and_reports_them(tmp_path):
    bad = corrupt_cases()
    write_images(tmp_path / "d.parquet", 12, size=(40, 40), row_group_size=5,
                 replace={3: bad["corrupt"][0], 8: bad["truncated"][0]})
    loader = ArrowLoader(tmp_path, 4, shuffle=False, on_error="skip", image_transforms=[CenterCrop(32), ToTensor()])
    with pytest.warns(DataWarning, match="left out 2 sample"):
        batches = list(loader)
    assert [b["label"].tolist() for b in batches] == [[0, 1, 2], [4, 5, 6, 7], [9, 10, 11]]
    assert len(batches[0]["image"]) == 3
    assert len(loader.skipped) == 2 and "row group 0) row 3" in loader.skipped[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.set_epoch(1)
        list(ArrowLoader(tmp_path, 4, columns=["label"]))  # nothing skipped: no warning


def test_transform_order_and_arguments_are_checked(tmp_path):
    write_images(tmp_path / "d.parquet", 4, size=(16, 16))
    with pytest.raises(ConfigError, match="put the geometric transforms"):
        ArrowLoader(tmp_path, 2, image_transforms=[ToTensor(), RandomHorizontalFlip()])
    with pytest.raises(ConfigError, match="needs a CHW float image"):
        ArrowLoader(tmp_path, 2, image_transforms=[Normalize(MEAN, STD)])
    with pytest.raises(ConfigError, match="on_error"):
        ArrowLoader(tmp_path, 2, on_error="ignore")
    with pytest.raises(ConfigError, match="no image column"):
        ArrowLoader(tmp_path, 2, columns=["label"], image_transforms=[ToTensor()])


def test_gpu_tail_runs_on_the_whole_batch_as_on_each_sample(tmp_path):
    """The deferred ToTensor/Normalize (what device="gpu" runs after the uint8 copy),
    checked on numpy: the same numbers as the per-sample path."""
    from distprop.data.transforms import ImagePipeline

    write_images(tmp_path / "d.parquet", 8, size=(20, 20), format="PNG")
    transforms = [CenterCrop(16), ToTensor(), Normalize(MEAN, STD)]
    per_sample = next(iter(ArrowLoader(tmp_path, 8, shuffle=False, image_transforms=transforms)))["image"]
    pipeline = ImagePipeline(transforms, 3)
    tail = pipeline.defer_tail()
    uint8 = next(iter(ArrowLoader(tmp_path, 8, shuffle=False, image_transforms=transforms[:1])))["image"]
    np.testing.assert_allclose(tail.apply_to_batch(uint8), per_sample, rtol=1e-5, atol=1e-6)
    assert pipeline.tail.layout == "HWC" and pipeline.tail.dtype == np.uint8 and not pipeline.tail.affine


def test_normalize_matches_torch_where_installed():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    image = photo(rng, 10, 12)
    from distprop.data.transforms import Tail

    tail = Tail.build([ToTensor(), Normalize(MEAN, STD)], 3)
    ours = np.empty((3, 10, 12), np.float32)
    tail.write(image, ours)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    expected = (tensor - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5, atol=1e-6)
