"""The evaluate stage with seed replicates, on real YCbCr CelebA images and checkpoints in a real MLflow store.

Two tiny Gaussian VAEs are trained for one epoch (the selected trial, seed 0, and one replicate, seed 7; their
numbers mean nothing, what is checked is bookkeeping and consistency), logged as child runs of a sweep run with
their ``checkpoint/`` artifacts, and a third replicate is recorded as FAILED. The stage must score the selected
trial and the finished replicate with the same settings, log the replicate's ``test_*`` metrics to its own run,
skip the failed one with its error, and write per-image arrays whose means are the aggregates and whose MSE
equals NumPy's on the reconstructions converted back to RGB against the RGB before the conversion (Dorta et al.
2018 measure MSE that way).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import pipelines.evaluate as evaluate_stage
from study.data.store import load_split
from tests.conftest import SAMPLE, tiny_trial_config
from tests.test_colour_trials import decoder_means, jfif_ycbcr_to_rgb

REPLICATE_SEED = 7


@pytest.fixture(scope="module")
def stage(prepared_ycbcr_32, tmp_path_factory):
    """A sweep summary, a replicates file and an MLflow store holding the runs; the params file of the stage."""
    from mlflow.tracking import MlflowClient

    from study.config import TrackingConfig
    from study.tracking import connect
    from study.train import run_trial

    work = tmp_path_factory.mktemp("evaluate_replicates")
    tracking = TrackingConfig(uri=f"sqlite:///{work / 'mlflow.db'}", artifact_root=work / "mlartifacts",
                              experiment="replicates")
    client, experiment_id = connect(tracking)
    assert isinstance(client, MlflowClient)
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    checkpoints, runs = {}, {}
    for name, seed in (("selected", 0), ("replicate", REPLICATE_SEED), ("failed", 8)):
        run_id = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
        runs[name] = run_id
        if name == "failed":
            client.set_terminated(run_id, "FAILED")
            continue
        run_trial(tiny_trial_config(prepared_ycbcr_32, epochs=1, seed=seed), workdir=work / name)
        checkpoints[name] = work / name / "checkpoint"
        client.log_artifacts(run_id, str(checkpoints[name]), "checkpoint")
        client.set_terminated(run_id, "FINISHED")
    summary = {"sweep": "replicates", "parent_run_id": parent, "experiment_id": experiment_id,
               "best_per_variant": {"gaussian": {"run_id": runs["selected"], "trial_id": "t0"}}}
    (work / "sweep.json").write_text(json.dumps(summary))
    replicates = {
        "sweep": "replicates", "parent_run_id": parent, "num_seeds": 2, "seeds_rule": "test",
        "arms": {"gaussian": {
            "trial_id": "t0", "trial_run_id": runs["selected"], "family": "gaussian", "elbo_valid": True,
            "search_seed": 0, "epochs": 1, "config": {},
            "replicates": [
                {"seed": REPLICATE_SEED, "run_id": runs["replicate"], "trial_id": "r7", "status": "FINISHED",
                 "error": None, "epochs": 1, "metrics": {}},
                {"seed": 8, "run_id": runs["failed"], "trial_id": "r8", "status": "FAILED",
                 "error": "NonFiniteLossError: loss is nan", "epochs": 0, "metrics": {}},
            ]}},
    }
    (work / "replicates.json").write_text(json.dumps(replicates))
    params = {
        "datasets": {"celeba": {"kind": "celeba", "root": str(SAMPLE)}},
        "prepare": {"resolution": 32, "color": "ycbcr", "output_root": str(prepared_ycbcr_32.parent)},
        "sweep": {"dataset": "celeba", "output": str(work / "sweep.json")},
        "tracking": tracking.model_dump(mode="json"),
        "evaluate": {"num_importance_samples": 4, "batch_size": 4, "device": "cpu", "num_examples": 2,
                     "output_dir": str(work / "evaluation")},
    }
    files = {}
    for name, num_seeds, output in (("none", 0, "replicates.json"), ("replicates", 2, "replicates.json"),
                                    ("stale", 2, "stale.json")):
        files[name] = work / f"params_{name}.yaml"
        files[name].write_text(yaml.safe_dump(params | {"replicate": {"num_seeds": num_seeds,
                                                                      "output": str(work / output)}}))
    return SimpleNamespace(work=work, client=client, runs=runs, checkpoints=checkpoints, parent=parent,
                           data=prepared_ycbcr_32, params=files)


@pytest.fixture(autouse=True)
def no_pretrained_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_replicates_file_is_read_defensively(tmp_path):
    path = tmp_path / "replicates.json"
    path.write_text("{}")
    assert evaluate_stage.replicates_file(SimpleNamespace()) is None  # no replicate section in the params
    assert evaluate_stage.replicates_file(SimpleNamespace(replicate=SimpleNamespace(num_seeds=0, output=path))) is None
    missing = SimpleNamespace(replicate=SimpleNamespace(num_seeds=3, output=tmp_path / "absent.json"))
    assert evaluate_stage.replicates_file(missing) is None
    assert evaluate_stage.replicates_file(SimpleNamespace(replicate=SimpleNamespace(num_seeds=3, output=path))) == path


def test_without_replicates_only_the_selected_trial_is_evaluated(stage):
    # num_seeds: 0 ignores even an existing replicates file: the selected trials only, as before replicates
    assert evaluate_stage.main(["--params", str(stage.params["none"])]) == 0
    summary = json.loads((stage.work / "evaluation" / "summary.json").read_text())
    assert "replicates" not in summary and set(summary["arms"]) == {"gaussian"}
    assert "test_mse_255" not in stage.client.get_run(stage.runs["replicate"]).data.metrics


def test_every_finished_replicate_is_evaluated_logged_and_kept_per_image(stage, capsys):
    out = stage.work / "evaluation"
    assert evaluate_stage.main(["--params", str(stage.params["replicates"])]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["replicates"]["gaussian"]
    assert (entry["seed"], entry["run_id"], entry["elbo_valid"]) == (REPLICATE_SEED, stage.runs["replicate"], True)
    assert summary["replicates_skipped"]["gaussian"] == [
        {"seed": 8, "run_id": stage.runs["failed"], "status": "FAILED", "error": "NonFiniteLossError: loss is nan"}]
    logged = stage.client.get_run(stage.runs["replicate"]).data
    for name in ("test_mse_255", "test_nll", "test_psnr", "test_avg_kl"):
        assert logged.metrics[name] == pytest.approx(entry["metrics"][name], rel=1e-12)
    assert "test_lpips" in logged.tags["unavailable_metrics"].split(", ")
    assert not any(k.startswith("test_") for k in stage.client.get_run(stage.runs["failed"]).data.metrics)
    (stage.work / "dl").mkdir(exist_ok=True)
    artifact = stage.client.download_artifacts(stage.runs["replicate"], "evaluation/evaluation.json",
                                               str(stage.work / "dl"))
    evaluation = json.loads(Path(artifact).read_text())
    diagnostics = json.loads(Path(stage.client.download_artifacts(
        stage.runs["replicate"], "evaluation/diagnostics.json", str(stage.work / "dl"))).read_text())
    assert "alexnet" in diagnostics["unavailable"]["test_lpips"].lower()
    assert evaluation["settings"]["seed"] == summary["settings"]["seed"]  # the evaluator's seed, not the trial's

    original = load_split(stage.data, "test_rgb").astype(np.float64)  # (4, 32, 32, 3) RGB before YCbCr, [0, 255]
    with np.load(out / "per_image.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    records = {"selected": summary["arms"]["gaussian"], "replicate": entry}
    for name, record in records.items():
        run_id = record["run_id"]
        nll, mse = arrays[f"gaussian/{run_id}/nll"], arrays[f"gaussian/{run_id}/mse_255"]
        assert nll.shape == mse.shape == (4,) and nll.dtype == np.float64
        assert nll.mean() == pytest.approx(record["metrics"]["test_nll"], rel=1e-12)
        assert mse.mean() == pytest.approx(record["metrics"]["test_mse_255"], rel=1e-12)
        assert arrays[f"gaussian/{run_id}/psnr"].mean() == pytest.approx(record["metrics"]["test_psnr"], rel=1e-12)
        recon = np.clip(jfif_ycbcr_to_rgb(decoder_means(stage.checkpoints[name], stage.data, "test")), 0, 1) * 255.0
        expected = ((recon - original) ** 2).mean(axis=(1, 2, 3))  # per image, RGB against the pre-YCbCr RGB
        np.testing.assert_allclose(mse, expected, rtol=1e-4)
    assert not np.allclose(arrays[f"gaussian/{stage.runs['selected']}/mse_255"],
                           arrays[f"gaussian/{stage.runs['replicate']}/mse_255"])  # two different models
    assert "evaluated gaussian (run " + stage.runs["replicate"] in capsys.readouterr().out


def test_replicates_of_another_sweep_are_refused(stage, capsys):
    stale = json.loads((stage.work / "replicates.json").read_text()) | {"parent_run_id": "another-sweep"}
    (stage.work / "stale.json").write_text(json.dumps(stale))
    previous = stage.work / "evaluation" / "summary.json"
    before = previous.read_bytes() if previous.exists() else None
    assert evaluate_stage.main(["--params", str(stage.params["stale"])]) == 1
    assert "another-sweep" in capsys.readouterr().err
    assert (previous.read_bytes() if previous.exists() else None) == before  # the previous evaluation stays
