"""Prepared-data store: manifest hashes, atomic replacement, refusal of tampered arrays."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from study.atomic import atomic_write_text
from study.data.loader import DeviceSplit
from study.data.store import DataIntegrityError, load_split, read_manifest, write_prepared


def _arrays(seed=0, n=5):
    rng = np.random.default_rng(seed)
    return {s: rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for s in ("train", "val", "test")}


def test_manifest_records_counts_shapes_and_file_hashes(tmp_path):
    arrays = _arrays()
    out = tmp_path / "prep"
    write_prepared(out, arrays, {"source": "unit-test"})
    manifest = read_manifest(out)
    assert manifest["source"] == "unit-test"
    for split, arr in arrays.items():
        entry = manifest["splits"][split]
        assert entry["count"] == 5 and entry["shape"] == [5, 8, 8, 3] and entry["dtype"] == "uint8"
        assert entry["sha256"] == hashlib.sha256((out / f"{split}.npy").read_bytes()).hexdigest()
        np.testing.assert_array_equal(load_split(out, split), arr)


def test_failed_write_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "prep"
    write_prepared(out, _arrays(0), {"version": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    bad = _arrays(1)
    bad["test"] = bad["test"].astype(np.float32)  # rejected after train and val were written
    with pytest.raises(ValueError, match="uint8"):
        write_prepared(out, bad, {"version": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["prep"]  # no temporary leftovers


def test_interrupted_write_leaves_nothing_when_there_was_nothing(tmp_path, monkeypatch):
    import study.data.store as store

    calls = {"n": 0}
    real_save = np.save

    def flaky_save(path, arr, allow_pickle=False):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what a Ctrl-C mid-write raises
        real_save(path, arr, allow_pickle=allow_pickle)

    monkeypatch.setattr(store.np, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        write_prepared(tmp_path / "prep", _arrays(), {})
    assert list(tmp_path.iterdir()) == []


def test_tampered_array_is_refused(tmp_path):
    out = tmp_path / "prep"
    write_prepared(out, _arrays(), {})
    arr = np.load(out / "train.npy")
    arr[0, 0, 0, 0] ^= 1
    np.save(out / "train.npy", arr)
    with pytest.raises(DataIntegrityError, match="train.npy.*does not match the manifest"):
        load_split(out, "train")
    with pytest.raises(DataIntegrityError):
        DeviceSplit(out, "train", torch.device("cpu"))
    load_split(out, "val")  # untouched splits still load


def test_missing_manifest_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        load_split(tmp_path, "train")


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "b.json"
    atomic_write_text(path, json.dumps({"x": 1}))
    atomic_write_text(path, json.dumps({"x": 2}))
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def test_device_split_batches_cover_split_and_flip(tmp_path):
    arrays = _arrays(n=10)
    write_prepared(tmp_path / "p", arrays, {})
    split = DeviceSplit(tmp_path / "p", "train", torch.device("cpu"))
    assert split.image_shape == (3, 8, 8)
    batches = list(split.batches(4))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    expected = torch.from_numpy(arrays["train"]).permute(0, 3, 1, 2).double() / 255
    torch.testing.assert_close(torch.cat(batches).double(), expected)
    g = torch.Generator().manual_seed(0)
    flipped = torch.cat(list(split.batches(10, hflip=True, generator=g)))
    for img, ref in zip(flipped.double(), expected):
        assert torch.allclose(img, ref) or torch.allclose(img, ref.flip(-1))
    assert not torch.allclose(flipped.double(), expected)  # with 10 images, some were flipped


def test_ycbcr_split_loads_as_one_tensor_with_block_chroma(tmp_path):
    rng = np.random.default_rng(1)
    luma = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    chroma = rng.integers(0, 256, (3, 2, 2, 2), dtype=np.uint8)
    write_prepared(tmp_path / "p", {"train": luma, "train_chroma": chroma}, {"color": "ycbcr", "chroma_factor": 4})
    split = DeviceSplit(tmp_path / "p", "train", torch.device("cpu"))
    assert split.color == "ycbcr" and split.image_shape == (3, 8, 8)
    images = split.images.numpy()
    np.testing.assert_array_equal(images[:, 0], luma[..., 0])
    np.testing.assert_array_equal(images[:, 1:, ::4, ::4], chroma.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(images[:, 1:, 3::4, 1::4], chroma.transpose(0, 3, 1, 2))


def test_atomic_directory_takes_the_umask_without_setting_it(tmp_path, monkeypatch):
    """The written directory has the mode of any new directory (0777 less the umask), and the process umask is
    never set to read it (a set-and-restore races with Ray's and MLflow's threads creating files)."""
    import os
    import stat
    import subprocess
    import sys

    from study.atomic import atomic_directory

    umask = int(subprocess.run([sys.executable, "-c", "import os; print(os.umask(0))"], capture_output=True,
                               text=True).stdout)  # a child's umask is this process's, read without touching ours
    calls = []
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0)
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
    assert not calls
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
