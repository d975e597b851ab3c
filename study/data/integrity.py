"""Source integrity for the ``prepare`` stages: checksum lists of the raw files, and strict JPEG decoding.

Checksum lists are the files ``sha256sum`` and ``md5sum`` write (and check with ``-c``): one line per file,
``<hex digest>  <name>`` (or ``<hex digest> *<name>``, binary mode), the name relative to the list's own folder;
blank lines and ``#`` comments are skipped. The algorithm follows from the digest length, 32 hex characters for
md5 and 64 for sha256, one algorithm per list. Every listed file must exist; every file a stage reads must be
listed (except CelebA's partition file, checked when listed), so a stale or partial list is an error rather
than a silent gap.

JPEGs: when the entropy-coded data are damaged, libjpeg often recovers with a *warning* ("Corrupt JPEG data:
premature end of data segment", "... N extraneous bytes before marker 0xd9") and returns an image of the right
size with wrong pixels. Pillow's JPEG decoder discards libjpeg's warnings (its message handler is empty), so
:func:`jpeg_warning` decodes the bytes once more with libjpeg-turbo through ``simplejpeg`` in strict mode
(TurboJPEG's stop-on-warning), which raises them. The pixels the stages use stay Pillow's. Damage that keeps
the Huffman decoder in step produces no warning in any decoder (a JPEG scan has no checksum): only a checksum
list catches every changed byte.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import simplejpeg

SUMS_FILE = "SHA256SUMS"  # found in a dataset root, it is verified without being named in params.yaml
ALGORITHMS = {32: "md5", 64: "sha256"}  # hex digest length -> hashlib name
_HEX = frozenset("0123456789abcdef")
# simplejpeg.decode_jpeg_header's colour space -> an output space libjpeg-turbo converts to without complaint
_DECODE_AS = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}


class ChecksumError(ValueError):
    """A checksum list is malformed, lists a missing file, does not list a file the stage reads, or a file that
    cannot be skipped (a partition file, an LMDB) differs from its digest. The message names the file and list."""


def _key(path: str | Path) -> Path:
    # Absolute and normalised (`..` and `.` folded) without resolving links, so a list's names and a root agree.
    return Path(os.path.abspath(path))


def digest_bytes(data: bytes, algorithm: str) -> str:
    """Lowercase hex digest of ``data`` (``algorithm``: ``md5`` or ``sha256``)."""
    return hashlib.new(algorithm, data).hexdigest()


def digest_file(path: str | Path, algorithm: str, chunk: int = 1 << 22) -> str:
    """Lowercase hex digest of a file's bytes, read in ``chunk``-byte pieces (an LMDB can be gigabytes)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def mismatch_message(path: str | Path, algorithm: str, expected: str, actual: str, listing: str | Path) -> str:
    """The error text for a file whose digest differs from its checksum list's."""
    return (
        f"{path} does not match its {algorithm} in {listing} (expected {expected}, got {actual}): the file is "
        "damaged or was changed; restore it from the release, or correct the list if the change is intended"
    )


@dataclass(frozen=True)
class ChecksumList:
    """A parsed checksum list: ``digests`` maps each listed file (absolute path) to its lowercase hex digest."""

    path: Path
    algorithm: str
    digests: dict[Path, str]

    def expected(self, file: str | Path) -> str | None:
        """The listed digest of ``file``, or None if the list does not name it."""
        return self.digests.get(_key(file))

    def require(self, file: str | Path) -> str:
        """The listed digest of a file the stage reads.

        Raises:
            ChecksumError: the list does not name the file.
        """
        digest = self.expected(file)
        if digest is None:
            raise ChecksumError(
                f"{file} is read by the prepare stage but not listed in checksum list {self.path}: add its "
                f"{self.algorithm} line (`{self.algorithm}sum`), or point datasets.<name>.checksums at a complete list"
            )
        return digest

    def check_present(self) -> None:
        """Every listed file exists.

        Raises:
            ChecksumError: naming the first listed file that is missing.
        """
        for file in self.digests:
            if not file.is_file():
                raise ChecksumError(
                    f"{file} is listed in checksum list {self.path} but missing: restore it from the release, "
                    "or remove its line from the list"
                )

    def verify_file(self, file: str | Path) -> None:
        """Hash a listed file and compare.

        Raises:
            ChecksumError: the file is not listed, or its digest differs (expected and actual digests given).
        """
        expected = self.require(file)
        actual = digest_file(file, self.algorithm)
        if actual != expected:
            raise ChecksumError(mismatch_message(file, self.algorithm, expected, actual, self.path))


def read_checksums(path: str | Path) -> ChecksumList:
    """Parse a ``sha256sum`` / ``md5sum`` list; names resolve against the list's folder.

    Raises:
        FileNotFoundError: the list does not exist (the message names ``datasets.<name>.checksums``).
        ChecksumError: a malformed line, a digest that is neither 32 (md5) nor 64 (sha256) hex characters, a
            list mixing the two, or a file listed twice; the message gives ``<list>:<line number>``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checksum list {path} not found: set datasets.<name>.checksums in params.yaml to a file written by "
            "`sha256sum` or `md5sum` (or to null)"
        )
    folder = path.parent
    algorithm: str | None = None
    digests: dict[Path, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(maxsplit=1)  # '<digest>  <name>' or '<digest> *<name>' (binary mode)
        digest, name = parts[0].lower(), (parts[1].removeprefix("*") if len(parts) == 2 else "")
        if not name or not set(digest) <= _HEX:
            raise ChecksumError(f"{path}:{number}: expected '<hex digest>  <file name>', got {line!r}")
        kind = ALGORITHMS.get(len(digest))
        if kind is None:
            raise ChecksumError(
                f"{path}:{number}: a digest of {len(digest)} hex characters; expected 32 (md5) or 64 (sha256)"
            )
        if algorithm is not None and kind != algorithm:
            raise ChecksumError(f"{path}:{number}: a {kind} digest in a list of {algorithm} digests; use one algorithm")
        algorithm = kind
        file = _key(folder / name)
        if file in digests:
            raise ChecksumError(f"{path}:{number}: {name} is listed twice")
        digests[file] = digest
    if algorithm is None:
        raise ChecksumError(f"checksum list {path} lists no file")
    return ChecksumList(path=path, algorithm=algorithm, digests=digests)


def jpeg_warning(data: bytes) -> str | None:
    """libjpeg-turbo's complaint about JPEG bytes that Pillow decoded without error, or None when it has none.

    Decodes ``data`` with ``simplejpeg.decode_jpeg(strict=True)``, which raises on libjpeg warnings such as
    "Corrupt JPEG data: premature end of data segment". Bytes that are not a JPEG (no SOI marker) return None:
    this check is for JPEGs only.

    Returns:
        The libjpeg message, or None.
    """
    if data[:2] != b"\xff\xd8":
        return None
    try:
        _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        simplejpeg.decode_jpeg(data, colorspace=_DECODE_AS.get(colorspace, "RGB"), strict=True)
    except ValueError as err:
        return str(err)
    return None
