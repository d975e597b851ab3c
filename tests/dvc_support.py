"""A temporary copy of the repository under DVC, for the tests that run ``dvc`` on the real pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "data/prepared", "results", "reports", "ray_results", "mlflow.db", "mlartifacts",
    "__pycache__", ".pytest_cache", ".hypothesis", "dvc.lock", ".dvc/cache", ".dvc/tmp", "*.pyc",
)


def _copy_repo(dst: Path) -> None:
    shutil.copytree(REPO, dst, ignore=IGNORE)
    for leftover in ("data/prepared", "results", "reports", ".dvc/cache", ".dvc/tmp"):
        shutil.rmtree(dst / leftover, ignore_errors=True)


def _dvc(work: Path, *args: str, stdout_only: bool = False) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return proc.stdout if stdout_only else out
