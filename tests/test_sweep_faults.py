"""The sweep stage under faults, as a user meets them: the real ``python -m pipelines.sweep`` in a subprocess, real
Ray (loopback), real MLflow (SQLite). Each attack checks the error a user sees, the states of the MLflow runs and
that earlier outputs are untouched.

- a modified prepared array fails before Ray starts, naming the file, with no run created;
- Ray failing to start is one line naming the cause and ``sweep.ray_start_timeout_s``, and leaves no run behind;
- a sweep whose every trial fails ends its parent run FAILED, writes no summary, and does not train a
  deterministic failure again on the retry;
- a second driver of a live sweep is refused with the first one's PID; when the process that started the driver
  dies (``dvc repro`` killed outright), the driver stops and marks its runs KILLED; a re-run resumes into the same
  runs; a re-run after the sweep finished rewrites the summary from MLflow without training;
- ``kill -TERM`` of a running ``dvc repro``: its sweep driver stops, its runs are KILLED with ``interrupted_at``,
  and the next ``dvc repro`` resumes into the same parent run instead of training a second sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sweep_support import child_runs, end_session, read_json, stage_env, start, tiny_params, wait_for, write_params


def _client(work: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


def _runs(work: Path) -> list:
    client = _client(work)
    experiment = client.get_experiment_by_name("vae-blur-study")
    return [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=1000)


def _sweep(work: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.sweep", "--params", str(work / "params.yaml")],
                          cwd=Path(__file__).resolve().parents[1], env=env or stage_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def own_data(tmp_path, prepared_32) -> Path:
    """A private copy of the prepared 32 x 32 sample (these tests may damage it)."""
    dst = tmp_path / "prepared" / "celeba32"
    shutil.copytree(prepared_32, dst)
    return dst


def _previous_summary(work: Path) -> bytes:
    """A summary left by an earlier run, which a failed run must not touch."""
    path = work / "results" / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"sweep": "an earlier complete run"}\n')
    return path.read_bytes()


def test_modified_array_fails_before_ray_starts(tmp_path, own_data):
    work = tmp_path / "work"
    write_params(work, tiny_params(work, own_data))
    before = _previous_summary(work)
    val = own_data / "val.npy"
    val.write_bytes(val.read_bytes()[:-100])  # truncated
    proc = _sweep(work)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "val.npy" in proc.stderr and "sha256" in proc.stderr and "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert _runs(work) == []  # no parent run, no trial
    assert (work / "results" / "sweep.json").read_bytes() == before


def test_ray_start_failure_is_one_line_and_leaves_no_run(tmp_path, own_data):
    work = tmp_path / "work"
    write_params(work, tiny_params(work, own_data, ray_start_timeout_s=1))
    before = _previous_summary(work)
    # A Ray that cannot start: its temporary directory (Ray's own RAY_TMPDIR setting) cannot be created.
    proc = _sweep(work, stage_env(RAY_TMPDIR="/proc/1/no-such-dir"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "could not start" in errors[0] and "sweep.ray_start_timeout_s" in errors[0]
    assert "Traceback" not in proc.stderr
    assert _runs(work) == [] and not list((work / "ray_results").glob("*.sweep_state.json"))
    assert (work / "results" / "sweep.json").read_bytes() == before


@pytest.mark.slow
def test_sweep_without_a_finished_trial_fails_and_keeps_the_summary(tmp_path, own_data):
    work, pids = tmp_path / "work", tmp_path / "pids"
    pids.mkdir()
    write_params(work, tiny_params(work, own_data, num_trials=2, max_failures=1))
    before = _previous_summary(work)
    env = stage_env(STUDY_TEST_NAN_TRIAL="_trainable", STUDY_TEST_NAN_EPOCH="2", STUDY_TEST_PID_DIR=str(pids))
    proc = _sweep(work, env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "none of its 2 trials finished" in proc.stderr and "NonFiniteLossError" in proc.stderr
    runs = _runs(work)
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    children = [r for r in runs if r.data.tags.get("kind") != "sweep"]
    assert len(children) == 2 and {r.info.status for r in children} == {"FAILED"}
    assert all("NonFiniteLossError" in r.data.tags["failure_reason"] for r in children)
    assert (work / "results" / "sweep.json").read_bytes() == before
    # Retried (max_failures 1) without training again: a retry that trained would have resumed from the
    # epoch-1 checkpoint and recorded start_epoch 1.
    progress = [read_json(p) for p in pids.glob("*.json")]
    assert len(progress) == 2 and {p["start_epoch"] for p in progress} == {0}


@pytest.mark.slow
def test_orphaned_driver_stops_and_second_driver_is_refused(tmp_path, own_data):
    work = tmp_path / "work"
    write_params(work, tiny_params(work, own_data, epochs=4, num_trials=2))
    log = work / "driver.log"
    cmd = f"{sys.executable} -m pipelines.sweep --params {work / 'params.yaml'}; echo driver-exited"
    # A shell stands in for `dvc repro`: it does not pass signals on, and it is killed outright below.
    launcher = start(["sh", "-c", cmd], Path(__file__).resolve().parents[1],
                     stage_env(STUDY_TEST_EPOCH_SLEEP="2"), log)
    try:
        state_file = work / "ray_results" / "tiny.sweep_state.json"
        wait_for(lambda: state_file.is_file() and any(r.info.status == "RUNNING" and r.data.tags.get("kind") != "sweep"
                                                      for r in _runs(work)),
                 240, "a running trial", proc=launcher, log=log)
        driver_pid = int((work / "ray_results" / "tiny.lock").read_text().strip())

        second = _sweep(work, timeout=120)
        assert second.returncode == 1 and f"already running in process {driver_pid}" in second.stderr

        os.kill(launcher.pid, signal.SIGKILL)  # the driver's parent dies without a word
        wait_for(lambda: not Path(f"/proc/{driver_pid}").exists(), 120, "the orphaned driver to stop")
    finally:
        end_session(launcher.pid)
    runs = _runs(work)
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert parent.info.status == "KILLED" and "interrupted_at" in parent.data.tags
    assert "RUNNING" not in {r.info.status for r in runs}
    assert any(r.info.status == "KILLED" and "interrupted_at" in r.data.tags
               for r in runs if r.data.tags.get("kind") != "sweep")
    assert not (work / "results" / "sweep.json").exists()

    resumed = _sweep(work)  # resumes into the same runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((work / "results" / "sweep.json").read_text())
    assert summary["resumed"] is True and summary["parent_run_id"] == parent.info.run_id
    runs = _runs(work)
    children = [r for r in runs if r.data.tags.get("kind") != "sweep"]
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert [r.info.status for r in runs if r.data.tags.get("kind") == "sweep"] == ["FINISHED"]

    # The same sweep again (DVC had not recorded it): the summary comes back from MLflow, nothing is trained.
    (work / "results" / "sweep.json").unlink()
    again = _sweep(work)
    assert again.returncode == 0 and "summary rewritten from MLflow" in again.stdout
    assert json.loads((work / "results" / "sweep.json").read_text())["parent_run_id"] == parent.info.run_id
    assert len(_runs(work)) == len(runs)


def _dvc_project(work: Path, prepared: Path) -> dict[str, str]:
    """A DVC project in ``work`` with one stage, the real sweep stage on ``prepared``; its environment."""
    write_params(work, tiny_params(work, prepared, epochs=4, num_trials=2, ray_start_timeout_s=600))
    (work / "dvc.yaml").write_text(
        "stages:\n  sweep:\n    cmd: python -m pipelines.sweep --params params.yaml\n    params:\n      - sweep\n"
        "    outs:\n      - results/sweep.json:\n          cache: false\n          persist: true\n"
    )
    # DVC runs the stage with $SHELL -c: /bin/sh (dash on Debian) stays between dvc and the driver where bash
    # would replace itself with it, the case in which the driver's parent outlives dvc.
    env = stage_env(DVC_NO_ANALYTICS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]), SHELL="/bin/sh")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=work, env=env, check=True)
    return env


@pytest.mark.slow
def test_sigterm_of_dvc_repro_stops_the_sweep_and_the_rerun_resumes(tmp_path, prepared_32):
    work = tmp_path / "work"
    env = _dvc_project(work, prepared_32)
    log = work / "repro.log"
    dvc = start([sys.executable, "-m", "dvc", "repro"], work, env | {"STUDY_TEST_EPOCH_SLEEP": "2"}, log)
    try:
        # The state file first: a client opening the SQLite store before the driver created it would race its
        # schema migration.
        state_file = work / "ray_results" / "tiny.sweep_state.json"
        wait_for(lambda: state_file.is_file() and any(r.info.status == "RUNNING" and r.data.tags.get("kind") != "sweep"
                                                      for r in _runs(work)),
                 900, "a running trial", proc=dvc, log=log)
        driver_pid = int((work / "ray_results" / "tiny.lock").read_text().strip())
        os.kill(dvc.pid, signal.SIGTERM)  # what `kill -TERM <dvc repro>` does
        dvc.wait(timeout=60)
        wait_for(lambda: not Path(f"/proc/{driver_pid}").exists(), 180, "the sweep driver to stop")
    finally:
        end_session(dvc.pid)
    runs = _runs(work)
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "KILLED" and "interrupted_at" in parents[0].data.tags
    assert "RUNNING" not in {r.info.status for r in runs}
    assert any(r.info.status == "KILLED" and "interrupted_at" in r.data.tags
               for r in runs if r.data.tags.get("kind") != "sweep")
    assert not (work / "results" / "sweep.json").exists()

    again = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming sweep tiny" in again.stdout
    summary = json.loads((work / "results" / "sweep.json").read_text())
    assert summary["resumed"] is True and summary["parent_run_id"] == parents[0].info.run_id
    runs = _runs(work)
    assert [r.info.status for r in runs if r.data.tags.get("kind") == "sweep"] == ["FINISHED"]  # no second sweep
    children = [r for r in runs if r.data.tags.get("kind") != "sweep"]
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
