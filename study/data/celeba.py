"""CelebA (aligned and cropped release) -> square images, as Larsen et al. 2016 prepare it.

Each ``img_align_celeba/*.jpg`` is 178 wide x 218 high. Larsen's VAE-GAN code (``andersbll/autoencoding_beyond
_pixels``, ``dataset/celeba.py``), which Dorta et al. 2018 evaluate against, does:

1. crop ``img[40:188, 15:163]`` (a 148 x 148 box, rows 40..187 and columns 15..162);
2. Gaussian pre-blur with sigma = sqrt(148 / R) / 2 (0.760 for R = 64) against aliasing;
3. bicubic (order-3 spline) resize to R x R (``skimage.transform.resize(order=3)``; the explicit pre-blur
   replaces skimage's own anti-aliasing, which that code predates, so it is off here);
4. round to uint8.

Splits come from ``list_eval_partition.txt`` (``<file> <split>``, 0 = train, 1 = val, 2 = test; the official
file gives 162,770 / 19,867 / 19,962).

Integrity (``study.data.integrity``): with a checksum list, each image's bytes are checked against it before they
are decoded (and the partition file before it is parsed, when listed); a JPEG that Pillow decodes but libjpeg
warns about ("Corrupt JPEG data: ...") counts as corrupt. Pixels are Pillow's decode either way.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage.filters import gaussian
from skimage.transform import resize
from tqdm import tqdm

from study.data.integrity import ChecksumList, digest_bytes, jpeg_warning, mismatch_message, read_checksums

ALIGNED_SHAPE = (218, 178)  # (H, W) of every image in img_align_celeba
CROP_ROWS = (40, 188)
CROP_COLS = (15, 163)
CROP_SIZE = 148
SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}


class CorruptImageError(ValueError):
    """An image file cannot be decoded, decodes with libjpeg warnings, differs from its checksum, or does not
    have the aligned CelebA shape."""

# (algorithm, hex digest, checksum list) an image's bytes must match, or None when no list is used
Expected = tuple[str, str, str] | None


def read_partition(path: str | Path) -> dict[str, list[str]]:
    """Parse ``list_eval_partition.txt`` into split -> file names, in file order.

    Raises:
        FileNotFoundError: the file does not exist (the message says where CelebA ships it).
        ValueError: a malformed line (the message gives its number and text), or a file listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CelebA partition file {path} not found: copy list_eval_partition.txt from the CelebA release "
            "(Eval/list_eval_partition.txt) there, or set datasets.<name>.partition_file in params.yaml"
        )
    splits: dict[str, list[str]] = {name: [] for name in SPLIT_CODES.values()}
    seen: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in SPLIT_CODES:
            raise ValueError(f"{path}:{number}: expected '<file> <0|1|2>', got {line!r}")
        if parts[0] in seen:
            raise ValueError(f"{path}:{number}: {parts[0]} is listed twice")
        seen.add(parts[0])
        splits[SPLIT_CODES[parts[1]]].append(parts[0])
    return splits


def larsen_crop(img: np.ndarray) -> np.ndarray:
    """The 148 x 148 face box of an aligned CelebA image.

    Args:
        img: uint8 or float (218, 178, C), an ``img_align_celeba`` image.

    Returns:
        A view (148, 148, C): rows 40..187, columns 15..162.

    Raises:
        CorruptImageError: the image is not 218 x 178.
    """
    if img.shape[:2] != ALIGNED_SHAPE:
        raise CorruptImageError(f"expected an aligned CelebA image of {ALIGNED_SHAPE} (H, W), got {img.shape[:2]}")
    return img[CROP_ROWS[0] : CROP_ROWS[1], CROP_COLS[0] : CROP_COLS[1]]


def preblur_sigma(resolution: int) -> float:
    """Larsen's anti-aliasing sigma, sqrt(148 / R) / 2, in input pixels (0.760 for R = 64)."""
    return math.sqrt(CROP_SIZE / resolution) / 2.0


def preprocess(img: np.ndarray, resolution: int) -> np.ndarray:
    """Crop, pre-blur and bicubic-resize one aligned image.

    Args:
        img: uint8 (218, 178, 3).
        resolution: R, output side in pixels.

    Returns:
        uint8 (R, R, 3).
    """
    face = larsen_crop(img).astype(np.float64) / 255.0  # (148, 148, 3) in [0, 1]
    face = gaussian(face, sigma=preblur_sigma(resolution), channel_axis=-1, preserve_range=True)
    small = resize(face, (resolution, resolution, 3), order=3, anti_aliasing=False, preserve_range=True)
    return np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)  # (R, R, 3)


def load_image(path: str | Path, expected: Expected = None) -> np.ndarray:
    """Decode one image file (a JPEG in CelebA) to uint8 (H, W, 3) with Pillow, after checking its bytes.

    Args:
        path: the image file.
        expected: ``(algorithm, hex digest, checksum list)`` the file's bytes must match, or None.

    Raises:
        FileNotFoundError: the file is missing (named in the message).
        CorruptImageError: named in the message: the bytes differ from ``expected``; the file cannot be decoded
            (truncated or not an image); or it is a JPEG that libjpeg decodes only with a warning (damaged
            entropy-coded data, see :func:`study.data.integrity.jpeg_warning`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is listed in the partition file but missing: restore it from the CelebA release "
            "or remove its line from the partition file"
        )
    data = path.read_bytes()  # read once: the bytes hashed are the bytes decoded
    if expected is not None:
        algorithm, digest, listing = expected
        actual = digest_bytes(data, algorithm)
        if actual != digest:
            raise CorruptImageError(mismatch_message(path, algorithm, digest, actual, listing))
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes fully, so a truncated JPEG fails here rather than later
            is_jpeg = im.format == "JPEG"
            img = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CorruptImageError(f"{path} cannot be decoded ({err}); replace the file from the release") from None
    warning = jpeg_warning(data) if is_jpeg else None
    if warning is not None:
        raise CorruptImageError(
            f"{path} decodes only with libjpeg's warning '{warning}': its compressed data are damaged and its "
            "pixels would be wrong; replace the file from the release"
        )
    return img


def _prepare_one(args: tuple[str, int, bool, Expected]) -> tuple[np.ndarray | None, str | None]:
    """(preprocessed image, None), or (None, why) for a corrupt one when skipping is on (missing files raise)."""
    path, resolution, skip_corrupt, expected = args
    try:
        return preprocess(load_image(path, expected), resolution), None
    except CorruptImageError as err:
        message = str(err)
        if skip_corrupt:
            return None, message
        raise CorruptImageError(message if str(path) in message else f"{path}: {message}") from None


def image_folder(root: str | Path) -> Path:
    """``<root>/img_align_celeba``, checked.

    Raises:
        FileNotFoundError: naming the folder and what to put there.
    """
    folder = Path(root) / "img_align_celeba"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CelebA image folder {folder} not found: put the aligned-and-cropped CelebA release there "
            "(img_align_celeba/000001.jpg ... 202599.jpg, 178 x 218 JPEGs), or set datasets.<name>.root in params.yaml"
        )
    return folder


def prepare_split(
    folder: Path,
    files: Sequence[str],
    resolution: int,
    workers: int = 1,
    desc: str = "prepare",
    skip_corrupt: bool = False,
    checksums: ChecksumList | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """Decode and preprocess ``files`` from ``folder`` into uint8 (N, R, R, 3), in the given order.

    With ``workers > 1`` images are decoded in that many processes. A progress bar shows images per second.
    With ``checksums`` each file's bytes are checked against its listed digest before it is decoded.

    Returns:
        (images, skipped): skipped maps each corrupt file left out to why, in file order (empty unless
        ``skip_corrupt``).

    Raises:
        FileNotFoundError: a listed file is missing (always: a missing file is a wrong path, not corruption).
        ChecksumError: ``checksums`` does not list one of ``files`` (always, before any image is decoded).
        CorruptImageError: the first file that differs from its checksum, does not decode, decodes with libjpeg
            warnings or is wrongly sized, by name (unless ``skip_corrupt``).
    """
    expected = [None] * len(files)
    if checksums is not None:
        listing = str(checksums.path)
        expected = [(checksums.algorithm, checksums.require(folder / name), listing) for name in files]
    jobs = [(str(folder / name), resolution, skip_corrupt, want) for name, want in zip(files, expected)]
    out = np.empty((len(jobs), resolution, resolution, 3), dtype=np.uint8)
    keep = np.ones(len(jobs), dtype=bool)
    skipped: dict[str, str] = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=None)

    def collect(i: int, img: np.ndarray | None, why: str | None) -> None:
        keep[i] = img is not None
        if img is not None:
            out[i] = img
        else:
            skipped[files[i]] = why or "corrupt"
        bar.update()

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_prepare_one, jobs, chunksize=max(1, len(jobs) // (workers * 16)))
            for i, (img, why) in enumerate(results):
                collect(i, img, why)
    else:
        for i, job in enumerate(jobs):
            collect(i, *_prepare_one(job))
    bar.close()
    return (out if keep.all() else out[keep]), skipped


def prepare_celeba(
    root: str | Path,
    partition_file: str | Path | None,
    resolution: int,
    workers: int = 1,
    skip_corrupt: bool = False,
    checksums: str | Path | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """The CelebA ``prepare`` stage's work: split -> uint8 (N, R, R, 3), and manifest information.

    Every file is checked (existence, checksum when a list is given, decodability without libjpeg warnings,
    shape) and the first failure is raised with its name; with ``skip_corrupt`` such images are skipped instead,
    and listed, counted and explained. Problems with the checksum list itself, or a partition file that differs
    from it, always stop.

    Args:
        checksums: a ``sha256sum`` / ``md5sum`` list (:func:`study.data.integrity.read_checksums`) that must name
            every image of the partition; the partition file is verified too when the list names it.

    Returns:
        (split -> images, info for the manifest: source, partition file, crop, counts, skipped files and why,
        checksum list used and how many files it verified).

    Raises:
        FileNotFoundError: missing image folder, partition file, checksum list or listed image.
        ChecksumError: a malformed list, a listed file missing, an image not listed, or a partition file that
            differs from its digest.
        CorruptImageError: an image that differs from its checksum, does not decode, decodes with libjpeg
            warnings, or is wrongly sized (unless ``skip_corrupt``).
    """
    folder = image_folder(root)
    partition_path = Path(partition_file or Path(root) / "list_eval_partition.txt")
    listing = read_checksums(checksums) if checksums is not None else None
    verified = 0
    if listing is not None and listing.expected(partition_path) is not None and partition_path.is_file():
        listing.verify_file(partition_path)  # before parsing it: a changed split is not a skippable image
        verified += 1
    partition = read_partition(partition_path)
    if listing is not None:  # list problems stop the stage before the first image is decoded
        listing.check_present()
        for files in partition.values():
            for name in files:
                listing.require(folder / name)
    arrays, skipped = {}, {}
    for split, files in partition.items():
        arrays[split], skipped[split] = prepare_split(
            folder, files, resolution, workers, desc=f"celeba {split}", skip_corrupt=skip_corrupt, checksums=listing
        )
        verified += len(files) - len(skipped[split])
    info = {
        "dataset": "celeba",
        "source": str(root),
        "partition_file": str(partition_path),
        "preprocessing": "Larsen et al. 2016: img[40:188, 15:163], Gaussian sigma=sqrt(148/R)/2, bicubic (order 3)",
        "counts": {split: int(a.shape[0]) for split, a in arrays.items()},
        "skip_corrupt": skip_corrupt,
        "skipped": {split: list(why) for split, why in skipped.items()},
        "skipped_reasons": skipped,
        "skipped_count": sum(len(v) for v in skipped.values()),
        "checksums": None if listing is None else {
            "file": str(listing.path), "algorithm": listing.algorithm, "verified": verified},
    }
    return arrays, info
