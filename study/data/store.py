"""Prepared data on disk: one uint8 array (N, H, W, 3) per split as ``<split>.npy`` plus ``manifest.json``.

The manifest records, per split, the count, shape, dtype and the sha256 of the ``.npy`` file's bytes (so
``sha256sum data/prepared/celeba/train.npy`` checks it by hand), and the stage's source and parameters. The
whole directory is written atomically (:func:`study.atomic.atomic_directory`), and :func:`load_split` refuses
an array whose hash no longer matches its manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from study.atomic import atomic_directory

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


class DataIntegrityError(RuntimeError):
    """A prepared array is missing, or its bytes do not match the sha256 in its manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_prepared(output: str | Path, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> dict[str, Any]:
    """Atomically write ``arrays`` (split -> uint8 (N, H, W, C)) and their manifest to ``output``.

    Args:
        output: target directory; replaced whole, never left half-written.
        arrays: one uint8 array per split, (N, H, W, C).
        info: extra manifest fields (source path, stage parameters, ...), JSON-serialisable.

    Returns:
        The manifest that was written.

    Raises:
        ValueError: an array is not uint8 with 4 dimensions.
    """
    manifest: dict[str, Any] = {**info, "splits": {}}
    with atomic_directory(output) as tmp:
        for split, arr in arrays.items():
            if arr.dtype != np.uint8 or arr.ndim != 4:
                raise ValueError(f"split {split!r}: expected uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")
            path = tmp / f"{split}.npy"
            np.save(path, arr, allow_pickle=False)
            manifest["splits"][split] = {
                "file": path.name,
                "count": int(arr.shape[0]),
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "sha256": sha256_file(path),
            }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory.

    Raises:
        FileNotFoundError: no manifest (the ``prepare`` stage has not run: ``uv run dvc repro prepare``).
    """
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: prepare the data first (`uv run dvc repro prepare`) or fix the data path"
        )
    return json.loads(path.read_text())


def data_fingerprint(data_dir: str | Path) -> str:
    """One sha256 over the per-split hashes of a prepared directory: the data's identity for lineage tags."""
    splits = read_manifest(data_dir)["splits"]
    joined = ",".join(f"{k}:{splits[k]['sha256']}" for k in sorted(splits))
    return hashlib.sha256(joined.encode()).hexdigest()


def load_split(data_dir: str | Path, split: str, verify: bool = True) -> np.ndarray:
    """Load one prepared split, uint8 (N, H, W, C), after checking its sha256 against the manifest.

    Raises:
        FileNotFoundError: no manifest.
        KeyError: the manifest has no such split.
        DataIntegrityError: the file is missing or its bytes changed since ``prepare`` wrote it.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise KeyError(f"{data_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
    entry = manifest["splits"][split]
    path = data_dir / entry["file"]
    if not path.is_file():
        raise DataIntegrityError(f"{path} is listed in the manifest but missing; re-run `uv run dvc repro`")
    if verify:
        _check_digest(path, entry["sha256"])
    arr = np.load(path, allow_pickle=False)
    if list(arr.shape) != entry["shape"] or str(arr.dtype) != entry["dtype"]:
        raise DataIntegrityError(f"{path}: shape/dtype {arr.shape}/{arr.dtype} differ from the manifest")
    return arr


def verify_prepared(data_dir: str | Path) -> dict[str, Any]:
    """Check every array of a prepared directory against its manifest (presence, sha256) without loading it.

    The sweep's driver calls this before it starts Ray, so a modified or truncated array fails the sweep at once
    with the file named, instead of failing every trial on its worker.

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: no manifest.
        DataIntegrityError: an array is missing or its bytes differ from the manifest's sha256.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    for split, entry in manifest["splits"].items():
        path = data_dir / entry["file"]
        if not path.is_file():
            raise DataIntegrityError(f"{path} is listed in the manifest but missing; re-run `uv run dvc repro`")
        _check_digest(path, entry["sha256"])
    return manifest


def _check_digest(path: Path, expected: str) -> None:
    digest = sha256_file(path)
    if digest != expected:
        raise DataIntegrityError(
            f"{path}: sha256 {digest[:12]}... does not match the manifest ({expected[:12]}...); "
            "the prepared data was modified. Re-create it with `uv run dvc repro --force prepare`."
        )
