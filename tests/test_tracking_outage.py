"""A tracking server that goes away mid-sweep: the real ``python -m pipelines.sweep`` in a subprocess, real Ray
(loopback) and a real ``mlflow server`` on 127.0.0.1 that the test kills and starts again on the same port and
backend store.

- an outage the sweep outlives: the trials finish while the server is down, the console says once that it does
  not answer and once that it is back, and afterwards MLflow holds every epoch of every trial, FINISHED;
- an outage longer than ``tracking.outage_budget_s``: one ``error:`` line naming the setting, and the re-run
  (server back) resumes the sweep and brings MLflow up to date: every epoch once, every run FINISHED.

MLflow's own HTTP retry budget is shortened through its documented settings (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``), so a failed write is seen in seconds rather than minutes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sweep_support import (
    child_runs, end_session, free_port, http_answers, stage_env, start, steps, tiny_params, wait_for, write_params,
)

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:``port`` with a SQLite backend under ``root``, stopped and started again on
    the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # MLflow's job runner (a pool of task consumers) is not needed for tracking.
        env = stage_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = start(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
             str(self.root / "artifacts"), "--workers", "1"],
            self.root, env, self.root / "mlflow.log",
        )
        try:
            wait_for(lambda: http_answers(f"{self.url}/health"), 300, "the MLflow server", proc=self.proc,
                     log=self.root / "mlflow.log")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            end_session(self.proc.pid)
            self.proc = None
        wait_for(lambda: not http_answers(f"{self.url}/health"), 30, "the MLflow server to stop")


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "mlflow"
    root.mkdir()
    srv = MlflowServer(root)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _env(epoch_sleep: str) -> dict[str, str]:
    # No retries inside MLflow's client and a short timeout: the sweep's writer does the retrying.
    return stage_env(STUDY_TEST_EPOCH_SLEEP=epoch_sleep, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                     MLFLOW_HTTP_REQUEST_TIMEOUT="5")


def _setup(tmp_path: Path, prepared: Path, server: MlflowServer, budget_s: float) -> Path:
    work = tmp_path / "work"
    # A long Ray start-up wait: these tests share a loaded CI machine.
    params = tiny_params(work, prepared, epochs=EPOCHS, num_trials=2, max_concurrent=2, ray_start_timeout_s=600)
    params["tracking"] = {"uri": server.url, "outage_budget_s": budget_s}
    write_params(work, params)
    return work


def _client(server: MlflowServer):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.url)


def _runs(server: MlflowServer) -> tuple[object, list]:
    client = _client(server)
    experiment = client.get_experiment_by_name("vae-blur-study")
    parents = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1
    return parents[0], child_runs(client, experiment.experiment_id, parents[0].info.run_id)


def _epoch_one_logged(server: MlflowServer) -> bool:
    client = _client(server)
    experiment = client.get_experiment_by_name("vae-blur-study")
    if experiment is None:
        return False
    children = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("kind") != "sweep"]
    return len(children) == 2 and all(steps(client, r.info.run_id) for r in children)


def _assert_complete(server: MlflowServer) -> None:
    """Every trial's run FINISHED with each epoch's metrics exactly once; the parent FINISHED."""
    client = _client(server)
    parent, children = _runs(server)
    assert parent.info.status == "FINISHED"
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags
        assert run.data.tags["epochs_run"] == str(EPOCHS)
        for metric in ("val_elbo", "train_elbo", "epoch_seconds", "beta"):
            assert steps(client, run.info.run_id, metric) == list(range(1, EPOCHS + 1)), metric
        assert "checkpoint/state.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}


def _lines(log: Path, text: str) -> list[str]:
    """The console lines holding ``text`` (a progress bar redraws with carriage returns: those end lines too)."""
    return [line for line in re.split(r"[\r\n]", log.read_text()) if text in line]


def _finished(log: Path) -> int:
    """How many trials the console reported finished (study.sweep_console: 'trial <id> finished 4/4 epochs')."""
    return len(set(re.findall(r"trial (\w+) finished \d+/\d+ epochs", log.read_text())))


@pytest.mark.slow
def test_trials_train_through_an_outage_and_mlflow_catches_up(tmp_path, prepared_32, server):
    work = _setup(tmp_path, prepared_32, server, budget_s=300)
    log = work / "driver.log"
    driver = start([sys.executable, "-m", "pipelines.sweep", "--params", str(work / "params.yaml")], REPO,
                   _env("2"), log)
    try:
        wait_for(lambda: _epoch_one_logged(server), 900, "both trials' first epoch in MLflow", proc=driver, log=log)
        server.stop()
        # Both trials finish while the server is down: training does not wait on it.
        wait_for(lambda: _finished(log) == 2, 600, "both trials to finish during the outage",
                 proc=driver, log=log)
        assert len(_lines(log, "is not answering")) == 1
        assert "tracking.outage_budget_s = 300" in _lines(log, "is not answering")[0]
        server.start()
        assert driver.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        end_session(driver.pid)
    assert len(_lines(log, "is not answering")) == 1 and len(_lines(log, "answers again")) == 1
    _assert_complete(server)
    summary = json.loads((work / "results" / "sweep.json").read_text())
    assert summary["num_trials"] == 2 and {t["status"] for t in summary["trials"]} == {"FINISHED"}


@pytest.mark.slow
def test_outage_past_the_budget_stops_the_sweep_and_the_rerun_completes_mlflow(tmp_path, prepared_32, server):
    work = _setup(tmp_path, prepared_32, server, budget_s=8)
    log = work / "driver.log"
    driver = start([sys.executable, "-m", "pipelines.sweep", "--params", str(work / "params.yaml")], REPO,
                   _env("10"), log)
    try:
        wait_for(lambda: _epoch_one_logged(server), 900, "both trials' first epoch in MLflow", proc=driver, log=log)
        server.stop()
        rc = driver.wait(timeout=600)
    finally:
        end_session(driver.pid)
    out = log.read_text()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1, out[-4000:]
    assert "tracking.outage_budget_s = 8" in errors[0] and server.url in errors[0] and "re-running" in errors[0]
    assert "Traceback" not in out
    # It stopped on the budget, not when the trials ran out (3 epochs of >= 10 s each were left to train).
    assert _finished(log) < 2
    assert not (work / "results" / "sweep.json").exists()

    server.start()
    parent, children = _runs(server)
    assert parent.info.status == "RUNNING"  # the store was away when the sweep stopped: corrected by the re-run
    rerun = subprocess.run([sys.executable, "-m", "pipelines.sweep", "--params", str(work / "params.yaml")],
                           cwd=REPO, env=_env("0"), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "resuming sweep tiny" in rerun.stdout
    _assert_complete(server)
    summary = json.loads((work / "results" / "sweep.json").read_text())
    assert summary["resumed"] is True and summary["parent_run_id"] == parent.info.run_id


def test_outage_budget_is_validated():
    from study.config import ConfigError, StudyParams

    with pytest.raises((ConfigError, ValueError), match="outage_budget_s"):
        StudyParams.model_validate({"tracking": {"outage_budget_s": 0}})


def _tracker(uri: str, tmp_path: Path):
    from study.config import StudyParams, TrackingConfig
    from study.tracking import SweepTracker, connect

    params = StudyParams.model_validate({})
    client, experiment_id = connect(TrackingConfig(uri=uri, artifact_root=tmp_path / "artifacts"))
    return client, SweepTracker(client, experiment_id, params, "0" * 64), params.base_trial_config()


@pytest.mark.slow
def test_writer_queues_through_an_outage_and_loses_nothing(tmp_path, server, monkeypatch):
    """The writer alone against a real server that goes away and comes back: one line each way, every epoch sent."""
    from study.tracking import TrackingWriter, epoch_metrics

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    client, tracker, config = _tracker(server.url, tmp_path)
    lines: list[str] = []
    writer = TrackingWriter(tracker, server.url, budget_s=900, echo=lines.append)
    writer.call(tracker.start_trial, "t0", {}, config, True)
    writer.log("t0", epoch_metrics({"epoch": 1, "val_elbo": -1.0, "train_elbo": -2.0}), {"hostname": "a"})
    writer.drain()
    server.stop()
    for epoch in range(2, 6):  # queued at once: nothing here waits on the server
        began = time.monotonic()
        writer.log("t0", epoch_metrics({"epoch": epoch, "val_elbo": -float(epoch), "train_elbo": 0.5 * epoch}))
        assert time.monotonic() - began < 0.5
    writer.call(tracker.finish_trial, "t0", "FINISHED", 5)
    wait_for(lambda: writer.outage_s() is not None, 60, "the writer to see the outage")
    assert writer.check() is None and writer.pending() >= 1
    server.start()
    writer.drain()
    writer.close()
    assert [line for line in lines if "is not answering" in line] == lines[:1] and len(lines) == 2
    assert "answers again" in lines[1]
    run = client.get_run(tracker.children["t0"])
    assert run.info.status == "FINISHED" and run.data.tags["epochs_run"] == "5"
    history = sorted(client.get_metric_history(run.info.run_id, "val_elbo"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(e, -float(e)) for e in range(1, 6)]


def test_catch_up_logs_missed_epochs_and_corrects_the_state(tmp_path):
    """Ray's record of a trial (its result.json lines) fills in what MLflow lacks, once."""
    client, tracker, config = _tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    run_id = tracker.start_trial("t0", {}, config, True)
    tracker.log_epoch("t0", {"epoch": 1, "val_elbo": -10.0, "epoch_seconds": 1.0})
    rows = [{"epoch": e, "val_elbo": -10.0 / e, "epoch_seconds": 1.0, "timestamp": 1_700_000_000 + e}
            for e in (1, 2, 3)]
    rows.append(dict(rows[-1], val_elbo=-1.0))  # epoch 3 reported again after a restore: the later one counts

    def start() -> str:
        raise AssertionError("the run exists: nothing to create")

    assert tracker.catch_up("t0", rows, "FINISHED", 3, start) == (2, True)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["epochs_run"] == "3"
    history = sorted(client.get_metric_history(run_id, "val_elbo"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, -10.0), (2, -5.0), (3, -1.0)]
    assert history[1].timestamp == (1_700_000_000 + 2) * 1000
    assert tracker.catch_up("t0", rows, "FINISHED", 3, start) == (0, False)  # nothing left to do
