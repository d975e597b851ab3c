"""The CelebA prepare stage on real sample images, checked against independent PIL / scipy computations."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image, ImageFilter

from study.data.celeba import (
    CorruptImageError,
    larsen_crop,
    load_image,
    preblur_sigma,
    prepare_celeba,
    preprocess,
    read_partition,
)
from tests.conftest import FULL_PARTITION


def test_crop_geometry_matches_pil_box(sample_root):
    path = sample_root / "img_align_celeba" / "000001.jpg"
    img = load_image(path)
    assert img.shape == (218, 178, 3)
    # PIL's crop box is (left, upper, right, lower): Larsen's img[40:188, 15:163].
    expected = np.asarray(Image.open(path).convert("RGB").crop((15, 40, 163, 188)))
    crop = larsen_crop(img)
    assert crop.shape == (148, 148, 3)
    np.testing.assert_array_equal(crop, expected)


@pytest.mark.parametrize("resolution", [32, 64])
def test_preprocess_matches_scipy_reimplementation(sample_root, resolution):
    """The stated maths written out with scipy.ndimage: crop by slicing, Gaussian blur with sigma
    sqrt(148 / R) / 2 (truncate 4, edge mode 'nearest'), cubic-spline sampling at the output pixel centres
    in = (out + 0.5) * 148 / R - 0.5 with mirrored edges, rounding to uint8."""
    from scipy import ndimage

    for name in ("000001.jpg", "000007.jpg"):
        img = np.asarray(Image.open(sample_root / "img_align_celeba" / name).convert("RGB"))
        face = img[40:188, 15:163].astype(np.float64) / 255.0
        sigma = np.sqrt(148 / resolution) / 2
        blurred = np.stack(
            [ndimage.gaussian_filter(face[..., c], sigma, mode="nearest", truncate=4.0) for c in range(3)], -1
        )
        centres = (np.arange(resolution) + 0.5) * 148 / resolution - 0.5
        rows, cols = np.meshgrid(centres, centres, indexing="ij")
        ref = np.stack(
            [ndimage.map_coordinates(blurred[..., c], [rows, cols], order=3, mode="mirror") for c in range(3)], -1
        )
        ref = np.clip(np.rint(ref * 255), 0, 255)
        ours = preprocess(img, resolution).astype(np.float64)
        assert ours.shape == (resolution, resolution, 3)
        assert np.abs(ours - ref).max() <= 1.0  # rounding of values that differ only at float precision


def test_preprocess_close_to_pil_pipeline(sample_root):
    """An independent library (PIL: box crop, Gaussian blur, bicubic resize) lands within a few grey levels
    on average at 64 x 64; a crop box shifted by 3 pixels lands clearly further away."""
    path = sample_root / "img_align_celeba" / "000001.jpg"
    ours = preprocess(load_image(path), 64).astype(np.float64)

    def pil(box):
        im = Image.open(path).convert("RGB").crop(box).filter(ImageFilter.GaussianBlur(preblur_sigma(64)))
        return np.asarray(im.resize((64, 64), Image.Resampling.BICUBIC)).astype(np.float64)

    err = np.abs(ours - pil((15, 40, 163, 188))).mean()
    assert err < 3.5, err
    assert np.abs(ours - pil((18, 43, 166, 191))).mean() > 2 * err


def test_split_logic_reproduces_official_counts(tmp_path):
    # read_partition reads plain text, as the release ships it; the repository keeps the list gzipped.
    plain = tmp_path / "list_eval_partition.txt"
    plain.write_bytes(gzip.decompress(FULL_PARTITION.read_bytes()))
    splits = read_partition(plain)
    assert {k: len(v) for k, v in splits.items()} == {"train": 162_770, "val": 19_867, "test": 19_962}
    assert splits["train"][0] == "000001.jpg" and splits["test"][-1] == "202599.jpg"
    assert splits["val"][0] == "162771.jpg" and splits["test"][0] == "182638.jpg"


def test_sample_partition_and_prepared_arrays(sample_root):
    arrays, _ = prepare_celeba(sample_root, None, 32)
    assert {k: v.shape for k, v in arrays.items()} == {
        "train": (24, 32, 32, 3),
        "val": (4, 32, 32, 3),
        "test": (4, 32, 32, 3),
    }
    # The first val image of the sample partition is the file listed first with split 1.
    val_files = read_partition(sample_root / "list_eval_partition.txt")["val"]
    direct = preprocess(load_image(sample_root / "img_align_celeba" / val_files[0]), 32)
    np.testing.assert_array_equal(arrays["val"][0], direct)


def test_parallel_decoding_equals_serial(sample_root):
    serial, _ = prepare_celeba(sample_root, None, 32, workers=1)
    parallel, _ = prepare_celeba(sample_root, None, 32, workers=2)
    for split in serial:
        np.testing.assert_array_equal(serial[split], parallel[split])


def test_missing_folder_names_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="img_align_celeba.*not found.*aligned-and-cropped"):
        prepare_celeba(tmp_path, None, 64)


def test_missing_partition_file(sample_copy):
    (sample_copy / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        prepare_celeba(sample_copy, None, 64)


def test_listed_but_absent_image_is_named(sample_copy):
    (sample_copy / "img_align_celeba" / "000005.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000005.jpg.*missing"):
        prepare_celeba(sample_copy, None, 32)


def test_truncated_jpeg_is_named(sample_copy):
    path = sample_copy / "img_align_celeba" / "000003.jpg"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CorruptImageError, match="000003.jpg"):
        prepare_celeba(sample_copy, None, 32)


def test_not_an_image_is_named(sample_copy):
    (sample_copy / "img_align_celeba" / "000004.jpg").write_text("not a jpeg")
    with pytest.raises(CorruptImageError, match="000004.jpg"):
        prepare_celeba(sample_copy, None, 32)


def test_wrong_size_image_is_named(sample_copy):
    path = sample_copy / "img_align_celeba" / "000002.jpg"
    Image.open(path).resize((100, 100)).save(path)
    with pytest.raises(CorruptImageError, match="000002.jpg.*218, 178"):
        prepare_celeba(sample_copy, None, 32)


def test_malformed_partition_line(sample_copy):
    part = sample_copy / "list_eval_partition.txt"
    part.write_text(part.read_text() + "000033.jpg 7\n")
    with pytest.raises(ValueError, match="list_eval_partition.txt:33"):
        read_partition(part)
