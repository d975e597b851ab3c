"""Sweeps that survive failures and resume, PBT and multi-objective search, with real Ray, Optuna and MLflow.

Everything runs on loopback: an embedded Ray (127.0.0.1) and a local SQLite MLflow store. Failures are real:
a trial forced to a non-finite loss (test hook), a trial's worker process killed with SIGKILL, the sweep's
driver process killed with SIGKILL and run again.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study.config import ConfigError, parse_params
from tests.sweep_support import (
    child_runs,
    end_session,
    free_port,
    read_json,
    stage_env,
    start,
    steps,
    tiny_params,
    wait_for,
    write_params,
)

# study.sweep first: it sets Ray's environment switches (loopback, no usage stats) before Ray is imported.
pytest.importorskip("study.sweep")


def _client(work: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


@pytest.fixture(scope="module")
def embedded_ray():
    """One embedded Ray (loopback) for the in-process sweeps of this module, shut down afterwards."""
    import ray

    from study.sweep_ray import init_ray, node_addresses

    init_ray()
    assert set(node_addresses()) == {"127.0.0.1"}
    yield
    ray.shutdown()


@pytest.fixture()
def no_env_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for var in ("STUDY_TEST_NAN_TRIAL", "STUDY_TEST_NAN_EPOCH", "STUDY_TEST_PID_DIR", "STUDY_TEST_EPOCH_SLEEP"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------------------ validation
PBT = {"kind": "pbt", "mutations": {"train.beta": {"distribution": "loguniform", "low": 0.1, "high": 10}}}
RANDOM = {"kind": "random"}
UNIFORM = {"distribution": "uniform", "low": 0, "high": 1}
TWO = [{"metric": "a", "mode": "min"}, {"metric": "b", "mode": "max"}]


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"scheduler": {"kind": "pbt"}}, "needs 'mutations'"),
        ({"scheduler": PBT}, "needs searcher.kind random"),
        ({"scheduler": {"kind": "asha", "mutations": PBT["mutations"]}}, "only apply to scheduler.kind pbt"),
        ({"searcher": RANDOM, "scheduler": PBT | {"mutations": {"train.lr": UNIFORM}}}, "cannot mutate"),
        ({"searcher": RANDOM, "scheduler": PBT | {"perturbation_interval": 0}}, "perturbation_interval"),
        ({"searcher": RANDOM, "scheduler": PBT | {"quantile_fraction": 0.9}}, "quantile_fraction"),
        ({"objectives": [{"metric": "val_mse_255", "mode": "min"}]}, "two or more different metrics"),
        ({"objectives": [{"metric": "val_mse_255", "mode": "min"}, {"metric": "val_mse_255", "mode": "max"}]},
         "two or more different metrics"),
        ({"objectives": [{"metric": "val_mse_255", "mode": "min"}, {"metric": "val_sharpness_ratio", "mode": "up"}]},
         "sweep.objectives.1.mode"),
        ({"searcher": RANDOM, "objectives": TWO}, "need searcher.kind optuna"),
        ({"searcher": {"sampler": "cmaes"}}, "sweep.searcher.sampler"),
        ({"searcher": {"seed": "zero"}}, "sweep.searcher.seed"),
        ({"num_trials": 0}, "sweep.num_trials"),
        ({"max_failures": -2}, "sweep.max_failures"),
        ({"max_concurrent": 0}, "sweep.max_concurrent"),
        ({"scheduler": {"grace_period": 0}}, "sweep.scheduler.grace_period"),
        ({"scheduler": {"reduction_factor": 1}}, "sweep.scheduler.reduction_factor"),
        ({"resources_per_trial": {"cpu": 0}}, "sweep.resources_per_trial.cpu"),
        ({"resources_per_trial": {"custom": {"node_a": 0}}}, "sweep.resources_per_trial.custom"),
        ({"searcher": RANDOM, "search_space": {"train.beta": UNIFORM | {"when": {"likelihood.family": ["gaussian"]}}}},
         "conditional"),
    ],
)
def test_search_settings_are_validated(sweep, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"sweep": sweep})


def test_mutation_paths_must_exist_and_numbers_mean_constant_schedules():
    params = parse_params({"sweep": {"searcher": {"kind": "random"}, "scheduler": PBT | {
        "mutations": {"train.betta": {"distribution": "uniform", "low": 0, "high": 1}}}}})
    with pytest.raises(ConfigError, match="train.betta"):
        params.sweep.check_paths(params.base_trial_config())

    from study.sweep_space import resolve_overrides

    base = parse_params({"likelihood": {"family": "structured"}}).base_trial_config()
    config = resolve_overrides(base, {"likelihood.structured.variance_minimiser_alpha": 50.0, "train.beta": 2.0})
    assert config.likelihood.structured.variance_minimiser_alpha.model_dump() == {"kind": "constant", "value": 50.0}
    assert config.train.beta == 2.0
    with pytest.raises(ConfigError, match="train.beta"):
        resolve_overrides(base, {"train.beta": -1.0})


def test_unreachable_mlflow_server_fails_fast(tmp_path, prepared_32, no_env_tracking):
    from pipelines.sweep import main
    from study.config import TrackingConfig
    from study.tracking import TrackingUnavailableError, connect

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(TrackingUnavailableError, match="did not answer"):
        connect(TrackingConfig(uri=uri))
    assert time.perf_counter() - started < 15

    params = tiny_params(tmp_path, prepared_32)
    params["tracking"]["uri"] = uri
    path = write_params(tmp_path, params)
    started = time.perf_counter()
    assert main(["--params", str(path)]) == 1
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "ray_results").exists()  # failed before Ray or any trial started


# ------------------------------------------------------------------------------------ in-process sweeps
@pytest.mark.slow
def test_non_finite_trial_fails_with_reason_and_the_sweep_goes_on(tmp_path, prepared_32, embedded_ray, no_env_tracking):
    from study.sweep import run_sweep

    no_env_tracking.setenv("STUDY_TEST_NAN_TRIAL", "_2_")  # the second trial Tune creates
    params = parse_params(tiny_params(tmp_path, prepared_32))
    summary = run_sweep(params, workdir=tmp_path)

    assert summary["num_trials"] == 3 and summary["num_failed"] == 1
    client = _client(tmp_path)
    runs = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert len(runs) == 3
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1
    tags = failed[0].data.tags
    assert "NonFiniteLossError" in tags["failure_reason"] and "epoch 2" in tags["failure_reason"]
    assert tags["ray_failures"] == "1"  # restarted once from its epoch-1 checkpoint, failed the same way
    assert steps(client, failed[0].info.run_id) == [1]  # the restart did not log epoch 1 again
    for run in runs:
        if run is not failed[0]:
            assert run.info.status == "FINISHED" and run.data.tags["epochs_run"] == "3"
            assert run.data.tags["ray_gpu_ids"] == "none" and run.data.tags["device"] == "cpu"  # gpu: 0 hides GPUs
            assert steps(client, run.info.run_id) == [1, 2, 3]
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    state = json.loads((tmp_path / "ray_results" / "tiny.sweep_state.json").read_text())
    assert state["status"] == "finished" and state["parent_run_id"] == summary["parent_run_id"]


@pytest.mark.slow
def test_pbt_mutates_beta_and_alpha_and_logs_them_as_metrics(tmp_path, prepared_32, embedded_ray, no_env_tracking):
    from study.sweep import run_sweep

    # Asynchronous PBT compares live trials only: slow epochs keep both alive together despite start skew.
    # Ranked by the training loss, which beta and alpha weigh (a tiny model's ELBOs are too close to order).
    no_env_tracking.setenv("STUDY_TEST_EPOCH_SLEEP", "3")
    raw = tiny_params(
        tmp_path, prepared_32, epochs=5, num_trials=2, max_concurrent=2, metric="train_loss", mode="min",
        likelihood={"family": "structured"},
        searcher={"kind": "random", "seed": 3},
        scheduler={
            "kind": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, "resample_probability": 0.5,
            "mutations": {
                "train.beta": {"distribution": "loguniform", "low": 0.1, "high": 10.0},
                "likelihood.structured.variance_minimiser_alpha": {
                    "distribution": "loguniform", "low": 1.0, "high": 1000.0},
            },
        },
        search_space={},
    )
    summary = run_sweep(parse_params(raw), workdir=tmp_path)
    assert summary["scheduler"] == "pbt" and summary["num_failed"] == 0 and summary["num_trials"] == 2

    client = _client(tmp_path)
    runs = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert len(runs) == 2
    changed = []
    for run in runs:
        assert run.info.status == "FINISHED"
        beta = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "beta"), key=lambda m: m.timestamp)]
        alpha = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "variance_minimiser_alpha"),
                                         key=lambda m: m.timestamp)]
        mutated = client.get_metric_history(run.info.run_id, "pbt.train.beta")
        assert len(beta) >= 5 and len(alpha) == len(beta) and len(mutated) == len(beta)
        assert all(a > 0 for a in alpha)  # the sampled alpha became a constant schedule, applied every epoch
        if len(set(beta)) > 1:
            changed.append((beta, alpha))
        # The logged param is the initial value; the metric history carries the mutations.
        assert float(run.data.params["train.beta"]) == pytest.approx(beta[0])
    assert changed, "PBT never exploited and mutated a trial"
    assert any(len(set(alpha)) > 1 for _, alpha in changed)


def _brute_force_front(trials: list[dict], objectives: list[dict]) -> set[str]:
    """Trial ids of the finished trials that no other finished trial dominates: no worse on every objective (in
    its mode) and strictly better on one, checked pair by pair."""
    finished = [t for t in trials if t["status"] == "FINISHED"
                and all(math.isfinite(t["metrics"].get(o["metric"], math.nan)) for o in objectives)]

    def no_worse(a: float, b: float, mode: str) -> bool:
        return a <= b if mode == "min" else a >= b

    front = set()
    for t in finished:
        dominated = False
        for other in finished:
            if other is t:
                continue
            pairs = [(other["metrics"][o["metric"]], t["metrics"][o["metric"]], o["mode"]) for o in objectives]
            if all(no_worse(a, b, mode) for a, b, mode in pairs) and any(a != b for a, b, _ in pairs):
                dominated = True
        if not dominated:
            front.add(t["trial_id"])
    return front


@pytest.mark.slow
def test_two_objective_sweep_reports_its_pareto_front(tmp_path, prepared_32, embedded_ray, no_env_tracking):
    from study.report import write_report
    from study.sweep import run_sweep

    raw = tiny_params(
        tmp_path, prepared_32, epochs=2, num_trials=4,
        objectives=[{"metric": "val_mse_255", "mode": "min"}, {"metric": "val_sharpness_ratio", "mode": "max"}],
        searcher={"kind": "optuna", "sampler": "nsga2", "seed": 0},
        scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        search_space={
            "train.beta": {"distribution": "loguniform", "low": 0.01, "high": 10.0},
            "likelihood.gaussian.sigma_mode": {"distribution": "categorical", "choices": ["fixed", "learned_global"]},
        },
    )
    summary = run_sweep(parse_params(raw), workdir=tmp_path)
    assert summary["num_trials"] == 4
    assert summary["objectives"][0] == {"metric": "val_mse_255", "mode": "min"}
    front = set(summary["pareto_front"])
    assert front and front == _brute_force_front(summary["trials"], summary["objectives"])

    write_report(summary, tmp_path / "reports", _client(tmp_path))
    text = (tmp_path / "reports" / "pareto_front.md").read_text()
    for trial_id in front:
        assert trial_id in text
    assert "val_mse_255" in text and "val_sharpness_ratio" in text
    assert (tmp_path / "reports" / "figures" / "pareto_objectives.png").read_bytes()[:4] == b"\x89PNG"
    assert "Pareto front" in (tmp_path / "reports" / "summary.md").read_text()


# ------------------------------------------------------------------------------------ killed processes
def _stage(work: Path, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    return start([sys.executable, "-m", "pipelines.sweep", "--params", "params.yaml", *args], work, env, log)


@pytest.mark.slow
def test_killed_worker_resumes_its_trial_from_the_checkpoint(tmp_path, prepared_32):
    epochs = 5
    progress = tmp_path / "progress"
    progress.mkdir()
    write_params(tmp_path, tiny_params(tmp_path, prepared_32, epochs=epochs, num_trials=2, max_failures=2))
    env = stage_env(STUDY_TEST_PID_DIR=str(progress), STUDY_TEST_EPOCH_SLEEP="1.5")
    log = tmp_path / "sweep.log"
    proc = _stage(tmp_path, env, log)
    try:
        def a_trial_at_epoch_2():
            for path in progress.glob("*.json"):
                info = read_json(path)
                if info and info["epoch"] >= 2:
                    return path.stem, info
            return None

        trial_id, before = wait_for(a_trial_at_epoch_2, 300, "a trial at epoch 2", proc=proc, log=log)
        os.kill(before["pid"], signal.SIGKILL)  # the trial's worker process, mid-training
        assert proc.wait(timeout=420) == 0, log.read_text()[-4000:]
    finally:
        end_session(proc.pid)

    after = read_json(progress / f"{trial_id}.json")
    assert after["pid"] != before["pid"]  # a new worker process ran the rest
    assert after["start_epoch"] >= before["epoch"]  # ... from the checkpoint, not from epoch 1
    assert after["epoch"] == epochs

    summary = json.loads((tmp_path / "results" / "sweep.json").read_text())
    assert summary["num_failed"] == 0 and summary["num_trials"] == 2
    client = _client(tmp_path)
    runs = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert sorted(r.data.tags["ray_trial_id"] for r in runs) == sorted(t["trial_id"] for t in summary["trials"])
    killed = next(r for r in runs if r.data.tags["ray_trial_id"] == trial_id)
    assert killed.info.status == "FINISHED"
    assert killed.data.tags["ray_failures"] == "1" and killed.data.tags["epochs_run"] == str(epochs)
    assert steps(client, killed.info.run_id) == list(range(1, epochs + 1))  # one run, epochs continued


@pytest.mark.slow
def test_killed_driver_resumes_the_sweep_without_duplicate_runs(tmp_path, prepared_32):
    epochs, num_trials = 3, 4
    write_params(tmp_path, tiny_params(tmp_path, prepared_32, epochs=epochs, num_trials=num_trials))
    env = stage_env(STUDY_TEST_EPOCH_SLEEP="1")
    log = tmp_path / "sweep.log"
    state_path = tmp_path / "ray_results" / "tiny.sweep_state.json"
    client = _client(tmp_path)

    proc = _stage(tmp_path, env, log)
    try:
        state = wait_for(lambda: read_json(state_path), 120, "the sweep's state file", proc=proc, log=log)

        def finished_trials():
            runs = child_runs(client, state["experiment_id"], state["parent_run_id"])
            done = [r for r in runs if r.info.status == "FINISHED"]
            return len(done) >= 1 and len(done) < num_trials and any(r.info.status == "RUNNING" for r in runs)

        wait_for(finished_trials, 300, "one finished and one running trial", poll_s=0.3, proc=proc, log=log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, and the embedded Ray it started
        proc.wait(timeout=30)
        end_session(proc.pid)
    first = child_runs(client, state["experiment_id"], state["parent_run_id"])
    finished_before = {r.data.tags["ray_trial_id"] for r in first if r.info.status == "FINISHED"}
    assert finished_before and len(finished_before) < num_trials

    second = _stage(tmp_path, env, log)
    try:
        assert second.wait(timeout=420) == 0, log.read_text()[-4000:]
    finally:
        end_session(second.pid)
    assert "resuming sweep tiny" in log.read_text()

    summary = json.loads((tmp_path / "results" / "sweep.json").read_text())
    assert summary["parent_run_id"] == state["parent_run_id"] and summary["resumed"]
    assert summary["num_trials"] == num_trials and summary["num_failed"] == 0
    runs = child_runs(client, state["experiment_id"], state["parent_run_id"])
    trial_ids = [r.data.tags["ray_trial_id"] for r in runs]
    assert len(trial_ids) == len(set(trial_ids)) == num_trials  # every trial exactly once
    assert set(trial_ids) == {t["trial_id"] for t in summary["trials"]}
    assert finished_before <= set(trial_ids)  # finished trials were kept, not run again
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["epochs_run"] == str(epochs)
        assert steps(client, run.info.run_id) == list(range(1, epochs + 1))
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
