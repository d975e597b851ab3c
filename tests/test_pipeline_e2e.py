"""The whole study under DVC in a temporary copy of the repository: prepare -> sweep -> report.

Runs the real stages (real CelebA sample, embedded Ray on loopback, Optuna + ASHA, MLflow SQLite store) with a
shrunken params.yaml, then checks MLflow and the report against each other, and DVC's incremental behaviour.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "data/prepared", "results", "reports", "ray_results", "mlflow.db", "mlartifacts",
    "__pycache__", ".pytest_cache", ".hypothesis", "dvc.lock", ".dvc/cache", ".dvc/tmp", "*.pyc",
)


def _copy_repo(dst: Path) -> None:
    shutil.copytree(REPO, dst, ignore=IGNORE)
    for leftover in ("data/prepared", "results", "reports", ".dvc/cache", ".dvc/tmp"):
        shutil.rmtree(dst / leftover, ignore_errors=True)


def _dvc(work: Path, *args: str) -> str:
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
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e") / "study"
    _copy_repo(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare"]["resolution"] = 32
    params["model"].update(latent_dim=16, width=8)
    params["train"].update(epochs=6, batch_size=8, grid_size=8)
    # One trial at a time makes the order, and so ASHA's decisions, reproducible.
    params["sweep"].update(num_trials=6, max_concurrent=1)
    params["sweep"]["scheduler"].update(grace_period=1, reduction_factor=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    first = _dvc(work, "repro")
    return work, params, first


def _client(work: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


@pytest.mark.slow
def test_sweep_runs_on_loopback_and_fills_mlflow(study):
    work, params, log = study
    summary = json.loads((work / "results" / "sweep.json").read_text())
    assert summary["ray_node_addresses"] and set(summary["ray_node_addresses"]) == {"127.0.0.1"}

    from study.data.store import data_fingerprint

    client = _client(work)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["kind"] == "sweep" and parent.info.status == "FINISHED"
    children = client.search_runs(
        [summary["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) >= 4
    epochs = params["train"]["epochs"]
    for run in children:
        assert run.info.status == "FINISHED"
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["data_sha256"] == data_fingerprint(work / "data" / "prepared" / "celeba")
        assert tags["likelihood_family"] == "gaussian" and tags["elbo_valid"] == "true"
        assert {"val_elbo", "val_kl", "val_mse_255", "train_elbo"} <= set(metrics)
        history = client.get_metric_history(run.info.run_id, "val_elbo")
        assert [m.step for m in history] == list(range(1, int(tags["epochs_run"]) + 1))
        assert run.data.params["train.epochs"] == str(epochs)
        assert "train.beta" in run.data.params and "likelihood.gaussian.sigma_mode" in run.data.params
        artifacts = {a.path for d in ("images", "config", "checkpoint") for a in client.list_artifacts(run.info.run_id, d)}
        assert {"images/reconstructions.png", "images/samples.png", "config/trial_config.yaml",
                "checkpoint/model.pt"} <= artifacts
    stopped = [r for r in children if r.data.tags["early_stopped"] == "true"]
    assert stopped, "ASHA stopped no trial early"
    assert all(int(r.data.tags["epochs_run"]) < epochs for r in stopped)
    assert summary["num_early_stopped"] == len(stopped)


@pytest.mark.slow
def test_report_agrees_with_mlflow(study):
    work, _, _ = study
    summary = json.loads((work / "results" / "sweep.json").read_text())
    children = _client(work).search_runs(
        [summary["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'"
    )
    by_id = {r.info.run_id: r for r in children}
    trials = pd.read_csv(work / "reports" / "trials.csv")
    assert set(trials["run_id"]) == set(by_id)
    for _, row in trials.iterrows():
        run = by_id[row["run_id"]]
        assert row["val_elbo"] == pytest.approx(run.data.metrics["val_elbo"])
        assert row["status"] == run.info.status
        assert str(row["trial_id"]) == run.data.tags["ray_trial_id"]
    best_id = max(by_id, key=lambda i: by_id[i].data.metrics["val_elbo"])
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    assert metrics["best"]["run_id"] == best_id
    assert metrics["best"]["val_elbo"] == pytest.approx(by_id[best_id].data.metrics["val_elbo"])
    assert metrics["num_trials"] == len(children)
    assert best_id in (work / "reports" / "summary.md").read_text()
    assert (work / "reports" / "best_reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = json.loads(_dvc(work, "metrics", "show", "--json"))
    assert json.dumps(metrics["best"]["val_elbo"])[:8] in json.dumps(shown)


@pytest.mark.slow
def test_dvc_reruns_only_what_changed(study):
    work, params, _ = study
    assert "Data and pipelines are up to date" in _dvc(work, "repro")
    params["sweep"]["searcher"]["seed"] = 1
    params["sweep"]["num_trials"] = 2  # any sweep param; fewer trials keep the re-run short
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = _dvc(work, "repro")
    assert "Stage 'prepare' didn't change, skipping" in log
    assert "Running stage 'sweep'" in log and "Running stage 'report'" in log
