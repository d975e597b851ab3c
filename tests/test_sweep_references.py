"""An arm built on another arm's selected trial (``arm:<name>``): order checks and the download from MLflow."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from study.sweep_references import check_references, referenced_arms, resolve_references


def test_references_must_name_an_earlier_arm():
    overrides = {"gaussian": {"likelihood.family": "gaussian"},
                 "control": {"likelihood.family": "structured", "model.frozen_mean_checkpoint": "arm:gaussian"}}
    assert referenced_arms(overrides["control"]) == ["gaussian"]
    check_references(["gaussian", "control"], overrides)
    with pytest.raises(ValueError, match="must be listed before it"):
        check_references(["control", "gaussian"], overrides)
    with pytest.raises(ValueError, match="does not have"):
        check_references(["control"], {"control": overrides["control"]})


def test_reference_resolves_to_the_selected_trials_checkpoint(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "artifacts").as_uri())
    trials = []
    for index, elbo in enumerate([-10.0, -3.0, -7.0]):  # the second trial is the best by val_elbo (max)
        run = client.create_run(experiment)
        checkpoint = tmp_path / f"ck{index}"
        checkpoint.mkdir()
        (checkpoint / "state.pt").write_text(f"trial {index}")
        client.log_artifacts(run.info.run_id, str(checkpoint), "checkpoint")
        trials.append({"trial_id": f"t{index}", "run_id": run.info.run_id, "variant": "gaussian",
                       "status": "FINISHED", "metric": "val_elbo", "mode": "max", "elbo_valid": True,
                       "family": "gaussian", "metrics": {"val_elbo": elbo}})
    overrides = {"likelihood.family": "structured", "model.frozen_mean_checkpoint": "arm:gaussian"}
    resolved = resolve_references(overrides, trials, client, tmp_path / "refs")
    assert resolved["likelihood.family"] == "structured"
    target = tmp_path / "refs" / "gaussian"
    assert resolved["model.frozen_mean_checkpoint"] == str(target)
    assert (target / "state.pt").read_text() == "trial 1"
    assert trials[1]["run_id"] in (target / "SOURCE").read_text()
    with pytest.raises(RuntimeError, match="no finished trial"):
        resolve_references({"model.frozen_mean_checkpoint": "arm:laplace"}, trials, client, tmp_path / "refs")
