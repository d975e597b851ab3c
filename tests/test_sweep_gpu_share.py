"""Several trials per GPU through Ray's fractional GPU resources, checked with real Ray, Optuna and MLflow.

This machine has no GPU, so the embedded Ray (loopback) is told it has one (``num_gpus=1``): Ray's scheduler
then packs trials by their ``resources_per_trial.gpu`` share exactly as on a GPU machine and hands each the GPU
id it shares; torch finds no CUDA device, so the trials train on the CPU (their ``device`` tag says so). The
test asserts the scheduling: with gpu 0.5 two trials hold the one GPU at the same time, with gpu 1 they take
turns.
"""

from __future__ import annotations

import pytest

from study.config import parse_params
from tests.sweep_support import child_runs, tiny_params

pytest.importorskip("study.sweep")


@pytest.fixture(scope="module")
def ray_with_one_gpu():
    import ray

    from study.sweep_ray import init_ray, node_addresses

    if ray.is_initialized():  # another module's Ray: this one needs its declared GPU
        ray.shutdown()
    init_ray(num_cpus=2, num_gpus=1)
    assert set(node_addresses()) == {"127.0.0.1"}
    assert ray.cluster_resources().get("GPU") == 1
    yield
    ray.shutdown()


def _epoch_times(client, run_id: str) -> list[int]:
    """Wall-clock ms at which the trial reported each epoch (MLflow stores each metric's timestamp)."""
    return sorted(m.timestamp for m in client.get_metric_history(run_id, "val_elbo"))


@pytest.mark.slow
@pytest.mark.parametrize(("gpu", "concurrent"), [(0.5, True), (1.0, False)], ids=["half-gpu", "whole-gpu"])
def test_fractional_gpu_shares_let_trials_run_together(tmp_path, prepared_32, ray_with_one_gpu, monkeypatch,
                                                      gpu, concurrent):
    from mlflow.tracking import MlflowClient

    from study.sweep import run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("STUDY_TEST_EPOCH_SLEEP", "2")  # epochs long enough for the trials' lives to overlap
    raw = tiny_params(tmp_path, prepared_32, epochs=3, num_trials=2, max_concurrent=2,
                      resources_per_trial={"cpu": 0.5, "gpu": gpu})
    summary = run_sweep(parse_params(raw), workdir=tmp_path)
    assert summary["num_trials"] == 2 and summary["num_failed"] == 0

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["ray_gpu_ids"] == "0"  # both trials were given the one GPU
        assert run.data.tags["device"] == "cpu"  # no CUDA driver here; on a GPU machine this is cuda
    (a_first, *_, a_last), (b_first, *_, b_last) = (_epoch_times(client, r.info.run_id) for r in runs)
    overlap = a_first < b_last and b_first < a_last
    assert overlap == concurrent, (a_first, a_last, b_first, b_last)
