"""benchmarks/gpu_check.py keeps running: its tiny CPU mode measures, records failures per section, and writes
its JSON and Markdown (the full GPU run is a benchmark on a lent GPU, not a test)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import REPO


def test_tiny_cpu_run_writes_results_and_isolates_a_failing_section(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out),
        "--sections", "machine", "throughput", "profile", "sampler",
        "--families", "gaussian per-pixel", "structured n_f=5", "--options", "fp32", "--batch", "4",
        "--profile-options", "fp64",  # not an option set: the profile section must fail alone
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "gpu_check.json").read_text())

    assert result["kind"] == "cpu-dry-run"
    assert result["machine"]["info"]["torch"] and result["machine"]["matmul"]["bfloat16"] > 0
    rows = result["throughput"]["rows"]
    assert {(r["family"], r["options"], r["batch"]) for r in rows} == {
        ("gaussian per-pixel", "fp32", 4), ("structured n_f=5", "fp32", 4)
    }
    for r in rows:
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert math.isclose(r["step_ms"], 1e3 * 4 / r["images_per_s"])
        assert r["gflop_per_step"] > 0  # the VAE's convolutions are counted
    structured = next(r for r in rows if r["family"] == "structured n_f=5")
    gaussian = next(r for r in rows if r["family"] == "gaussian per-pixel")
    # n_f=5 emits 14 instead of 2 decoder channels per image channel: more matrix FLOPs than the Gaussian
    assert structured["gflop_per_step"] > gaussian["gflop_per_step"]

    assert result["sections"]["profile"]["status"].startswith("error: ValueError")
    assert result["sections"]["sampler"]["status"] == "ok"  # ran after the failed section
    sampler = result["sampler"]
    assert sampler["max_abs_diff"] < 1e-4  # banded back-substitution agrees with the dense triangular solve
    verdicts = {t["target"]: t for t in result["targets"]}
    sampler_target = verdicts["banded sampler >= 10x faster than the dense triangular solve"]
    assert sampler_target["met"] == (sampler["dense_solve"] / sampler["banded"] >= 10.0)
    assert verdicts["110-epoch paper run <= 10 min"]["met"] is None  # the epoch section did not run

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check: CPU dry run (not GPU figures)")
    assert "| fp32 | structured n_f=5 | 4 |" in md
