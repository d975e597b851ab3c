"""The sweep stage's console, from a real ``python -m pipelines.sweep`` (embedded Ray, Optuna, MLflow on loopback):
one line per trial event, one progress bar, every failure reason, and none of Ray's per-checkpoint INFO lines or
Tune's tables unless ``--verbose`` asks for them.

The expected lines are built from what MLflow recorded for the same sweep (trial ids, per-epoch ``val_elbo``,
``failure_reason``), not from the console code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sweep_support import REPO, child_runs, stage_env, tiny_params, write_params

pytestmark = pytest.mark.slow

EPOCHS = 2
CHECKPOINT_LINE = "Checkpoint successfully created"


def _run_stage(work: Path, prepared: Path, *args: str, epochs: int = EPOCHS, num_trials: int = 2,
               **env: str) -> subprocess.CompletedProcess:
    write_params(work, tiny_params(work, prepared, epochs=epochs, num_trials=num_trials, searcher={"kind": "optuna"},
                                   ray_start_timeout_s=600))  # a loaded CI machine
    return subprocess.run(
        [sys.executable, "-m", "pipelines.sweep", "--params", "params.yaml", *args], cwd=work,
        env=stage_env(PYTHONPATH=str(REPO), **env), capture_output=True, text=True, timeout=900,
    )


@pytest.fixture(scope="module")
def quiet_sweep(tmp_path_factory, prepared_32):
    """A two-trial sweep whose second trial diverges at epoch 2 (restarted once, then FAILED)."""
    from mlflow.tracking import MlflowClient

    work = tmp_path_factory.mktemp("console")
    proc = _run_stage(work, prepared_32, STUDY_TEST_NAN_TRIAL="_2_")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "results" / "sweep.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    return proc, summary, client


def test_one_line_per_trial_event(quiet_sweep):
    proc, summary, client = quiet_sweep
    lines = proc.stdout.splitlines()
    trial_lines = [line for line in lines if line.startswith("trial ")]
    runs = {r.data.tags["ray_trial_id"]: r for r in child_runs(client, summary["experiment_id"],
                                                                summary["parent_run_id"])}
    assert set(runs) == {t["trial_id"] for t in summary["trials"]} and len(runs) == 2
    expected = 0
    for trial_id, run in runs.items():
        mine = [line for line in trial_lines if line.startswith(f"trial {trial_id} ")]
        assert sum(" started: " in line for line in mine) == 1
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_elbo")}
        # A restart without a checkpoint (train.checkpoint_interval_s not yet due) trains epoch 1 again.
        again = mine.count(f"trial {trial_id} restarted from epoch 0 (no checkpoint yet)")
        for epoch, value in history.items():  # each logged epoch once, with the value MLflow holds
            assert mine.count(f"trial {trial_id} epoch {epoch}/{EPOCHS}: val_elbo {value:.1f}") == 1 + again
        if run.info.status == "FINISHED":
            assert sorted(history) == [1, 2]
            ends = [line for line in mine if " finished " in line]
            assert len(ends) == 1 and ends[0].startswith(f"trial {trial_id} finished 2/2 epochs: val_elbo "
                                                         f"{history[2]:.1f}")
            expected += 1 + 2 + 1
        else:
            reason = run.data.tags["failure_reason"]
            assert "NonFiniteLossError" in reason and "epoch 2" in reason
            # Restarted once from its epoch-1 checkpoint (max_failures 1), then failed the same way.
            assert sum(" failed at epoch 1/2 (" in line and "restart 1 of 1" in line for line in mine) == 1, mine
            assert again + mine.count(f"trial {trial_id} restarted from its epoch-1 checkpoint") == 1, mine
            failed = [line for line in mine if " FAILED " in line]
            assert len(failed) == 1 and failed[0].endswith(reason.splitlines()[-1].strip()), mine
            expected += 1 + 1 + again + 1 + 1 + 1
    assert len(trial_lines) == expected, proc.stdout  # nothing else: no Tune tables, no duplicate lines


def test_no_ray_internals_on_a_quiet_console(quiet_sweep):
    proc, _, _ = quiet_sweep
    both = proc.stdout + proc.stderr
    assert CHECKPOINT_LINE not in both
    assert "Traceback" not in both and "Trial task failed" not in both  # the reason line replaces them
    assert "Trial status" not in both and "Configuration for experiment" not in both  # Tune's tables
    assert "A new study created" not in both  # Optuna's INFO


def test_one_progress_bar_for_the_sweep(quiet_sweep):
    proc, summary, _ = quiet_sweep
    states = [s for s in re.split(r"[\r\n]", proc.stderr) if s.startswith("sweep tiny: ")]
    assert states, proc.stderr[-2000:]
    best = summary["best_trial"]
    final = states[-1]
    assert final.startswith("sweep tiny: 2/2 trials") and "1 failed" in final
    assert f"best val_elbo {best['metrics']['val_elbo']:.1f} (trial {best['trial_id']})" in final
    counts = [int(re.match(r"sweep tiny: (\d+)/2", s).group(1)) for s in states]
    assert counts == sorted(counts)  # one bar counting up, not one per arm or trial


def test_verbose_brings_back_rays_checkpoint_lines(tmp_path, prepared_32):
    proc = _run_stage(tmp_path, prepared_32, "--verbose", epochs=1, num_trials=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert CHECKPOINT_LINE in both
    assert re.search(r"trial \w+ epoch 1/1: val_elbo", proc.stdout)  # the sweep's own lines stay
