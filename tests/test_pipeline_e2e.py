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

from tests.dvc_support import REPO, _copy_repo, _dvc  # noqa: F401 (used by other test modules too)


@pytest.fixture(scope="module")
def study(dvc_study):
    """The end-to-end study (tests/conftest.py ``dvc_study``: one ``dvc repro`` in a copy of the repository, shared
    with tests/test_rejected_edits.py)."""
    return dvc_study


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
                "checkpoint/state.pt", "checkpoint/config.yaml"} <= artifacts
    stopped = [r for r in children if r.data.tags["early_stopped"] == "true"]
    assert stopped, "ASHA stopped no trial early"
    assert all(int(r.data.tags["epochs_run"]) < epochs for r in stopped)
    assert summary["num_early_stopped"] == len(stopped)


@pytest.mark.slow
def test_both_datasets_prepared_by_their_own_stages(study):
    work, _, log = study
    assert "Running stage 'prepare@celeba'" in log and "Running stage 'prepare@lsun_church'" in log
    from study.data.store import read_manifest

    church = read_manifest(work / "data" / "prepared" / "lsun_church")
    assert church["dataset"] == "lsun_church_outdoor" and church["splits"]["test"]["count"] == 5
    assert church["splits"]["train"]["count"] + church["splits"]["val"]["count"] == 38


@pytest.mark.slow
def test_report_agrees_with_mlflow(study):
    work, _, log = study
    summary = json.loads((work / "results" / "sweep.json").read_text())
    # The report stage's last lines say where to look: its files and the sweep's run in the MLflow UI.
    tail = log[log.index("where to look next:"):]
    assert "summary.md" in tail and "figures" in tail and "mlflow ui" in tail and summary["parent_run_id"] in tail
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
    shown = json.loads(_dvc(work, "metrics", "show", "--json", stdout_only=True))
    assert json.dumps(metrics["best"]["val_elbo"])[:8] in json.dumps(shown)


@pytest.mark.slow
def test_evaluate_stage_logs_test_metrics_and_report_has_paper_tables(study):
    work, _, _ = study
    summary = json.loads((work / "results" / "sweep.json").read_text())
    evaluation = json.loads((work / "reports" / "evaluation" / "summary.json").read_text())
    assert set(evaluation["arms"]) == set(summary["best_per_variant"])
    client = _client(work)
    for arm, result in evaluation["arms"].items():
        assert result["run_id"] == summary["best_per_variant"][arm]["run_id"]
        run = client.get_run(result["run_id"])
        for name in ("test_mse_255", "test_psnr", "test_ssim", "test_nll", "test_avg_kl", "test_variance_loss_recon"):
            assert run.data.metrics[name] == pytest.approx(result["metrics"][name])
        # No local backbone weights here: LPIPS and FID are recorded as unavailable, never as numbers.
        assert "test_lpips" not in run.data.metrics and "test_lpips" in result["unavailable"]
        assert "test_lpips" in run.data.tags["unavailable_metrics"].split(", ")
        diagnostics = json.loads(Path(client.download_artifacts(result["run_id"], "evaluation/diagnostics.json",
                                                                str(work))).read_text())
        assert "alexnet" in diagnostics["unavailable"]["test_lpips"].lower()
        # The test split it was evaluated on is a dataset input of the run, next to the training splits.
        from study.tracking_lineage import dataset_inputs

        inputs = dataset_inputs(run)
        assert {"training", "validation", "evaluation"} <= set(inputs)
        manifest = json.loads((work / "data" / "prepared" / "celeba" / "manifest.json").read_text())
        assert inputs["evaluation"]["digest"] == manifest["splits"]["test"]["sha256"][:16]
        assert result["metrics"]["test_avg_kl"] == pytest.approx(
            result["metrics"]["test_mutual_information"] + result["metrics"]["test_marginal_kl"], abs=1e-6
        )
    tables = work / "reports" / "tables"
    for name in ("dorta_table1", "dorta_table2", "avae", "all_metrics"):
        assert (tables / f"{name}.md").read_text().count("|") > 10 and (tables / f"{name}.csv").is_file()
    table2 = pd.read_csv(tables / "dorta_table2.csv").set_index("run_id")
    table1 = pd.read_csv(tables / "dorta_table1.csv").set_index("run_id")
    for result in evaluation["arms"].values():
        row = table2.loc[result["run_id"]]
        assert row["MSE [0, 255] mean"] == pytest.approx(result["metrics"]["test_mse_255"])
        assert row["MSE [0, 255] std"] == pytest.approx(result["metrics"]["test_mse_255_std"])
        if result["elbo_valid"]:
            assert table1.loc[result["run_id"], "NLL (nats) mean"] == pytest.approx(result["metrics"]["test_nll"])
    for name in ("comparison_grid", "residual_maps", "pareto_mse_sharpness", "variance_loss_vs_mse"):
        assert (work / "reports" / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "Test-set evaluation" in (work / "reports" / "summary.md").read_text()


@pytest.mark.slow
def test_dvc_reruns_only_what_changed(study):
    work, params, _ = study
    assert "Data and pipelines are up to date" in _dvc(work, "repro")
    params["sweep"]["searcher"]["seed"] = 1
    params["sweep"]["num_trials"] = 1  # any sweep param; one trial keeps the re-run short
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = _dvc(work, "repro")
    assert "Stage 'prepare@celeba' didn't change, skipping" in log
    assert "Stage 'prepare@lsun_church' didn't change, skipping" in log
    assert "Running stage 'sweep'" in log and "Running stage 'evaluate'" in log and "Running stage 'report'" in log
