"""Checkpoints by time and need (``train.checkpoint_interval_s``, the last epoch, the scheduler's epochs), metrics
every epoch; the PNG grids written without torchvision; a killed sweep trial loses at most the interval; every
MLflow artifact of a trial is there at its end."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from study.train import CheckpointPolicy, make_grid, run_trial, save_image
from tests.conftest import tiny_trial_config
from tests.sweep_support import (
    child_runs,
    end_session,
    read_json,
    stage_env,
    start,
    steps,
    tiny_params,
    wait_for,
    write_params,
)

CHECKPOINT_FILES = ["config.yaml", "metrics.json", "reconstructions.png", "samples.png", "state.pt"]


# ------------------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize(("count", "channels", "nrow", "pad_value"), [(1, 3, 8, 0.0), (5, 3, 2, 1.0), (16, 1, 8, 1.0),
                                                                      (7, 3, 8, 0.5), (3, 1, 1, 0.0)])
def test_grids_equal_torchvision(count, channels, nrow, pad_value, tmp_path):
    """make_grid / save_image give torchvision.utils' tensors and PNG pixels, on random images and 3-d grids."""
    from torchvision.utils import make_grid as tv_grid
    from torchvision.utils import save_image as tv_save

    images = torch.rand(count, channels, 9, 7, generator=torch.Generator().manual_seed(count))
    assert torch.equal(make_grid(images, nrow=nrow, padding=2, pad_value=pad_value),
                       tv_grid(images, nrow=nrow, padding=2, pad_value=pad_value))
    for name, arg in (("batch", images), ("grid", tv_grid(images, nrow=nrow, padding=3, pad_value=pad_value))):
        save_image(arg, tmp_path / f"ours-{name}.png", nrow=nrow, padding=2, pad_value=pad_value)
        tv_save(arg, tmp_path / f"tv-{name}.png", nrow=nrow, padding=2, pad_value=pad_value)
        ours, theirs = (np.asarray(Image.open(tmp_path / f"{who}-{name}.png")) for who in ("ours", "tv"))
        assert ours.dtype == theirs.dtype == np.uint8 and np.array_equal(ours, theirs), name


# ------------------------------------------------------------------------------------------------ policy
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seed", range(5))
def test_policy_loses_at_most_the_interval_with_steady_epochs(seed):
    """Simulated runs of steady epochs (random length, interval, horizon): at every moment the time since the
    last checkpoint is at most the interval (or one epoch where an epoch is longer), the last epoch and the
    scheduler's epochs always checkpoint, and no checkpoint is written that the interval did not need."""
    rng = random.Random(seed)
    epoch_s, interval_s, epochs = rng.uniform(0.1, 3.0), rng.uniform(0.5, 10.0), rng.randint(5, 60)
    forced = set(rng.sample(range(1, epochs + 1), 3))
    clock = FakeClock()
    policy = CheckpointPolicy(interval_s, epochs, forced, clock=clock)
    last, written = 0.0, []
    for epoch in range(1, epochs + 1):
        clock.now += epoch_s
        # The worst moment to be killed: just before this epoch's end (its work not yet saved).
        assert clock.now - last <= max(interval_s, epoch_s) + 1e-9
        if policy.due(epoch):
            policy.written()
            written.append(epoch)
            last = clock.now
    assert epochs in written and forced <= set(written)
    # Between two consecutive checkpoints that the interval alone caused, one more epoch would have exceeded it.
    by_time = [e for e in written if e not in forced and e != epochs]
    for before, after in zip([0, *written], written):
        if after in by_time:
            assert (after - before + 1) * epoch_s > interval_s - 1e-9


def test_interval_zero_checkpoints_every_epoch():
    clock = FakeClock()
    policy = CheckpointPolicy(0, 4, clock=clock)
    assert [policy.due(e) for e in (1, 2, 3, 4)] == [True] * 4


def test_checkpoint_interval_is_validated():
    from pydantic import ValidationError

    from study.config import TrainConfig

    assert TrainConfig().checkpoint_interval_s == 60.0
    for bad in (-1.0, float("nan"), float("inf"), "soon"):
        with pytest.raises(ValidationError, match="checkpoint_interval_s"):
            TrainConfig(checkpoint_interval_s=bad)


# ------------------------------------------------------------------------------------------ run_trial
@pytest.mark.parametrize("kind", ["vae", "avae"])
def test_metrics_every_epoch_checkpoint_only_when_due(prepared_32, tmp_path, kind):
    """With a long interval: metrics reported every epoch, a checkpoint only at the scheduler's epoch 2 and the
    last epoch 4, complete (grids, weights, metrics.json of its own epoch)."""
    config = tiny_trial_config(prepared_32, epochs=4, checkpoint_interval_s=3600)
    config.model.kind = kind
    seen = []

    def report(metrics, checkpoint):
        files = sorted(p.name for p in checkpoint.iterdir()) if checkpoint is not None else None
        on_disk = json.loads((checkpoint / "metrics.json").read_text()) if checkpoint is not None else None
        seen.append((metrics["epoch"], files, on_disk, metrics))

    run_trial(config, report, workdir=tmp_path, checkpoint_epochs=(2,))
    assert [epoch for epoch, *_ in seen] == [1, 2, 3, 4]
    assert [files is not None for _, files, _, _ in seen] == [False, True, False, True]
    expected = CHECKPOINT_FILES if kind == "vae" else sorted([*CHECKPOINT_FILES, "decoder_reconstructions.png"])
    for _, files, on_disk, metrics in seen:
        if files is not None:
            assert files == expected and on_disk == metrics
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    assert state["epoch"] == 4


def test_scheduler_epochs_are_asha_rungs_and_pbt_intervals(tmp_path, prepared_32):
    """ASHA: the milestones of the ASHAScheduler the sweep builds (Ray's own rung list); PBT: every perturbation
    interval."""
    from study.config import parse_params
    from study.sweep_space import _scheduler
    from study.sweep_trainable import scheduler_checkpoint_epochs

    for grace, factor, epochs in ((5, 2, 40), (1, 3, 10), (2, 2.5, 17), (3, 2, 3)):
        params = parse_params(tiny_params(tmp_path, prepared_32, epochs=epochs, scheduler={
            "kind": "asha", "grace_period": grace, "reduction_factor": factor}))
        asha = _scheduler(params, "val_elbo", "max", max_epochs=epochs)
        rungs = sorted({min(epochs, int(np.ceil(m))) for bracket in asha._brackets for m, _ in bracket._rungs})
        assert list(scheduler_checkpoint_epochs(params.sweep.scheduler, epochs)) == rungs
    params = parse_params(tiny_params(tmp_path, prepared_32, epochs=7, searcher={"kind": "random"}, scheduler={
        "kind": "pbt", "perturbation_interval": 3,
        "mutations": {"train.beta": {"distribution": "loguniform", "low": 0.1, "high": 10}}}))
    assert scheduler_checkpoint_epochs(params.sweep.scheduler, 7) == (3, 6)


# ------------------------------------------------------------------------------------------ sweep stage
def _client(work: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


@pytest.mark.slow
def test_killed_trial_loses_at_most_the_checkpoint_interval(tmp_path, prepared_32):
    """A worker killed mid-trial resumes from a checkpoint written at most ``checkpoint_interval_s`` before the
    kill; the trial then finishes in its one MLflow run with every epoch logged once and its artifacts."""
    interval, epochs = 4.0, 8
    progress = tmp_path / "progress"
    progress.mkdir()
    write_params(tmp_path, tiny_params(tmp_path, prepared_32, epochs=epochs, num_trials=1, max_failures=2,
                                       ray_start_timeout_s=600, train={"checkpoint_interval_s": interval}))
    env = stage_env(STUDY_TEST_PID_DIR=str(progress), STUDY_TEST_EPOCH_SLEEP="1.5")
    log = tmp_path / "sweep.log"
    proc = start([sys.executable, "-m", "pipelines.sweep", "--params", "params.yaml"], tmp_path, env, log)
    try:
        def at_epoch_5():
            for path in progress.glob("*.json"):
                info = read_json(path)
                if info and info["epoch"] >= 5:
                    return path.stem, info
            return None

        trial_id, before = wait_for(at_epoch_5, 300, "the trial at epoch 5", poll_s=0.1, proc=proc, log=log)
        killed_at = time.time()
        os.kill(before["pid"], signal.SIGKILL)
        assert proc.wait(timeout=420) == 0, log.read_text()[-4000:]
    finally:
        end_session(proc.pid)

    after = read_json(progress / f"{trial_id}.json")
    assert after["pid"] != before["pid"] and after["epoch"] == epochs
    resumed = after["start_epoch"]
    assert 0 < resumed <= before["epoch"]  # from a checkpoint (run_trial's test checks they are not every epoch)
    saved_at = next(t for epoch, t, _ in before["report_times"] if epoch == resumed)  # before that report
    assert killed_at - saved_at <= interval, (killed_at - saved_at, before["report_times"])

    summary = json.loads((tmp_path / "results" / "sweep.json").read_text())
    client = _client(tmp_path)
    (run,) = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ray_failures"] == "1"
    assert steps(client, run.info.run_id) == list(range(1, epochs + 1))


@pytest.mark.slow
def test_every_trial_ends_with_its_artifacts(tmp_path, prepared_32):
    """With the default interval (no checkpoint by time in a seconds-long trial) and ASHA stopping trials: every
    trial's run has its grids, slim checkpoint and the metrics.json of its last epoch."""
    params = tiny_params(tmp_path, prepared_32, epochs=4, num_trials=4, max_concurrent=2,
                         scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2}, ray_start_timeout_s=600,
                         train={"checkpoint_interval_s": 60})
    write_params(tmp_path, params)
    log = tmp_path / "sweep.log"
    proc = start([sys.executable, "-m", "pipelines.sweep", "--params", "params.yaml"], tmp_path, stage_env(), log)
    try:
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        end_session(proc.pid)
    summary = json.loads((tmp_path / "results" / "sweep.json").read_text())
    client = _client(tmp_path)
    runs = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert len(runs) == 4
    for run in runs:
        artifacts = {a.path for d in ("images", "checkpoint") for a in client.list_artifacts(run.info.run_id, d)}
        assert {"images/reconstructions.png", "images/samples.png", "checkpoint/state.pt",
                "checkpoint/config.yaml", "checkpoint/metrics.json"} <= artifacts, artifacts
        last = max(steps(client, run.info.run_id))
        metrics = json.loads(Path(client.download_artifacts(run.info.run_id, "checkpoint/metrics.json",
                                                            str(tmp_path / run.info.run_id))).read_text())
        assert metrics["epoch"] == last == int(run.data.tags["epochs_run"])
        weights = torch.load(client.download_artifacts(run.info.run_id, "checkpoint/state.pt",
                                                       str(tmp_path / run.info.run_id)), weights_only=False)
        assert weights["epoch"] == last
