"""Atomic file and directory writes: a crash leaves the previous complete output or nothing, never a half file.

Files are written to a temporary sibling, flushed to disk, then moved into place with ``os.replace`` (atomic
on POSIX within one file system). Directories are built in a temporary sibling and swapped in with two renames;
a crash between them leaves the old output under a ``.old-*`` name and no partial directory at the target.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported everywhere; durability then rests on the file system
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fresh_directory(parent: Path, prefix: str) -> Path:
    """A new empty directory ``parent/<prefix><random>``, mode 0777 less the umask."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on normal exit it replaces ``target`` whole.

    On an exception (or a signal that raises, e.g. KeyboardInterrupt) the temporary directory is removed
    and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a writer killed outright (SIGKILL, power loss) are never outputs: remove them.
    for stale in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    # mkdir applies the process umask, as for any other directory (mkdtemp would make it 0700; reading the umask
    # means setting it, which races with Ray's and MLflow's threads).
    tmp = _fresh_directory(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(staging: str | Path, target: str | Path, names: tuple[str, ...]) -> None:
    """Move the outputs built in ``staging`` into ``target``, each replaced whole, and remove the ones of
    ``names`` that this run did not produce (so no file of an earlier run is left describing it).

    Files move with one ``os.replace``; directories with two renames (the previous one under a ``.old-*`` name
    until the new one is in place). ``staging`` must be on the same file system as ``target`` (e.g. a hidden
    directory inside it); it is removed afterwards.

    Args:
        staging: a directory holding some of ``names``.
        target: the output directory.
        names: every output name this writer owns in ``target`` (files or directories).
    """
    staging, target = Path(staging), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        new, dst = staging / name, target / name
        if not new.exists():
            if dst.is_dir():
                shutil.rmtree(dst)
            else:
                dst.unlink(missing_ok=True)
            continue
        if new.is_dir():
            old = None
            if dst.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=target))
                os.replace(dst, old / "previous")
            os.replace(new, dst)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(new, dst)
    _fsync_dir(target)
    shutil.rmtree(staging, ignore_errors=True)
