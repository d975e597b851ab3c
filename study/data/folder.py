"""Any folder of images -> square images or seeded patches, split by source image (``kind: folder``).

Sources: every file under ``root`` (recursively) whose name ends in ``.jpg``, ``.jpeg`` or ``.png`` in any
letter case; other files, and files or folders whose name starts with ``.`` (``.DS_Store``, macOS ``._x.jpg``
forks, ``.git/``), are ignored. Sources are identified by their path relative to ``root`` in POSIX form and
sorted by it, so the result depends on neither the file system's listing order nor the operating system.

Per source image:

1. read the file, hash its bytes (sha256) and decode it fully with Pillow (a truncated file fails here), apply
   its EXIF orientation (``ImageOps.exif_transpose``: phone photos are stored sideways), convert to RGB (grey is
   repeated, an alpha channel is dropped);
2. without ``patches``: the largest centred square, :data:`study.data.lsun.CROP_DESCRIPTION`, resized to R x R
   (an image smaller than R is enlarged);
   with ``patches: {size: S, per_image: K, seed}``: K square crops of side S (S >= R) at uniformly random
   positions, see :func:`patch_boxes`, each resized to R x R;
3. resize: :data:`study.data.lsun.RESIZE_DESCRIPTION` (the identity when S = R).

A source smaller than S x S cannot give a patch. It is treated like an undecodable file: by default the stage
stops with a :class:`SourceTooSmallError` naming the file, its size and S; with ``skip_corrupt`` it is left out,
listed and counted with the corrupt ones. Leaving it out does not move any other source between splits, because
the split is drawn before any file is read.

Splits are drawn over source images, never over patches, so no crop of one photograph is in two splits
(:func:`split_sources`); the manifest lists the sources of each split and the box of every patch.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from study.data.lsun import CROP_DESCRIPTION, RESIZE_DESCRIPTION, centre_crop_resize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_ORDER = ("train", "val", "test")

PATCH_DESCRIPTION = (
    "per source, K crops of side S: rng = numpy.random.default_rng([seed, n]) with n the first 8 bytes of "
    "sha256(relative path, UTF-8) read as a little-endian unsigned integer; for each crop top = "
    "rng.integers(0, H - S + 1) then left = rng.integers(0, W - S + 1); rows top..top + S - 1 and columns "
    "left..left + S - 1 of the oriented RGB image"
)


class CorruptImageError(ValueError):
    """A source file cannot be decoded as an image (truncated, or not an image).

    Attributes:
        path: the file, as given (str).
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # keep the path when the error crosses a process-pool boundary
        return (type(self), (self.args[0], self.path))


class SourceTooSmallError(CorruptImageError):
    """A source image is smaller than the patch size in height or width, so it has no S x S crop."""


def list_sources(root: str | Path) -> list[str]:
    """The image files under ``root``, as sorted relative POSIX paths.

    Args:
        root: the folder to search recursively.

    Returns:
        Relative paths such as ``"trip/IMG_0001.JPG"``, sorted as strings; files not ending in ``.jpg``,
        ``.jpeg`` or ``.png`` (any case), and anything whose own name or a parent folder's name (below ``root``)
        starts with ``.``, are left out.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no image file (both named, with what to put there).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} not found: put the images (*.jpg, *.jpeg, *.png, in any sub-folders) there, "
            "or set datasets.<name>.root in params.yaml"
        )
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(rel.as_posix())
    if not found:
        raise FileNotFoundError(
            f"image folder {root} holds no *.jpg, *.jpeg or *.png file (searched recursively); "
            "put the images there or fix datasets.<name>.root in params.yaml"
        )
    return sorted(found)


def split_sources(
    sources: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Assign source images to train / val / test with a seeded permutation.

    ``p = numpy.random.default_rng(seed).permutation(N)``; the first n_test = ``round(test_fraction * N)``
    entries of ``p`` go to test, the next n_val = ``round(val_fraction * N)`` to val, the rest to train. Each
    held-out split gets at least one source; train must keep at least one. Each list keeps the input (sorted)
    order. The assignment depends only on the list, the fractions and the seed, not on which files decode.

    Args:
        sources: distinct source identifiers (:func:`list_sources`), N of them.
        val_fraction, test_fraction: in (0, 1), summing to < 1.
        seed: the numpy seed.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, disjoint, together all of ``sources``.

    Raises:
        ValueError: a fraction outside (0, 1), fractions summing to >= 1, a duplicate source, or fewer than 3
            sources (one per split), with the count in the message.
    """
    for name, value in (("val", val_fraction), ("test", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"the {name} fraction must be in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val + test fractions {val_fraction} + {test_fraction} leave nothing for train")
    n = len(sources)
    if len(set(sources)) != n:
        raise ValueError("the source list has duplicates")
    if n < 3:
        raise ValueError(f"{n} source image(s) found; a split by source needs at least 3 (train, val, test)")
    n_test = min(max(round(test_fraction * n), 1), n - 2)
    n_val = min(max(round(val_fraction * n), 1), n - 1 - n_test)
    where = np.zeros(n, dtype=np.int64)  # 0 train, 1 val, 2 test
    order = np.random.default_rng(seed).permutation(n)
    where[order[:n_test]] = 2
    where[order[n_test : n_test + n_val]] = 1
    return {split: [s for s, w in zip(sources, where, strict=True) if w == code] for code, split in enumerate(SPLIT_ORDER)}


def source_rng(relative_path: str, seed: int) -> np.random.Generator:
    """The generator of one source's patch positions: ``default_rng([seed, n])``, n = the first 8 bytes of
    sha256 of the UTF-8 relative path, little-endian. Keyed by path, so adding, removing or skipping another file
    leaves this source's patches unchanged, and the result does not depend on the number of workers."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def patch_boxes(height: int, width: int, size: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``count`` uniformly random S x S crop positions in an H x W image: :data:`PATCH_DESCRIPTION`.

    Args:
        height, width: the image size in pixels.
        size: S, the crop side in pixels.
        count: K, crops to draw.
        rng: :func:`source_rng` of the source.

    Returns:
        K ``(top, left)`` pairs; ``img[top:top + S, left:left + S]`` is each crop (crops may overlap).

    Raises:
        ValueError: S > H or S > W.
    """
    if size > height or size > width:
        raise ValueError(f"a {size} x {size} patch does not fit in a {height} x {width} image")
    boxes = []
    for _ in range(count):
        top = int(rng.integers(0, height - size + 1))
        left = int(rng.integers(0, width - size + 1))
        boxes.append((top, left))
    return boxes


def decode_image(data: bytes, path: str) -> np.ndarray:
    """Decode a file's bytes to uint8 (H, W, 3) RGB, 0..255, EXIF orientation applied.

    The whole image is decoded (``Image.load``), so a truncated file fails here; this relies on Pillow's default
    ``ImageFile.LOAD_TRUNCATED_IMAGES = False``.

    Raises:
        CorruptImageError: the bytes are not a decodable image; the message names ``path``.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"{path} cannot be decoded ({err}); replace or remove the file, or set prepare.skip_corrupt "
            "(--skip-corrupt) to leave such files out (they are listed in the manifest)",
            path=path,
        ) from None


def resize_square(square: np.ndarray, resolution: int) -> np.ndarray:
    """Resize a uint8 (S, S, 3) crop to (R, R, 3): :data:`study.data.lsun.RESIZE_DESCRIPTION`."""
    im = Image.fromarray(np.ascontiguousarray(square), mode="RGB")
    return np.asarray(im.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=None), dtype=np.uint8)


def _prepare_source(job: tuple[str, str, int, int | None, int, int, bool]) -> tuple[str, Any, Any]:
    # Runs in a worker process. Returns (sha256, images (K, R, R, 3), boxes) or (sha256, None, reason) if skipped.
    root, rel, resolution, size, per_image, patch_seed, skip_corrupt = job
    path = str(Path(root) / rel)
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = decode_image(data, path)
        if size is None:
            return digest, centre_crop_resize(img, resolution)[None], None
        height, width = img.shape[:2]
        if size > height or size > width:
            raise SourceTooSmallError(
                f"{path} is {height} x {width} (H x W), smaller than the {size} x {size} patches; lower "
                "patches.size, remove the file, or set prepare.skip_corrupt to leave such files out",
                path=path,
            )
        boxes = patch_boxes(height, width, size, per_image, source_rng(rel, patch_seed))
        out = np.stack([resize_square(img[t : t + size, l : l + size], resolution) for t, l in boxes])
        return digest, out, boxes
    except CorruptImageError as err:
        if skip_corrupt:
            return digest, None, str(err)
        raise


def prepare_sources(
    root: str | Path,
    sources: Sequence[str],
    resolution: int,
    patch_size: int | None = None,
    patches_per_image: int = 1,
    patch_seed: int = 0,
    workers: int = 1,
    skip_corrupt: bool = False,
    desc: str = "folder",
) -> dict[str, Any]:
    """Decode, crop and resize ``sources`` into uint8 (N, R, R, 3), in source order (K rows per source).

    With ``workers > 1`` sources are decoded in that many processes; the output does not depend on ``workers``.

    Returns:
        ``images`` uint8 (N, R, R, 3); ``kept`` (the sources used, in order); ``boxes`` (per kept source, its
        K ``[top, left]`` crop positions; absent without patches); ``sha256`` (relative path -> hex sha256 of the
        file, for every source read, kept or not); ``skipped`` (relative path -> reason, empty unless
        ``skip_corrupt``).

    Raises:
        CorruptImageError: without ``skip_corrupt``, the first undecodable source in source order, by path.
        SourceTooSmallError: likewise, the first source smaller than ``patch_size``.
    """
    jobs = [(str(root), rel, resolution, patch_size, patches_per_image, patch_seed, skip_corrupt) for rel in sources]
    per = 1 if patch_size is None else patches_per_image
    out = np.empty((len(jobs) * per, resolution, resolution, 3), dtype=np.uint8)
    kept: list[str] = []
    boxes: dict[str, list[list[int]]] = {}
    hashes: dict[str, str] = {}
    skipped: dict[str, str] = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=None)

    def collect(rel: str, result: tuple[str, Any, Any]) -> None:
        digest, images, extra = result
        hashes[rel] = digest
        if images is None:
            skipped[rel] = extra
        else:
            out[len(kept) * per : (len(kept) + 1) * per] = images
            kept.append(rel)
            if extra is not None:
                boxes[rel] = [list(b) for b in extra]
        bar.update()

    try:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                try:
                    chunk = max(1, len(jobs) // (workers * 16))
                    for rel, result in zip(sources, pool.map(_prepare_source, jobs, chunksize=chunk), strict=True):
                        collect(rel, result)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # fail fast, without decoding the queue
                    raise
        else:
            for rel, job in zip(sources, jobs, strict=True):
                collect(rel, _prepare_source(job))
    finally:
        bar.close()
    result: dict[str, Any] = {
        "images": out if len(kept) == len(jobs) else out[: len(kept) * per].copy(),
        "kept": kept,
        "sha256": hashes,
        "skipped": skipped,
    }
    if patch_size is not None:
        result["boxes"] = boxes
    return result


def _listing_sha256(entries: Sequence[str], hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{rel}\t{hashes[rel]}\n" for rel in entries).encode("utf-8")).hexdigest()


def prepare_folder(
    root: str | Path,
    resolution: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    patch_size: int | None = None,
    patches_per_image: int = 1,
    patch_seed: int = 0,
    workers: int = 1,
    skip_corrupt: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The folder ``prepare`` stage's work: split -> uint8 (N, R, R, 3) RGB plus manifest fields.

    Args:
        root: the image folder (searched recursively, :func:`list_sources`).
        resolution: R, output side in pixels.
        val_fraction, test_fraction: fractions of the source images held out (:func:`split_sources`).
        seed: seed of the split.
        patch_size: S (>= R) for seeded S x S patches, or None for one centre square crop per image.
        patches_per_image: K, patches per source image.
        patch_seed: seed of the patch positions (:func:`source_rng`).
        workers: decoding processes.
        skip_corrupt: leave undecodable and too-small sources out (listed and counted) instead of raising.

    Returns:
        (arrays, info). arrays: ``{"train", "val", "test"}`` -> uint8 (N, R, R, 3), 0..255: the kept sources of
        the split in sorted order, K consecutive rows per source (patches in draw order). info
        (JSON-serialisable, for :func:`study.data.store.write_prepared`): ``dataset`` ("folder"), ``source``
        (root), ``resolution``, ``crop``, ``resize`` (the methods in words), ``split_fractions``, ``seed``,
        ``patches`` (``{size, per_image, seed}`` or None), ``source_count`` (files found), ``sources`` (split ->
        the relative paths of the sources assigned to it, kept or skipped), ``sources_sha256`` (split -> sha256
        of the lines ``"<relative path>\\t<sha256 of the file>\\n"`` of its assigned sources: the split's identity),
        ``patch_boxes`` (split -> relative path -> K ``[top, left]``; patches only), ``counts`` (images per split),
        ``skip_corrupt``, ``skipped`` (split -> skipped relative paths), ``skipped_reasons`` (relative path ->
        message) and ``skipped_count`` (int, all splits).

    Raises:
        FileNotFoundError: the folder is missing or holds no image.
        CorruptImageError: without ``skip_corrupt``, an undecodable source, by path.
        SourceTooSmallError: without ``skip_corrupt``, a source smaller than S x S, by path and size.
        ValueError: S < R, K < 1, R < 1, bad split fractions, or fewer than 3 sources.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if patch_size is not None and patch_size < resolution:
        raise ValueError(f"patch size {patch_size} is smaller than the resolution {resolution}")
    if patches_per_image < 1:
        raise ValueError(f"patches per image must be >= 1, got {patches_per_image}")
    sources = list_sources(root)
    assigned = split_sources(sources, val_fraction, test_fraction, seed)
    arrays: dict[str, np.ndarray] = {}
    info_sha: dict[str, str] = {}
    boxes: dict[str, dict[str, list[list[int]]]] = {}
    skipped: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for split in SPLIT_ORDER:
        done = prepare_sources(
            root, assigned[split], resolution, patch_size, patches_per_image, patch_seed, workers, skip_corrupt,
            desc=f"folder {split}",
        )
        arrays[split] = done["images"]
        info_sha[split] = _listing_sha256(assigned[split], done["sha256"])
        if patch_size is not None:
            boxes[split] = done["boxes"]
        skipped[split] = [rel for rel in assigned[split] if rel in done["skipped"]]
        reasons.update(done["skipped"])
    info: dict[str, Any] = {
        "dataset": "folder",
        "source": str(root),
        "resolution": resolution,
        "crop": CROP_DESCRIPTION if patch_size is None else PATCH_DESCRIPTION,
        "resize": RESIZE_DESCRIPTION,
        "split_fractions": {"val": val_fraction, "test": test_fraction},
        "seed": seed,
        "patches": None if patch_size is None else {"size": patch_size, "per_image": patches_per_image,
                                                    "seed": patch_seed},
        "source_count": len(sources),
        "sources": assigned,
        "sources_sha256": info_sha,
        "counts": {split: int(a.shape[0]) for split, a in arrays.items()},
        "skip_corrupt": skip_corrupt,
        "skipped": skipped,
        "skipped_reasons": reasons,
        "skipped_count": len(reasons),
    }
    if patch_size is not None:
        info["patch_boxes"] = boxes
    return arrays, info
