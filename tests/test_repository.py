"""The repository stands alone: no tracked file points outside it, or at a document it does not hold.

A user's machine has only the clone, so every tracked text file (code, tests, configs, docs, lock files) must not
name

- an absolute path of the development machine: a folder at the root named ``work`` or ``root``, or a user's
  home under ``/home`` or ``/Users``;
- a folder beside the repository: a ``shared`` sibling reached by a ``../`` path or through the parent of the
  repository folder, or any ``../`` path that, resolved from the file's own folder, leaves the repository;
- the former project notes, spec and design files: the bare word for the spec in capitals, and any Markdown file
  whose name is all capitals (as notes files are named) and that is not tracked;
- a repository path (``study/...``, ``tests/...``, ``data/...``, ...; with a file extension) that is neither
  tracked nor a git-ignored output (``reports/summary.md`` is an output of the pipeline, not a missing file).

Allowed on purpose: ``/tmp`` (tests make short-lived folders there, e.g. for Ray's socket paths, which must be
short; it exists on every POSIX machine), paths inside URLs (they belong to the server), ``~/...`` (the user's own
home, e.g. torch's cache), and ``../`` paths that stay inside the repository (DVC's ``wdir: ../..``).

Binary files (a NUL byte, or not UTF-8) are not scanned. The scan needs a git checkout (``git ls-files``), which
the pipeline needs anyway (DVC).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from tests.conftest import REPO

# A root-level folder of the development machine; the look-behind keeps URLs (".../host/work/...") and
# relative paths ("a/work/", "~/work") out, and the look-ahead keeps "/workers" out.
_ABSOLUTE = re.compile(r"(?<![\w.~:%-])/(?:work|root)(?=[/\s\"'`)\],;:]|$)")
_HOME = re.compile(r"(?<![\w.~:%-])/(?:home|Users)/[A-Za-z_]")
_SIBLING = re.compile(r"\.\./shared\b|\.parent\s*/\s*[\"']shared\b|\bREPO\.parent\b")
_UP = re.compile(r"(?<![\w.])((?:\.\./)+)[\w.]")
_SPEC_WORD = re.compile(r"\bSPEC\b")
_CAPS_MD = re.compile(r"(?<![\w-])([A-Z][A-Z0-9_]*\.md)\b")
_REPO_PATH = re.compile(
    r"(?<![\w./-])((?:study|tests|pipelines|benchmarks|studies|data|\.ci)/[\w/.-]*\w"
    r"\.(?:py|ya?ml|txt|md|gz|lock|toml|sh|json|csv|png|jpg|npz))\b"
)


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False)
    assert out.returncode == 0, f"`git ls-files` failed in {REPO}; run the tests from a git clone: {out.stderr!r}"
    return [p for p in out.stdout.decode().split("\0") if p]


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _ignored(paths: set[str]) -> set[str]:
    """The subset of ``paths`` that .gitignore excludes (pipeline outputs), whether or not they exist."""
    if not paths:
        return set()
    out = subprocess.run(
        ["git", "check-ignore", "--stdin"], cwd=REPO, input="\n".join(sorted(paths)) + "\n",
        capture_output=True, text=True, check=False,
    )
    assert out.returncode in (0, 1), out.stderr  # 1: none of them is ignored
    return set(out.stdout.split())


def problems(rel: str, text: str, tracked: set[str], tracked_names: set[str]) -> list[tuple[int, str, str | None]]:
    """(line number, what, cited path) for each reference in ``text`` (the file ``rel``) that leaves the repository.

    ``cited path`` is set for a repository path that is not tracked: the caller keeps it unless git ignores it
    (a pipeline output); it is None for every other finding.
    """
    found = []
    depth = len(PurePosixPath(rel).parent.parts)
    for number, line in enumerate(text.splitlines(), start=1):
        if _ABSOLUTE.search(line) or _HOME.search(line):
            found.append((number, "absolute path of the development machine", None))
        if _SIBLING.search(line):
            found.append((number, "folder beside the repository", None))
        if any(len(m.group(1)) // 3 > depth for m in _UP.finditer(line)):
            found.append((number, "relative path that leaves the repository", None))
        if _SPEC_WORD.search(line):
            found.append((number, "cites the spec, which is not in the repository", None))
        for name in _CAPS_MD.findall(line):
            if name not in tracked_names:
                found.append((number, f"cites {name}, which is not in the repository", None))
        for path in _REPO_PATH.findall(line):
            if path not in tracked:
                found.append((number, f"cites {path}, which is not tracked", path))
    return found


def test_no_tracked_file_points_outside_the_repository():
    files = _tracked_files()
    tracked = set(files)
    tracked_names = {PurePosixPath(f).name for f in files}
    found: list[tuple[str, int, str, str | None]] = []
    lines: dict[str, list[str]] = {}
    for rel in files:
        path = REPO / rel
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        text = _text(path)
        if text is not None:
            lines[rel] = text.splitlines()
            found += [(rel, *p) for p in problems(rel, text, tracked, tracked_names)]
    outputs = _ignored({cited for *_, cited in found if cited is not None})
    report = [
        f"{rel}:{n}: {what}: {lines[rel][n - 1].strip()[:160]}"
        for rel, n, what, cited in found
        if cited is None or cited not in outputs
    ]
    assert not report, "\n".join(report)


# The offending strings are assembled from pieces so that this file does not contain them itself.
_W, _R, _S = "/" + "work", "/" + "root", "SP" + "EC"
_EX_SHARED, _EX_HOME, _EX_UP = "sha" + "red", "ho" + "me", "." + "."
_EX_HOME_DIR = "/".join(["", _EX_HOME, "alice", "celeba"])
_EX_PARENT = "REPO." + "par" + "ent"


@pytest.mark.parametrize(
    "line",
    [
        f'CELEBA = Path("{_W}/{_EX_SHARED}/data/celeba-sample/img_align_celeba")',
        f"see {_R}/.cache/x",
        f"cd {_W} && make",
        f"    data = Path('{_EX_HOME_DIR}')",
        f'pytest.skip("{_EX_UP}/{_EX_SHARED}/data/list.txt is not beside the repository")',
        f'SHARED_DATA = {_EX_PARENT} / "{_EX_SHARED}" / "data"',
        f"# Asperti's variance loss, the formula of {_S} 4.1",
        f'"""Larsen et al. 2016\'s crop ({_S} §3.3)."""',
        "space compare directly (DESIGN" + ".md, 'The likelihood interface').",
        "see ../../" + "../elsewhere/x.txt",
        "the loader (study/" + "no_such_module.py) reads it",
    ],
)
def test_scan_flags_references_outside_the_repository(line):
    assert problems("tests/data/test_celeba.py", line, {"tests/conftest.py"}, {"conftest.py", "README.md"})


@pytest.mark.parametrize(
    "line",
    [
        "licence terms: <https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html>",
        "url = 'https://example.org/work/root/data.txt'",
        'temp = Path(f"/tmp/rayc_{secrets.token_hex(4)}")',
        "``~/.cache/torch/hub/checkpoints/``",
        "_SPECIAL = {'max': 1.0}  # a SPECTRAL norm, spectra",
        "wdir: ../..",
        "  - " + "../" * 2 + "reports/avae/trials.csv:",
        "see README.md and tests/conftest.py",
        "num_workers: 4  # /workers and /workspace are other words",
        "shared by all channels; a shared fixture",
    ],
)
def test_scan_allows_legitimate_text(line):
    # studies/avae/dvc.yaml sits two folders deep, so "../.." from it stays inside the repository.
    assert problems("studies/avae/dvc.yaml", line, {"tests/conftest.py"}, {"conftest.py", "README.md"}) == []
