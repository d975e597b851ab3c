"""A rejected edit keeps the last results: the whole study under DVC in a temporary copy of the repository.

After one complete ``dvc repro`` (the end-to-end study's: 32 x 32 images, two datasets), each edit below makes the next
``dvc repro`` fail with a message naming what is wrong, and every output of the pipeline (``data/prepared``,
``results/``, ``reports/`` with the evaluation) stays byte-identical; undoing the edit leaves ``dvc status``
with nothing to re-run, so nothing is trained again:

- ``train.epochs: 0`` (the sweep stage rejects it);
- ``prepare.resolution: 63`` (the prepare stage rejects it);
- a source JPEG with 200 bytes overwritten mid-scan, which still decodes (the prepare stage rejects it).

Every output is ``persist: true`` in dvc.yaml, so DVC leaves it in place while a stage runs, and every stage
replaces its outputs only once it succeeded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.data.corruption import overwrite_mid_scan

OUTPUTS = ("data/prepared", "results", "reports")


def _run_dvc(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)


def _snapshot(work: Path) -> dict[str, str]:
    """sha256 of every file under the pipeline's outputs, and of dvc.lock."""
    files = [p for root in OUTPUTS for p in sorted((work / root).rglob("*")) if p.is_file()]
    files.append(work / "dvc.lock")
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def study(dvc_study):
    """The end-to-end study's copy of the repository after its complete ``dvc repro`` (tests/conftest.py
    ``dvc_study``, shared with tests/test_pipeline_e2e.py so the whole pipeline runs once for both), up to date,
    and the sha256 of every output."""
    work = dvc_study[0]
    _clean(work)
    before = _snapshot(work)
    assert any(k.startswith("reports/evaluation/") for k in before) and "results/sweep.json" in before
    return work, before


def _rejected(work: Path, before: dict[str, str], *names: str) -> str:
    """``dvc repro`` fails, its output names each of ``names``, and no output changed."""
    proc = _run_dvc(work, "repro")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    for name in names:
        assert name in out, out[-4000:]
    assert _snapshot(work) == before
    return out


def _clean(work: Path) -> None:
    proc = _run_dvc(work, "status", "dvc.yaml")  # the root pipeline (the studies' were never run in this copy)
    assert proc.returncode == 0 and "Data and pipelines are up to date" in proc.stdout, proc.stdout + proc.stderr


def _edit(work: Path, section: str, key: str, value) -> str:
    path = work / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return original


def _rejected_edit(study, section: str, key: str, value, named: str) -> None:
    """Edit params.yaml, check the rejected repro kept every output, restore it, check nothing is left to run."""
    work, before = study
    original = _edit(work, section, key, value)
    try:
        _rejected(work, before, named)
    finally:
        (work / "params.yaml").write_text(original)
    _clean(work)


@pytest.mark.slow
def test_zero_epochs_is_rejected_and_keeps_every_output(study):
    _rejected_edit(study, "train", "epochs", 0, "train.epochs")


@pytest.mark.slow
def test_odd_resolution_is_rejected_and_keeps_every_output(study):
    _rejected_edit(study, "prepare", "resolution", 63, "resolution")


@pytest.mark.slow
def test_corrupt_source_jpeg_is_rejected_and_keeps_every_output(study):
    work, before = study
    image = work / "data" / "sample" / "celeba" / "img_align_celeba" / "000007.jpg"
    original = image.read_bytes()
    image.write_bytes(overwrite_mid_scan(original))
    try:
        _rejected(work, before, "000007.jpg")
    finally:
        image.write_bytes(original)
    _clean(work)
