"""Build LMDBs in exactly the official LSUN format from real photographs, for the LSUN reader's tests.

Format (the LSUN release, ``fyu/lsun``): a folder with ``data.mdb`` and ``lock.mdb``; key = 40-hex image id as ASCII
bytes; value = JPEG bytes, short side 256, quality 75. Here the id is the sha1 of the photograph's source name.

Photographs: the 32 real CelebA images embedded in the repository (portrait, 178 x 218, so H > W) and the real
photographs bundled with scikit-image (landscape and square; two grayscale ones, stored as 1-channel JPEGs as
some LSUN images are). The JPEG encoding here is written out independently of ``study.data.lsun``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from study.data.lsun import write_lsun_lmdb
from tests.conftest import SAMPLE

CELEBA_DIR = SAMPLE / "img_align_celeba"
# Real photographs shipped inside scikit-image (no download); camera and coins are grayscale.
SKIMAGE_TRAIN = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "stereo_motorcycle_left")
SKIMAGE_TEST = ("stereo_motorcycle_right", "retina", "immunohistochemistry", "camera", "coins")


def lsun_key(name: str) -> bytes:
    """A 40-hex image id for a source name: sha1(name), as ASCII bytes."""
    return hashlib.sha1(name.encode()).hexdigest().encode("ascii")


def load_photo(name: str) -> Image.Image:
    """A real photograph by name: ``celeba/000001.jpg`` ... or a ``skimage.data`` function name (mode RGB or L)."""
    if name.startswith("celeba/"):
        with Image.open(CELEBA_DIR / name.split("/", 1)[1]) as im:
            return im.convert("RGB")
    from skimage import data

    if name.startswith("stereo_motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return Image.fromarray(left if name.endswith("left") else right)
    arr = getattr(data, name)()
    return Image.fromarray(arr)  # (H, W) uint8 -> mode L, (H, W, 3) -> RGB


def lsun_jpeg(im: Image.Image, short_side: int = 256, quality: int = 75) -> bytes:
    """JPEG bytes as LSUN stores them: resized (Lanczos, aspect kept) so the short side is 256, quality 75."""
    w, h = im.size
    scale = short_side / min(w, h)
    size = (short_side, int(round(h * scale))) if w <= h else (int(round(w * scale)), short_side)
    buf = io.BytesIO()
    im.resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_records(names: Iterable[str]) -> dict[bytes, bytes]:
    """key -> LSUN-format JPEG bytes for each named photograph."""
    return {lsun_key(name): lsun_jpeg(load_photo(name)) for name in names}


def celeba_names(count: int = 32) -> list[str]:
    return [f"celeba/{i:06d}.jpg" for i in range(1, count + 1)]


def build_lmdb(path: Path, records: dict[bytes, bytes]) -> Path:
    """Write ``records`` as an official-format LSUN LMDB folder at ``path`` (via the library's writer)."""
    write_lsun_lmdb(path, records.items(), map_size=1 << 26)
    return path


def train_test_records() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """Stand-ins for church_outdoor_train_lmdb (32 CelebA + 6 skimage photographs = 38 records) and
    church_outdoor_val_lmdb (5 skimage photographs, 2 of them grayscale)."""
    return photo_records(celeba_names() + list(SKIMAGE_TRAIN)), photo_records(SKIMAGE_TEST)


def garbage_bytes(n: int = 4096, seed: int = 0) -> bytes:
    """Random bytes: not an image at all."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def truncated(jpeg: bytes) -> bytes:
    """The first half of a JPEG: a valid header, half the entropy-coded data, no end marker."""
    return jpeg[: len(jpeg) // 2]
