"""The LSUN church_outdoor reader on LMDBs built in exactly the official format from real photographs.

Stand-ins (tests/data/lsun_fixtures.py): a "train" LMDB of 38 real photographs (32 CelebA portraits, 6 landscape /
square scikit-image photographs) and a "val" LMDB of 5 (two grayscale). Pixels are checked against an
independent Pillow computation and against a NumPy re-implementation of the documented resize.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import lmdb
import numpy as np
import pytest
from PIL import Image

from study.data.lsun import (
    CorruptRecordError,
    centre_crop_resize,
    crop_box,
    decode_record,
    encode_lsun_jpeg,
    iter_records,
    list_keys,
    open_lmdb,
    prepare_lsun,
    read_records,
    split_train_keys,
    write_lsun_lmdb,
)
from study.data.store import load_split, write_prepared
from tests.data.lsun_fixtures import (
    build_lmdb,
    garbage_bytes,
    lsun_key,
    photo_records,
    train_test_records,
    truncated,
)


@pytest.fixture(scope="session")
def records() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    return train_test_records()


@pytest.fixture(scope="session")
def lmdbs(records, tmp_path_factory):
    root = tmp_path_factory.mktemp("lsun")
    train, test = records
    return build_lmdb(root / "church_outdoor_train_lmdb", train), build_lmdb(root / "church_outdoor_val_lmdb", test)


@pytest.fixture(scope="session")
def prepared32(lmdbs):
    return prepare_lsun(*lmdbs, resolution=32)


def pil_reference(value: bytes, resolution: int) -> np.ndarray:
    """Independent Pillow pipeline: decode, crop box (left, upper, right, lower) of the centred square, resize."""
    im = Image.open(io.BytesIO(value)).convert("RGB")
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(im.crop(box).resize((resolution, resolution), Image.Resampling.BICUBIC))


def numpy_bicubic(img: np.ndarray, resolution: int) -> np.ndarray:
    """The resize as the docstring states it, in float64: Keys cubic (a = -0.5) at x = (i + 0.5) s / R - 0.5,
    stretched by s / R when shrinking, out-of-image taps dropped, weights normalised; horizontal pass, round and
    clip, vertical pass, round and clip."""

    def cubic(x, a=-0.5):
        x = np.abs(x)
        return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0))

    def matrix(n_in):
        scale = n_in / resolution
        stretch = max(scale, 1.0)
        x = (np.arange(resolution) + 0.5) * scale - 0.5
        w = cubic((np.arange(n_in)[None, :] - x[:, None]) / stretch)
        return w / w.sum(axis=1, keepdims=True)  # (R, n_in)

    f = img.astype(np.float64)
    rows = np.clip(np.rint(np.einsum("rw,hwc->hrc", matrix(f.shape[1]), f)), 0, 255)
    return np.clip(np.rint(np.einsum("rh,hwc->rwc", matrix(f.shape[0]), rows)), 0, 255)


# ---------------------------------------------------------------------------------------------- the format


def test_lmdb_is_in_the_official_format(lmdbs, records):
    for path, recs in zip(lmdbs, records, strict=True):
        assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]
        env = lmdb.open(str(path), readonly=True, lock=False)  # plain lmdb, as fyu/lsun's data.py reads it
        with env.begin() as txn:
            assert txn.stat()["entries"] == len(recs)
            for key, value in txn.cursor():
                assert len(key) == 40 and all(c in b"0123456789abcdef" for c in key)
                im = Image.open(io.BytesIO(value))
                assert value[:2] == b"\xff\xd8" and im.format == "JPEG" and min(im.size) == 256
        env.close()
    # Quality 75: the quantisation tables are those Pillow writes at quality 75.
    ref = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ref, format="JPEG", quality=75)
    colour = next(v for v in records[0].values())
    assert Image.open(io.BytesIO(colour)).quantization == Image.open(ref).quantization


def test_torchvision_lsun_reads_the_test_lmdb(lmdbs, tmp_path, monkeypatch):
    """torchvision's LSUN reader (the route ``fyu/lsun`` names) sees the same records, in the same order."""
    from torchvision.datasets.lsun import LSUNClass

    monkeypatch.chdir(tmp_path)  # LSUNClass writes a key cache into the working directory
    path = lmdbs[1]
    ours = [decode_record(k, v) for k, v in iter_records(path)]
    ds = LSUNClass(str(path))
    try:  # py-lmdb refuses a second handle on an open folder, so LSUNClass's must be closed afterwards
        assert len(ds) == len(ours) == 5
        for i, img in enumerate(ours):
            np.testing.assert_array_equal(np.asarray(ds[i][0]), img)
    finally:
        ds.env.close()


def test_key_order_is_lmdb_sorted_order(lmdbs, records):
    train_path, _ = lmdbs
    keys = list_keys(train_path)
    assert keys == sorted(records[0]) and keys != list(records[0])  # insertion order was not sorted
    assert [k for k, _ in iter_records(train_path)] == keys
    chosen = [keys[5], keys[0], keys[17]]
    assert [(k, v) for k, v in read_records(train_path, chosen)] == [(k, records[0][k]) for k in chosen]
    with pytest.raises(KeyError, match="f" * 40):
        list(read_records(train_path, [b"f" * 40]))


# ------------------------------------------------------------------------------------------ pixels, splits


def test_prepare_counts_splits_and_shapes(prepared32, lmdbs, records):
    arrays, info = prepared32
    train_keys, val_keys = split_train_keys(sorted(records[0]), 0.05, 0)
    assert len(val_keys) == round(0.05 * 38) == 2
    assert set(train_keys).isdisjoint(val_keys) and set(train_keys) | set(val_keys) == set(records[0])
    assert info["counts"] == {"train": 36, "val": 2, "test": 5}
    assert info["lmdb_records"] == {"train_lmdb": 38, "test_lmdb": 5}
    assert info["val_keys_sha256"] == hashlib.sha256(b"\n".join(sorted(val_keys))).hexdigest()
    assert info["skipped_count"] == {"train": 0, "val": 0, "test": 0}
    assert (info["val_fraction"], info["seed"], info["resolution"]) == (0.05, 0, 32)
    for split, n in info["counts"].items():
        assert arrays[split].shape == (n, 32, 32, 3) and arrays[split].dtype == np.uint8
    json.dumps(info)  # goes into the manifest

    # Pixels: each split's rows follow its keys in LMDB order; test = the whole val LMDB.
    order = {"train": train_keys, "val": val_keys, "test": sorted(records[1])}
    for split, idx in (("train", [0, 13, 35]), ("val", [0, 1]), ("test", [0, 2, 4])):
        for i in idx:
            value = (records[0] | records[1])[order[split][i]]
            np.testing.assert_array_equal(arrays[split][i], pil_reference(value, 32), err_msg=f"{split}[{i}]")


def test_split_is_seeded(records):
    keys = sorted(records[0])
    assert split_train_keys(keys, 0.05, 0) == split_train_keys(keys, 0.05, 0)
    assert any(split_train_keys(keys, 0.05, 0)[1] != split_train_keys(keys, 0.05, s)[1] for s in (1, 2, 3))
    train, val = split_train_keys(keys, 0.25, 7)
    assert len(val) == 10 and train == [k for k in keys if k not in set(val)] and val == sorted(val)


def test_split_sizes_for_the_real_train_lmdb():
    keys = [f"{i:040x}".encode() for i in range(126_227)]
    train, val = split_train_keys(keys, 0.05, 0)
    assert (len(train), len(val)) == (119_916, 6_311)
    assert split_train_keys(keys[:1], 0.05, 0) == (keys[:1], [])  # one image: nothing to hold out
    assert split_train_keys(keys[:3], 0.05, 0)[1] != []  # at least one when there are two or more
    assert split_train_keys(keys[:50], 0.0, 0) == (keys[:50], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_keys(keys[:10], 1.0, 0)
    with pytest.raises(ValueError, match="duplicates"):
        split_train_keys(keys[:2] + keys[:1], 0.5, 0)


@pytest.mark.parametrize("resolution", [64, 32])
def test_resize_is_the_documented_bicubic(records, resolution):
    """The stated crop and filter written out in NumPy agree with the reader to within one grey level."""
    for key in sorted(records[0])[:2] + [lsun_key("chelsea"), lsun_key("rocket")]:
        img = decode_record(key, records[0][key])
        top, left, s = crop_box(*img.shape[:2])
        ref = numpy_bicubic(img[top : top + s, left : left + s], resolution)
        diff = np.abs(centre_crop_resize(img, resolution).astype(np.float64) - ref)
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())  # LANCZOS: > 0.3


def test_crop_geometry(records):
    chelsea = decode_record(b"k", records[0][lsun_key("chelsea")])  # 300 x 451 photograph -> 256 x 385
    assert chelsea.shape == (256, 385, 3)
    assert crop_box(256, 385) == (0, 64, 256)
    assert crop_box(313, 256) == (28, 0, 256)  # a CelebA portrait at short side 256
    assert crop_box(256, 341) == (0, 42, 256)  # the example in CROP_DESCRIPTION
    # At R = side the resize is the identity, so the output is exactly the crop.
    np.testing.assert_array_equal(centre_crop_resize(chelsea, 256), chelsea[:, 64:320])
    shifted = centre_crop_resize(np.ascontiguousarray(chelsea[:, 3:]), 64)
    assert np.abs(shifted.astype(int) - centre_crop_resize(chelsea, 64)).mean() > 1


def test_grayscale_record_decodes_to_rgb(records):
    value = records[1][lsun_key("camera")]
    assert Image.open(io.BytesIO(value)).mode == "L"
    img = decode_record(lsun_key("camera"), value)
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


# ------------------------------------------------------------------------------------------------ failures


@pytest.fixture(scope="session")
def corrupt_lmdbs(records, tmp_path_factory):
    """Copies of the stand-ins with a garbage record and a truncated JPEG in train, and a truncated one in val."""
    root = tmp_path_factory.mktemp("lsun_corrupt")
    train, test = dict(records[0]), dict(records[1])
    bad = {
        "garbage": (b"0" * 40, garbage_bytes()),  # sorts first
        "truncated": (b"7" * 40, truncated(train[lsun_key("astronaut")])),
        "test_truncated": (b"a" * 40, truncated(test[lsun_key("retina")])),
    }
    train.update([bad["garbage"], bad["truncated"]])
    test.update([bad["test_truncated"]])
    paths = build_lmdb(root / "train_lmdb", train), build_lmdb(root / "val_lmdb", test)
    return paths, {name: key for name, (key, _) in bad.items()}


@pytest.mark.parametrize("name", ["garbage", "truncated"])
def test_decode_names_the_corrupt_key(corrupt_lmdbs, name):
    (train_path, _), bad = corrupt_lmdbs
    [(key, value)] = read_records(train_path, [bad[name]])
    with pytest.raises(CorruptRecordError, match=key.decode()) as err:
        decode_record(key, value, train_path)
    assert str(train_path) in str(err.value) and err.value.key == key
    assert isinstance(err.value, ValueError)
    with pytest.raises(CorruptRecordError, match=r"0x00ff"):  # a non-ASCII key is named in hex
        decode_record(b"\x00\xff", value)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_raises_on_the_first_corrupt_record(corrupt_lmdbs, workers):
    (train_path, test_path), bad = corrupt_lmdbs
    train_keys, val_keys = split_train_keys(list_keys(train_path), 0.05, 0)
    first = next(k for k in train_keys if k in (bad["garbage"], bad["truncated"]))
    with pytest.raises(CorruptRecordError, match=first.decode()) as err:
        prepare_lsun(train_path, test_path, 16, workers=workers)
    assert err.value.key == first and err.value.path == str(train_path)


def test_skip_corrupt_lists_and_counts_them(corrupt_lmdbs, prepared32):
    (train_path, test_path), bad = corrupt_lmdbs
    arrays, info = prepare_lsun(train_path, test_path, 32, skip_corrupt=True)
    train_keys, val_keys = split_train_keys(list_keys(train_path), 0.05, 0)
    expected = {
        "train": [k.decode() for k in train_keys if k in (bad["garbage"], bad["truncated"])],
        "val": [k.decode() for k in val_keys if k in (bad["garbage"], bad["truncated"])],
        "test": [bad["test_truncated"].decode()],
    }
    assert info["skipped"] == expected and info["skip_corrupt"] is True
    assert info["skipped_count"] == {split: len(v) for split, v in expected.items()}
    assert sum(info["skipped_count"].values()) == 3
    assert info["lmdb_records"] == {"train_lmdb": 40, "test_lmdb": 6}
    for split, arr in arrays.items():
        assert arr.shape[0] == info["counts"][split]
    assert sum(info["counts"].values()) == 43
    # The good records are the clean stand-ins' images (the clean test split is the same 5 photographs).
    np.testing.assert_array_equal(arrays["test"], prepared32[0]["test"])


def test_missing_lmdb_says_what_to_put_where(lmdbs, tmp_path):
    missing = tmp_path / "church_outdoor_val_lmdb"
    with pytest.raises(FileNotFoundError) as err:
        prepare_lsun(lmdbs[0], missing, 32)
    msg = str(err.value)
    for part in (str(missing), "church_outdoor_val_lmdb/", "data.mdb", "lock.mdb", str(tmp_path), "LSUN"):
        assert part in msg, (part, msg)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="has no data.mdb"):
        open_lmdb(missing)
    (tmp_path / "church_outdoor_val_lmdb.zip").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match="unzip"):
        list_keys(missing)


def test_workers_give_identical_arrays(lmdbs, prepared32):
    arrays, info = prepare_lsun(*lmdbs, resolution=32, workers=2)
    assert info == prepared32[1]
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(arrays[split], prepared32[0][split])


def test_prepared_arrays_round_trip_through_the_store(prepared32, tmp_path):
    arrays, info = prepared32
    write_prepared(tmp_path / "lsun32", arrays, info)
    np.testing.assert_array_equal(load_split(tmp_path / "lsun32", "val"), arrays["val"])


# -------------------------------------------------------------------------------------------------- writer


def test_writer_checks_keys_and_round_trips(tmp_path):
    value = encode_lsun_jpeg(np.zeros((100, 150, 3), np.uint8))
    assert Image.open(io.BytesIO(value)).size == (384, 256)
    assert write_lsun_lmdb(tmp_path / "ok", [(lsun_key("b"), value), (lsun_key("a"), b"x")]) == 2
    assert list_keys(tmp_path / "ok") == sorted([lsun_key("a"), lsun_key("b")])
    with pytest.raises(ValueError, match="already holds"):
        write_lsun_lmdb(tmp_path / "ok", [])
    for bad in (b"ABC", lsun_key("a").upper(), "0" * 40):
        with pytest.raises(ValueError, match="40 lowercase hex"):
            write_lsun_lmdb(tmp_path / f"bad{len(bad)}{type(bad).__name__}", [(bad, value)])
    with pytest.raises(ValueError, match="twice"):
        write_lsun_lmdb(tmp_path / "dup", [(lsun_key("a"), value), (lsun_key("a"), value)])


def test_real_photographs_are_distinct(records):
    """Guard on the fixture itself: 43 different photographs, not one image repeated."""
    means = {round(float(decode_record(k, v).mean()), 3) for r in records for k, v in r.items()}
    assert len(means) == 43
    assert photo_records(["chelsea"]) == {lsun_key("chelsea"): records[0][lsun_key("chelsea")]}
