"""LSUN church_outdoor (the official LMDB release) -> square images, with a seeded train / val split.

Source format (``fyu/lsun``, ``download.py`` and ``data.py``; read the same way by
``torchvision.datasets.LSUN``): one LMDB per category and split, e.g. ``church_outdoor_train_lmdb/`` (126,227
images) and ``church_outdoor_val_lmdb/`` (300 images), each a folder holding ``data.mdb`` and ``lock.mdb``
(unpacked from ``church_outdoor_{train,val}_lmdb.zip``). In the single unnamed database of each LMDB:

- key: the image id, 40 lowercase hexadecimal characters as ASCII bytes (e.g. ``b"0a1b...e9f0"``);
- value: the image's JPEG bytes, resized so the short side is 256 pixels, quality 75.

LMDB keeps keys in bytewise order, so "LMDB order" below is ``sorted(keys)``.

Preparation, per image (Dorta et al. 2018 do not state their LSUN crop and resize; this is the usual
centre crop of DCGAN-style LSUN pipelines, with the filter pinned down):

1. decode the JPEG with Pillow (fully, so a truncated file fails) and convert to RGB; EXIF orientation is
   ignored, as in ``torchvision.datasets.LSUN``; a JPEG that libjpeg decodes only with a warning ("Corrupt JPEG
   data: ...", :func:`study.data.integrity.jpeg_warning`) is corrupt;
2. :data:`CROP_DESCRIPTION`: the largest centred square;
3. :data:`RESIZE_DESCRIPTION`: Pillow's antialiased bicubic resize to R x R, uint8 in, uint8 out.

Splits: ``train`` and ``val`` both come from the train LMDB (a seeded held-out fraction, see
:func:`split_train_keys`); ``test`` is the whole official val LMDB, as Dorta et al. use LSUN's validation set as
their test set (LSUN's own test set is one unlabelled 10,000-image LMDB across all categories).

Checksums (optional, ``datasets.<name>.checksums``): a ``sha256sum`` / ``md5sum`` list of the LMDBs' ``data.mdb``
files, checked whole before they are opened. ``lock.mdb`` is not data and is left out: LMDB rewrites it.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from study.data.integrity import ChecksumError, jpeg_warning, read_checksums

SHORT_SIDE = 256  # short side of every image in the official LMDBs
JPEG_QUALITY = 75  # quality of the official JPEG values
KEY_LENGTH = 40  # hex characters in an image id
OFFICIAL_COUNTS = {"church_outdoor_train_lmdb": 126_227, "church_outdoor_val_lmdb": 300}
DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB of address space for written LMDBs; the file only grows as data is put

CROP_DESCRIPTION = (
    "centre crop to a square of side s = min(H, W): rows (H - s) // 2 to (H - s) // 2 + s - 1 and columns "
    "(W - s) // 2 to (W - s) // 2 + s - 1 (an image 256 high and 341 wide keeps rows 0-255 and columns 42-297)"
)
RESIZE_DESCRIPTION = (
    "Pillow Image.resize((R, R), Image.Resampling.BICUBIC, reducing_gap=None) of the square crop: separable "
    "cubic convolution (Keys, a = -0.5) sampled at pixel centres, input x = (i + 0.5) * s / R - 0.5; when "
    "shrinking, the kernel is stretched by the factor s / R (support 2 * s / R input pixels each side, i.e. "
    "+-8 pixels for 256 -> 64), taps outside the image dropped and the weights normalised to sum to 1, so it "
    "also low-passes against aliasing; horizontal pass first, each pass rounded and clipped to uint8"
)


class CorruptRecordError(ValueError):
    """An LMDB value cannot be decoded as an image (not a JPEG, or truncated).

    Attributes:
        key: the record's key (bytes), or None.
        path: the LMDB folder, or None.
    """

    def __init__(self, message: str, key: bytes | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.path = path

    def __reduce__(self):  # keep key and path when the error crosses a process-pool boundary
        return (type(self), (self.args[0], self.key, self.path))


def key_text(key: bytes) -> str:
    """A key for messages and manifests: its ASCII text if printable (every official key is), else ``0x<hex>``."""
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        return "0x" + key.hex()
    return text if text.isprintable() else "0x" + key.hex()


def open_lmdb(path: str | Path) -> lmdb.Environment:
    """Open an LSUN LMDB folder read-only.

    Opened without the lock file (``lock=False``: nothing writes to a release LMDB, and a read-only mount works),
    without OS readahead (records are read one by one, not sequentially in file order) and with room for many
    readers, so each decoding process can open its own handle.

    Args:
        path: the LMDB folder, e.g. ``.../church_outdoor_val_lmdb`` (holding ``data.mdb`` and ``lock.mdb``).

    Returns:
        An open ``lmdb.Environment``; close it (or use it as a context manager) when done. py-lmdb refuses to open
        a folder that is already open in the same process, so close a handle before opening the folder again
        (every reader here opens, reads and closes; :func:`read_records` and :func:`iter_records` hold their
        handle until they are exhausted or closed).

    Raises:
        FileNotFoundError: the folder or its ``data.mdb`` is missing; the message names the folder and says what to
            put there.
    """
    path = Path(path)
    if not (path / "data.mdb").is_file():
        name = path.name or "church_outdoor_val_lmdb"
        zipped = path.parent / (path.name + ".zip")
        hint = f" ({zipped} is there: unzip it first)" if path.name and zipped.is_file() else ""
        what = "has no data.mdb" if path.is_dir() else "not found"
        raise FileNotFoundError(
            f"LSUN LMDB folder {path} {what}{hint}: put {name}/ (data.mdb, lock.mdb) from the LSUN release "
            f"(`python download.py -c church_outdoor` in github.com/fyu/lsun, then unzip) in {path.parent}, "
            "or set datasets.<name>.root in params.yaml to the folder that holds it"
        )
    return lmdb.open(
        str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=1024, subdir=True
    )


def list_keys(path: str | Path) -> list[bytes]:
    """All keys of an LSUN LMDB, in LMDB (bytewise sorted) order.

    Raises:
        FileNotFoundError: see :func:`open_lmdb`.
    """
    with open_lmdb(path) as env, env.begin(write=False) as txn:
        return list(txn.cursor().iternext(keys=True, values=False))


def read_records(path: str | Path, keys: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(key, value)`` for each of ``keys``, in the given order, from one read transaction.

    Values are the raw JPEG bytes (copied out of the memory map).

    Raises:
        FileNotFoundError: see :func:`open_lmdb`.
        KeyError: a key is not in the LMDB (named in the message).
    """
    with open_lmdb(path) as env, env.begin(write=False) as txn:
        for key in keys:
            value = txn.get(key)
            if value is None:
                raise KeyError(f"LSUN LMDB {path} has no record {key_text(key)}")
            yield key, value


def iter_records(path: str | Path) -> Iterator[tuple[bytes, bytes]]:
    """Yield every ``(key, value)`` of an LSUN LMDB in LMDB (sorted) order.

    Raises:
        FileNotFoundError: see :func:`open_lmdb`.
    """
    with open_lmdb(path) as env, env.begin(write=False) as txn:
        yield from txn.cursor().iternext(keys=True, values=True)


def decode_record(key: bytes, value: bytes, path: str | Path | None = None) -> np.ndarray:
    """Decode one LMDB value (JPEG bytes) to uint8 (H, W, 3) RGB, 0..255.

    The whole image is decoded (``Image.load``), so a truncated JPEG fails here. This relies on Pillow's default
    ``ImageFile.LOAD_TRUNCATED_IMAGES = False``; with it set, truncated files decode silently, padded with grey.
    Corrupted entropy-coded data that libjpeg only warns about, which Pillow ignores, are found by decoding the
    JPEG once more with warnings as errors (:func:`study.data.integrity.jpeg_warning`); the pixels are Pillow's.

    Args:
        key: the record's key, for the error message.
        value: the record's bytes.
        path: the LMDB folder, for the error message.

    Raises:
        CorruptRecordError: the bytes are not a decodable image, or a JPEG that libjpeg decodes only with a
            warning; the message names the key and the LMDB.
    """
    where = f" in {path}" if path is not None else ""
    try:
        with Image.open(io.BytesIO(value)) as im:
            im.load()
            is_jpeg = im.format == "JPEG"
            img = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptRecordError(
            f"LSUN record {key_text(key)}{where} cannot be decoded ({err}); re-download the LMDB, or pass "
            "skip_corrupt=True to leave such records out (they are listed in the manifest)",
            key=key,
            path=None if path is None else str(path),
        ) from None
    warning = jpeg_warning(value) if is_jpeg else None
    if warning is not None:
        raise CorruptRecordError(
            f"LSUN record {key_text(key)}{where} decodes only with libjpeg's warning '{warning}': its compressed "
            "data are damaged; re-download the LMDB, or pass skip_corrupt=True to leave such records out",
            key=key,
            path=None if path is None else str(path),
        )
    return img


def crop_box(height: int, width: int) -> tuple[int, int, int]:
    """The centred square of an H x W image as ``(top, left, side)``, side = min(H, W), in pixels.

    ``img[top:top + side, left:left + side]`` is the crop; Pillow's box is ``(left, top, left + side, top + side)``.
    """
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def centre_crop_resize(img: np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop to a square, then resize to R x R.

    Crop: :data:`CROP_DESCRIPTION`. Resize: :data:`RESIZE_DESCRIPTION`. The crop is taken first, so the resize
    kernel never reaches pixels outside the square (Pillow's ``resize(box=...)`` would). Images smaller than R
    are enlarged with the same (then unstretched) bicubic kernel.

    Args:
        img: uint8 (H, W, 3), 0..255.
        resolution: R, output side in pixels.

    Returns:
        uint8 (R, R, 3), 0..255.

    Raises:
        ValueError: ``img`` is not uint8 (H, W, 3), or R < 1.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    top, left, side = crop_box(img.shape[0], img.shape[1])
    square = Image.fromarray(np.ascontiguousarray(img[top : top + side, left : left + side]), mode="RGB")
    small = square.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(small, dtype=np.uint8)


def split_train_keys(keys: Sequence[bytes], val_fraction: float, seed: int) -> tuple[list[bytes], list[bytes]]:
    """Hold out a seeded validation subset of the train LMDB's keys.

    The keys are permuted with ``np.random.default_rng(seed).permutation(N)``; the first
    n_val = ``round(val_fraction * N)`` of the permutation go to val (at least 1 if N > 1 and val_fraction > 0,
    at most N - 1 so train is never empty), the rest to train. Both lists keep the input (LMDB) order. The
    assignment depends only on the key list, the fraction and the seed, not on which records decode.

    Args:
        keys: the train LMDB's keys, in LMDB order (:func:`list_keys`).
        val_fraction: in [0, 1).
        seed: the numpy seed.

    Returns:
        (train_keys, val_keys), disjoint, together all of ``keys``.

    Raises:
        ValueError: val_fraction outside [0, 1), or a key listed twice.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(keys)
    if len(set(keys)) != n:
        raise ValueError("the key list has duplicates")
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    held_out = np.zeros(n, dtype=bool)
    held_out[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return [k for k, v in zip(keys, held_out, strict=True) if not v], [
        k for k, v in zip(keys, held_out, strict=True) if v
    ]


def _prepare_chunk(job: tuple[str, list[bytes], int, bool]) -> tuple[np.ndarray, list[bytes]]:
    # Runs in a worker process: it opens the LMDB itself (an lmdb handle must not cross a fork or a pickle).
    path, keys, resolution, skip_corrupt = job
    out = np.empty((len(keys), resolution, resolution, 3), dtype=np.uint8)
    kept, skipped = 0, []
    for key, value in read_records(path, keys):
        try:
            img = decode_record(key, value, path)
        except CorruptRecordError:
            if not skip_corrupt:
                raise
            skipped.append(key)
            continue
        out[kept] = centre_crop_resize(img, resolution)
        kept += 1
    return out[:kept], skipped


def prepare_records(
    path: str | Path,
    keys: Sequence[bytes],
    resolution: int,
    workers: int = 1,
    skip_corrupt: bool = False,
    desc: str = "lsun",
) -> tuple[np.ndarray, list[bytes]]:
    """Decode, crop and resize ``keys`` of one LMDB into uint8 (N, R, R, 3), in the given order.

    Keys go to ``workers`` processes in chunks (each process opens the LMDB itself); results are reassembled in
    key order, so the output does not depend on ``workers``. A tqdm bar counts images ("img/s").

    Returns:
        (images, skipped): images uint8 (N - len(skipped), R, R, 3); skipped, the corrupt keys left out (always
        empty unless ``skip_corrupt``), in key order.

    Raises:
        FileNotFoundError: see :func:`open_lmdb`.
        KeyError: a key is not in the LMDB.
        CorruptRecordError: without ``skip_corrupt``, the first undecodable record in key order, by key.
    """
    keys = list(keys)
    # ~16 chunks per worker balance the load; 256 images per chunk bounds what one task holds and returns.
    chunk = max(1, min(256, math.ceil(len(keys) / (max(workers, 1) * 16))))
    jobs = [(str(path), keys[i : i + chunk], resolution, skip_corrupt) for i in range(0, len(keys), chunk)]
    # Filled in place rather than concatenated, so the full train split (1.5 GB at 64 x 64) is held once.
    out = np.empty((len(keys), resolution, resolution, 3), dtype=np.uint8)
    filled = 0
    skipped: list[bytes] = []
    bar = tqdm(total=len(keys), desc=desc, unit="img", disable=None)

    def collect(result: tuple[np.ndarray, list[bytes]], job_keys: list[bytes]) -> None:
        nonlocal filled
        out[filled : filled + len(result[0])] = result[0]
        filled += len(result[0])
        skipped.extend(result[1])
        bar.update(len(job_keys))

    try:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                try:
                    for job, result in zip(jobs, pool.map(_prepare_chunk, jobs), strict=True):
                        collect(result, job[1])
                except BaseException:
                    # Fail fast: without this the pool's exit would first decode every queued chunk.
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        else:
            for job in jobs:
                collect(_prepare_chunk(job), job[1])
    finally:
        bar.close()
    return (out if filled == len(keys) else out[:filled].copy()), skipped


def prepare_lsun(
    train_lmdb: str | Path,
    test_lmdb: str | Path,
    resolution: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int = 1,
    skip_corrupt: bool = False,
    checksums: str | Path | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The LSUN ``prepare`` stage's work: split -> uint8 (N, R, R, 3) plus manifest fields.

    Args:
        train_lmdb: ``church_outdoor_train_lmdb/`` (126,227 records): split into ``train`` and ``val`` by
            :func:`split_train_keys`.
        test_lmdb: ``church_outdoor_val_lmdb/`` (300 records): all of it becomes ``test``, in LMDB order.
        resolution: R, output side in pixels.
        val_fraction: fraction of the train LMDB held out as ``val``, in [0, 1).
        seed: seed of the held-out permutation.
        workers: decoding processes.
        skip_corrupt: leave undecodable records out (listed in the info dict) instead of raising.
        checksums: a ``sha256sum`` / ``md5sum`` list that names both LMDBs' ``data.mdb``; both are hashed and
            compared before either is opened (a mismatch always stops: a whole LMDB cannot be skipped).

    Returns:
        (arrays, info). arrays: ``{"train", "val", "test"}`` -> uint8 (N, R, R, 3), 0..255, each in LMDB key order.
        info (JSON-serialisable, for :func:`study.data.store.write_prepared`): ``dataset``, ``source`` (both LMDB
        paths), ``resolution``, ``crop`` and ``resize`` (the method in words), ``val_fraction``, ``seed``,
        ``lmdb_records`` (records per LMDB), ``counts`` (images per split, after skipping), ``val_keys_sha256``
        (sha256 of the sorted held-out keys joined by newlines: the split's identity), ``skip_corrupt``,
        ``skipped`` (split -> list of skipped keys as text), ``skipped_count`` (split -> int) and ``checksums``
        (list file, algorithm and files verified; None without a list).

    Raises:
        FileNotFoundError: an LMDB folder is missing (named, with what to put there), or the checksum list.
        ChecksumError: a malformed list, a listed file missing, a ``data.mdb`` not listed or differing from its
            digest, or ``lock.mdb`` listed.
        CorruptRecordError: without ``skip_corrupt``, the first undecodable record, by key and LMDB.
        ValueError: val_fraction outside [0, 1).
    """
    listing = read_checksums(checksums) if checksums is not None else None
    if listing is not None:
        locks = [str(f) for f in listing.digests if f.name == "lock.mdb"]
        if locks:
            raise ChecksumError(f"{listing.path} lists {locks[0]}: LMDB rewrites lock.mdb, list only data.mdb")
        data_files = [Path(train_lmdb) / "data.mdb", Path(test_lmdb) / "data.mdb"]
        for file in data_files:
            listing.require(file)
        listing.check_present()
        for file in data_files:
            listing.verify_file(file)
    keys = list_keys(train_lmdb)
    test_keys = list_keys(test_lmdb)
    train_keys, val_keys = split_train_keys(keys, val_fraction, seed)
    plan = {"train": (train_lmdb, train_keys), "val": (train_lmdb, val_keys), "test": (test_lmdb, test_keys)}
    arrays: dict[str, np.ndarray] = {}
    skipped: dict[str, list[str]] = {}
    for split, (path, split_keys) in plan.items():
        arrays[split], bad = prepare_records(path, split_keys, resolution, workers, skip_corrupt, f"lsun {split}")
        skipped[split] = [key_text(k) for k in bad]
    info: dict[str, Any] = {
        "dataset": "lsun_church_outdoor",
        "source": {"train_lmdb": str(train_lmdb), "test_lmdb": str(test_lmdb)},
        "resolution": resolution,
        "crop": CROP_DESCRIPTION,
        "resize": RESIZE_DESCRIPTION,
        "val_fraction": val_fraction,
        "seed": seed,
        "lmdb_records": {"train_lmdb": len(keys), "test_lmdb": len(test_keys)},
        "counts": {split: int(arr.shape[0]) for split, arr in arrays.items()},
        "val_keys_sha256": hashlib.sha256(b"\n".join(sorted(val_keys))).hexdigest(),
        "skip_corrupt": skip_corrupt,
        "skipped": skipped,
        "skipped_count": {split: len(bad) for split, bad in skipped.items()},
        "checksums": None if listing is None else {
            "file": str(listing.path), "algorithm": listing.algorithm, "verified": 2},
    }
    return arrays, info


def encode_lsun_jpeg(img: np.ndarray | Image.Image, short_side: int = SHORT_SIDE, quality: int = JPEG_QUALITY) -> bytes:
    """Encode an image as an official-format LSUN value: RGB JPEG, short side ``short_side``, quality 75.

    The image is resized (Pillow bicubic, aspect ratio kept, long side rounded to the nearest pixel) only if its
    short side differs from ``short_side``. LSUN's own resize filter is not documented; this is for building test
    sets, not for reproducing the release byte for byte.

    Args:
        img: uint8 (H, W, 3) or a PIL image.

    Returns:
        JPEG bytes.
    """
    im = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))
    im = im.convert("RGB")
    w, h = im.size
    if min(w, h) != short_side:
        scale = short_side / min(w, h)
        size = (short_side, round(h * scale)) if w <= h else (round(w * scale), short_side)
        im = im.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_lsun_lmdb(path: str | Path, items: Iterable[tuple[bytes, bytes]], map_size: int = DEFAULT_MAP_SIZE) -> int:
    """Write an LMDB in the official LSUN layout: a folder with ``data.mdb`` and ``lock.mdb``, one unnamed
    database, key = 40-hex image id (ASCII bytes), value = image bytes (JPEG, see :func:`encode_lsun_jpeg`).

    A tool for building small test sets (the tests build them from real photographs). Values are stored as
    given, so corrupt records can be written on purpose.

    Args:
        path: the folder to create (must not already hold an LMDB).
        items: ``(key, value)`` pairs, in any order (LMDB sorts the keys).
        map_size: the LMDB's maximum size in bytes (address space; the file grows only as data is written).

    Returns:
        The number of records written.

    Raises:
        ValueError: a key that is not 40 lowercase hex ASCII characters, a value that is not bytes, a key given
            twice, or ``path`` already holding an LMDB.
    """
    path = Path(path)
    if (path / "data.mdb").exists():
        raise ValueError(f"{path} already holds an LMDB; write to a new folder")
    path.mkdir(parents=True, exist_ok=True)
    count = 0
    with lmdb.open(str(path), map_size=map_size, subdir=True) as env, env.begin(write=True) as txn:
        for key, value in items:
            if not (isinstance(key, bytes) and len(key) == KEY_LENGTH and all(c in b"0123456789abcdef" for c in key)):
                raise ValueError(f"LSUN keys are {KEY_LENGTH} lowercase hex characters as bytes, got {key!r}")
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"record {key_text(key)}: value must be bytes, got {type(value).__name__}")
            if not txn.put(key, bytes(value), overwrite=False):
                raise ValueError(f"key {key_text(key)} given twice")
            count += 1
    return count
