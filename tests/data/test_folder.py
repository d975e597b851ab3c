"""The ``folder`` dataset kind on real photographs: the 32 CelebA sample JPEGs in nested folders and four
photographs bundled with scikit-image written as PNG, beside files that must be ignored.

References are computed here independently of ``study.data.folder``: crops with Pillow's ``Image.crop`` on the
decoded file, resizes with Pillow's bicubic filter as the module documents, BT.601 luma and chroma in float64.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.prepare import main as prepare_main
from study.config import ConfigError, FolderDatasetConfig, parse_params
from study.data.folder import (
    CorruptImageError,
    SourceTooSmallError,
    decode_image,
    list_sources,
    prepare_folder,
    split_sources,
)
from study.data.store import load_split, read_manifest
from tests.conftest import SAMPLE
from tests.data.lsun_fixtures import truncated

CELEBA = sorted((SAMPLE / "img_align_celeba").glob("*.jpg"))
# Written as PNG; mixed-case suffixes check that matching ignores case. camera is grayscale (one channel).
SKIMAGE = {"astronaut": "skimage/astronaut.png", "camera": "skimage/grey/camera.PNG",
           "coffee": "skimage/coffee.Png", "chelsea": "skimage/chelsea.png"}
PATCHES = {"size": 48, "per_image": 3, "seed": 5}


def _expected_sources() -> list[str]:
    names = [f"faces/a/{p.name}" for p in CELEBA[:16]] + [f"faces/b/deeper/{p.name}" for p in CELEBA[16:]]
    return sorted([*names, *SKIMAGE.values()])


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """36 real photographs in nested folders, plus a stray .txt, a .DS_Store and a macOS ``._`` fork."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos") / "photos"
    for i, path in enumerate(CELEBA):
        dst = root / ("faces/a" if i < 16 else "faces/b/deeper") / path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
    for name, rel in SKIMAGE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()).save(root / rel, format="PNG")
    (root / "faces" / "notes.txt").write_text("not an image\n")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "faces" / "a" / "._000001.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    return root


@pytest.fixture()
def photo_copy(photo_folder, tmp_path) -> Path:
    dst = tmp_path / "photos"
    shutil.copytree(photo_folder, dst)
    return dst


def _params(tmp_path: Path, root: Path, **prepare) -> Path:
    dataset = {"kind": "folder", "root": str(root), "splits": {"val": 0.1, "test": 0.1}, "seed": 11}
    if "patches" in prepare:
        dataset["patches"] = prepare.pop("patches")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "datasets": {"photos": dataset},
        "prepare": {"resolution": 32, "output_root": str(tmp_path / "prepared"), **prepare},
        "sweep": {"dataset": "photos"},
    }))
    return path


@pytest.fixture(scope="session")
def patched(photo_folder, tmp_path_factory) -> Path:
    """The folder prepared by the stage with 3 seeded 48 x 48 patches per photograph, at 32 x 32 RGB."""
    tmp = tmp_path_factory.mktemp("patched")
    assert prepare_main(["--params", str(_params(tmp, photo_folder, patches=dict(PATCHES)))]) == 0
    return tmp / "prepared" / "photos"


def _oriented_rgb(path: Path) -> Image.Image:
    from PIL import ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def _bicubic(im: Image.Image, resolution: int) -> np.ndarray:
    return np.asarray(im.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=None))


# ------------------------------------------------------------------------------------------ sources and splits
def test_sources_are_found_recursively_by_suffix_in_any_case(photo_folder):
    assert list_sources(photo_folder) == _expected_sources()  # .txt, .DS_Store and ._ fork left out


def test_missing_or_empty_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder .*nowhere not found"):
        list_sources(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no"):
        list_sources(tmp_path / "empty")


def test_split_counts_and_limits():
    names = [f"{i:03d}.jpg" for i in range(36)]
    split = split_sources(names, 0.1, 0.1, seed=0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [28, 4, 4]  # round(3.6) = 4 each
    assert sorted(sum(split.values(), [])) == names and all(split[s] == sorted(split[s]) for s in split)
    assert split_sources(names, 0.1, 0.1, seed=1) != split  # the seed moves sources between splits
    tiny = split_sources(["a", "b", "c"], 0.1, 0.1, seed=0)  # rounds to 0: each held-out split still gets one
    assert sorted(len(v) for v in tiny.values()) == [1, 1, 1]
    with pytest.raises(ValueError, match="2 source image"):
        split_sources(["a", "b"], 0.1, 0.1, seed=0)
    with pytest.raises(ValueError, match="nothing for train"):
        split_sources(names, 0.5, 0.5, seed=0)


def test_split_is_by_source_and_the_manifest_agrees(patched, photo_folder):
    manifest = read_manifest(patched)
    sources = manifest["sources"]
    assert sorted(sum(sources.values(), [])) == _expected_sources()
    assert all(not set(sources[a]) & set(sources[b]) for a, b in (("train", "val"), ("train", "test"), ("val", "test")))
    assert {s: len(v) for s, v in sources.items()} == {"train": 28, "val": 4, "test": 4}
    for split, names in sources.items():
        assert manifest["splits"][split]["count"] == 3 * len(names) == manifest["counts"][split]
        assert list(manifest["patch_boxes"][split]) == names
        # the split's identity: sha256 over "<path>\t<sha256 of the file's bytes>" lines, computed here
        lines = "".join(f"{n}\t{hashlib.sha256((photo_folder / n).read_bytes()).hexdigest()}\n" for n in names)
        assert manifest["sources_sha256"][split] == hashlib.sha256(lines.encode()).hexdigest()
    assert manifest["skipped_count"] == 0 and manifest["patches"] == PATCHES


def test_every_patch_is_a_crop_and_resize_of_its_own_source(patched, photo_folder):
    """Patch k of a source equals Pillow's crop of the listed box resized to 32 x 32, so every crop in a split
    comes from that split's sources; the boxes follow the documented seeding, recomputed here."""
    manifest = read_manifest(patched)
    size, per_image, seed = PATCHES["size"], PATCHES["per_image"], PATCHES["seed"]
    for split, names in manifest["sources"].items():
        stored = load_split(patched, split)
        assert stored.shape == (3 * len(names), 32, 32, 3)
        for i, name in enumerate(names):
            im = _oriented_rgb(photo_folder / name)
            width, height = im.size
            digest = hashlib.sha256(name.encode("utf-8")).digest()
            rng = np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])
            boxes = [[int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))]
                     for _ in range(per_image)]
            assert manifest["patch_boxes"][split][name] == boxes
            for k, (top, left) in enumerate(boxes):
                expected = _bicubic(im.crop((left, top, left + size, top + size)), 32)
                np.testing.assert_array_equal(stored[i * per_image + k], expected, err_msg=f"{name} patch {k}")
    # the three patches of one source are different crops (positions drawn independently)
    assert len({tuple(b) for b in manifest["patch_boxes"]["train"][manifest["sources"]["train"][0]]}) == 3


def test_patches_are_reproducible_from_the_seed(photo_folder, patched):
    kwargs = dict(val_fraction=0.1, test_fraction=0.1, seed=11, patch_size=48, patches_per_image=3)
    again, info = prepare_folder(photo_folder, 32, patch_seed=5, **kwargs)
    for split in ("train", "val", "test"):  # byte-identical to the stage's run, whose files carry a sha256
        np.testing.assert_array_equal(again[split], load_split(patched, split))
    parallel, _ = prepare_folder(photo_folder, 32, patch_seed=5, workers=2, **kwargs)
    assert all(np.array_equal(parallel[s], again[s]) for s in again)
    other, other_info = prepare_folder(photo_folder, 32, patch_seed=6, **kwargs)
    assert other_info["sources"] == info["sources"]  # the patch seed moves crops, not sources
    assert other_info["patch_boxes"] != info["patch_boxes"] and not np.array_equal(other["train"], again["train"])
    _, reseeded = prepare_folder(photo_folder, 32, patch_seed=5, **{**kwargs, "seed": 12})
    assert reseeded["sources"] != info["sources"]


def test_centre_crop_without_patches(photo_folder, tmp_path):
    assert prepare_main(["--params", str(_params(tmp_path, photo_folder))]) == 0
    out = tmp_path / "prepared" / "photos"
    manifest = read_manifest(out)
    assert "patch_boxes" not in manifest and manifest["patches"] is None
    for split, names in manifest["sources"].items():
        stored = load_split(out, split)
        assert stored.shape == (len(names), 32, 32, 3)
        for i, name in enumerate(names):
            im = _oriented_rgb(photo_folder / name)
            side = min(im.size)
            left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
            np.testing.assert_array_equal(stored[i], _bicubic(im.crop((left, top, left + side, top + side)), 32))


def test_exif_orientation_is_applied(tmp_path):
    from skimage import data

    raw = data.chelsea()  # 300 x 451
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "sideways.jpg"
    Image.fromarray(raw).save(path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as im:
        stored = np.asarray(im.convert("RGB"))  # the pixels as stored, orientation not applied
    shown = decode_image(path.read_bytes(), str(path))
    assert shown.shape == (451, 300, 3)
    np.testing.assert_array_equal(shown, np.rot90(stored, k=-1))


# --------------------------------------------------------------------------------------------- corrupt input
def test_corrupt_file_is_named_or_skipped_and_counted(photo_copy, tmp_path):
    bad = "faces/b/deeper/000020.jpg"
    (photo_copy / bad).write_bytes(truncated((photo_copy / bad).read_bytes()))
    with pytest.raises(CorruptImageError, match="000020.jpg cannot be decoded") as err:
        prepare_folder(photo_copy, 32, seed=11)
    assert err.value.path == str(photo_copy / bad)
    params = _params(tmp_path, photo_copy, patches=dict(PATCHES))
    assert prepare_main(["--params", str(params)]) == 1  # the stage stops and writes nothing
    assert not (tmp_path / "prepared" / "photos").exists()
    assert prepare_main(["--params", str(params), "--skip-corrupt"]) == 0
    manifest = read_manifest(tmp_path / "prepared" / "photos")
    split = next(s for s, names in manifest["sources"].items() if bad in names)
    assert manifest["skipped_count"] == 1 and manifest["skipped"][split] == [bad]
    assert "cannot be decoded" in manifest["skipped_reasons"][bad]
    assert manifest["splits"][split]["count"] == 3 * (len(manifest["sources"][split]) - 1)
    assert bad not in manifest["patch_boxes"][split]
    # the split was drawn before decoding: every source is where the clean folder put it
    clean = split_sources(_expected_sources(), 0.1, 0.1, seed=11)
    assert manifest["sources"] == clean


def test_not_an_image_with_an_image_suffix_is_named(photo_copy):
    (photo_copy / "skimage" / "fake.png").write_text("this is text, not a PNG\n")
    with pytest.raises(CorruptImageError, match="fake.png cannot be decoded"):
        prepare_folder(photo_copy, 32, seed=11)
    _, info = prepare_folder(photo_copy, 32, seed=11, skip_corrupt=True)
    assert info["skipped_count"] == 1 and sum(info["skipped"].values(), []) == ["skimage/fake.png"]


def test_source_smaller_than_the_patch_is_named_or_skipped(tmp_path):
    from skimage import data

    root = tmp_path / "mixed"
    root.mkdir()
    for name in ("astronaut", "coffee", "camera"):  # 512 x 512, 400 x 600, 512 x 512
        Image.fromarray(getattr(data, name)()).save(root / f"{name}.png")
    shutil.copyfile(CELEBA[0], root / "face.jpg")  # 218 x 178: no 256 x 256 crop
    with pytest.raises(SourceTooSmallError, match=r"face.jpg is 218 x 178 .*256 x 256"):
        prepare_folder(root, 32, patch_size=256, patches_per_image=2)
    arrays, info = prepare_folder(root, 32, patch_size=256, patches_per_image=2, skip_corrupt=True)
    assert info["skipped_count"] == 1 and "face.jpg" in info["skipped_reasons"]
    assert sum(a.shape[0] for a in arrays.values()) == 2 * 3


# ------------------------------------------------------------------------------------------------- colour
def test_grey_and_ycbcr_storage(photo_folder, tmp_path):
    runs = {}
    for color in ("rgb", "grey", "ycbcr"):
        out = tmp_path / color
        out.mkdir()
        assert prepare_main(["--params", str(_params(out, photo_folder, color=color, patches=dict(PATCHES)))]) == 0
        runs[color] = out / "prepared" / "photos"
    rgb = load_split(runs["rgb"], "test").astype(np.float64)  # (N, 32, 32, 3)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # BT.601 (JPEG) luma
    grey = load_split(runs["grey"], "test")
    assert grey.shape == (*rgb.shape[:3], 1)
    assert np.abs(grey[..., 0].astype(np.float64) - luma).max() <= 0.5 + 1e-9  # rounded to the nearest level
    manifest = read_manifest(runs["ycbcr"])
    assert manifest["color"] == "ycbcr" and manifest["sources"] == read_manifest(runs["rgb"])["sources"]
    np.testing.assert_array_equal(load_split(runs["ycbcr"], "test_rgb"), rgb.astype(np.uint8))
    # BT.601 full range as study.data.color documents it on [0, 1] (offset 0.5), times 255: offset 127.5
    cb = 127.5 - 0.168736 * rgb[..., 0] - 0.331264 * rgb[..., 1] + 0.5 * rgb[..., 2]
    cr = 127.5 + 0.5 * rgb[..., 0] - 0.418688 * rgb[..., 1] - 0.081312 * rgb[..., 2]
    n = rgb.shape[0]
    blocks = np.stack([cb, cr], -1).reshape(n, 8, 4, 8, 4, 2).mean(axis=(2, 4))  # 4 x 4 area means
    chroma = load_split(runs["ycbcr"], "test_chroma")
    assert chroma.shape == (n, 8, 8, 2)
    assert np.abs(chroma.astype(np.float64) - blocks).max() <= 0.5 + 1e-6


# ------------------------------------------------------------------------------------------------- config
def test_folder_config_validation(tmp_path):
    def params(dataset, resolution=32):
        return {"datasets": {"photos": {"kind": "folder", "root": str(tmp_path), **dataset}},
                "prepare": {"resolution": resolution}, "sweep": {"dataset": "photos"}}

    parsed = parse_params(params({"patches": {"size": 64, "per_image": 4}}))
    dataset = parsed.datasets["photos"]
    assert isinstance(dataset, FolderDatasetConfig) and dataset.patches.size == 64 and dataset.splits.val == 0.1
    with pytest.raises(ConfigError, match="patches.size 48 is smaller than prepare.resolution 64"):
        parse_params(params({"patches": {"size": 48}}, resolution=64))
    with pytest.raises(ConfigError, match="leaves no source images for train"):
        parse_params(params({"splits": {"val": 0.5, "test": 0.5}}))
    with pytest.raises(ConfigError, match="datasets.photos.folder.patches.sise"):
        parse_params(params({"patches": {"size": 64, "sise": 3}}))
    with pytest.raises(ValueError, match="smaller than the resolution"):
        prepare_folder(tmp_path, 32, patch_size=16)
    assert json.loads(dataset.model_dump_json())["kind"] == "folder"
