"""Seed replicates end to end through the real stage entry points (subprocesses, as DVC runs them): sweep ->
replicate -> evaluate -> report on a tiny two-arm config (Gaussian, Laplace; 1 trial and 2 seeds each, 2 epochs,
the 32 x 32 sample), checking that MLflow, ``replicates.json``, the evaluation and the report's tables agree, and
the report's intervals and paired test against scipy computed from the stored per-image values."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from tests.sweep_support import REPO, stage_env, tiny_params, write_params

pytestmark = pytest.mark.slow

ARMS, SEEDS, SEARCH_SEED = ("gaussian", "laplace"), 2, 3


@pytest.fixture(scope="module")
def study(tmp_path_factory, prepared_32):
    work = tmp_path_factory.mktemp("replicate_e2e")
    raw = tiny_params(work, prepared_32, epochs=2, num_trials=1, max_concurrent=2, train={"seed": SEARCH_SEED},
                      variants={arm: {"overrides": {"likelihood.family": arm}} for arm in ARMS},
                      ray_start_timeout_s=600)
    raw["replicate"] = {"num_seeds": SEEDS, "output": str(work / "results" / "replicates.json")}
    raw["evaluate"] = {"output_dir": str(work / "reports" / "evaluation"), "num_importance_samples": 4,
                       "batch_size": 8, "iwae_batch_size": 64, "num_examples": 2}
    raw["report"] = {"output_dir": str(work / "reports"), "baseline": "gaussian"}
    params = write_params(work, raw)
    for stage in ("sweep", "replicate", "evaluate", "report"):
        done = subprocess.run([sys.executable, "-m", f"pipelines.{stage}", "--params", str(params)], cwd=REPO,
                              env=stage_env(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    from mlflow.tracking import MlflowClient

    return work, MlflowClient(tracking_uri=raw["tracking"]["uri"])


def _read(work):
    replicates = json.loads((work / "results" / "replicates.json").read_text())
    evaluation = json.loads((work / "reports" / "evaluation" / "summary.json").read_text())
    with np.load(work / "reports" / "evaluation" / "per_image.npz") as npz:
        per_image = {k: npz[k].astype(np.float64) for k in npz.files}
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    return replicates, evaluation, per_image, metrics


def test_mlflow_replicates_json_and_evaluation_agree(study):
    work, client = study
    replicates, evaluation, per_image, _ = _read(work)
    sweep = json.loads((work / "results" / "sweep.json").read_text())
    assert set(replicates["arms"]) == set(ARMS)
    for arm, record in replicates["arms"].items():
        assert record["trial_run_id"] == sweep["best_per_variant"][arm]["run_id"]
        seeds = [r["seed"] for r in record["replicates"]]
        assert len(set(seeds)) == SEEDS and SEARCH_SEED not in seeds
        evaluated = {r["run_id"]: r for r in evaluation["replicates"][arm]}
        assert set(evaluated) == {r["run_id"] for r in record["replicates"]}
        for rep in record["replicates"]:
            assert rep["status"] == "FINISHED"
            run = client.get_run(rep["run_id"])
            assert run.data.tags["mlflow.parentRunId"] == sweep["parent_run_id"]
            assert run.data.tags["replicate_of"] == record["trial_run_id"]
            assert run.data.tags["seed"] == str(rep["seed"])
            # The evaluate stage logged the replicate's test metrics to its own run: the same numbers.
            test_mse = evaluated[rep["run_id"]]["metrics"]["test_mse_255"]
            assert run.data.metrics["test_mse_255"] == pytest.approx(test_mse, rel=1e-9)
            # Each per-image array averages to the aggregate metric.
            assert per_image[f"{arm}/{rep['run_id']}/mse_255"].mean() == pytest.approx(test_mse, rel=1e-6)
            assert per_image[f"{arm}/{rep['run_id']}/nll"].mean() == pytest.approx(
                evaluated[rep["run_id"]]["metrics"]["test_nll"], rel=1e-6)


def test_report_intervals_and_paired_test_match_scipy(study):
    work, _ = study
    replicates, evaluation, per_image, metrics = _read(work)
    block = metrics["replicates"]
    for arm in ARMS:
        values = np.array([r["metrics"]["test_mse_255"] for r in evaluation["replicates"][arm]])
        low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
        summary = block["arms"][arm]["metrics"]["test_mse_255"]
        assert summary["n"] == SEEDS
        assert summary["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert summary["ci_low"] == pytest.approx(low, rel=1e-9) and summary["ci_high"] == pytest.approx(high, rel=1e-9)

    def seed_mean(arm, metric):
        return np.mean([per_image[f"{arm}/{r['run_id']}/{metric}"] for r in replicates["arms"][arm]["replicates"]],
                       axis=0)

    with open(work / "reports" / "tables" / "paired_comparisons.csv") as fh:
        rows = {(r["metric"], r["arm"]): r for r in csv.DictReader(fh)}
    for metric in ("nll", "mse_255"):
        d = seed_mean("laplace", metric) - seed_mean("gaussian", metric)
        row = rows[(metric, "laplace")]
        assert row["baseline"] == "gaussian" and int(row["images"]) == d.size
        assert float(row["mean_difference"]) == pytest.approx(d.mean(), rel=1e-9)
        low, high = stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=stats.sem(d))
        assert float(row["ci_low"]) == pytest.approx(low, rel=1e-9)
        assert float(row["ci_high"]) == pytest.approx(high, rel=1e-9)
        assert float(row["p_t"]) == pytest.approx(stats.ttest_rel(seed_mean("laplace", metric),
                                                                   seed_mean("gaussian", metric)).pvalue, rel=1e-9)
        assert float(row["p_wilcoxon"]) == pytest.approx(
            stats.wilcoxon(seed_mean("laplace", metric), seed_mean("gaussian", metric)).pvalue, rel=1e-9)
    # The paper tables carry the seed interval: Table 2's MSE cell of each arm names its 2 seeds.
    table2 = (work / "reports" / "tables" / "dorta_table2.md").read_text()
    assert table2.count(f"({SEEDS} seeds)") >= len(ARMS)
