"""A multi-arm comparison sweep end to end (real Ray, Optuna and MLflow on loopback): a Gaussian arm, an SSIM arm
(a reconstruction loss, not a density) with its own ``train.epochs``, and an AVAE arm selected by its own metric.

Checked: every arm gets the same budget and its own searcher seed; each arm's best trial is chosen by the arm's own
metric; the ELBO-based sweep metric ranks only density families (never SSIM or the AVAE); an arm's own epochs are
its horizon (no trial counted as stopped early for running them); the report names the same winner as the sweep;
and a re-run after an interruption between arms reuses the finished arms and restores the unfinished one, without
a new MLflow run.
"""

from __future__ import annotations

import json
import math

import pytest

from study.config import parse_params
from tests.sweep_support import child_runs, tiny_params

import study.sweep  # noqa: E402,F401  (a broken import fails, never skips)

NUM_TRIALS, EPOCHS, SSIM_EPOCHS = 2, 3, 2


@pytest.fixture(scope="module")
def arms_sweep(tmp_path_factory, prepared_32):
    """The sweep's params, summary, MLflow client and working directory (one embedded Ray for the module)."""
    import os

    import ray
    from mlflow.tracking import MlflowClient

    from study.sweep import run_sweep
    from study.sweep_ray import init_ray

    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "STUDY_TEST_NAN_TRIAL", "STUDY_TEST_PID_DIR"):
        os.environ.pop(var, None)
    work = tmp_path_factory.mktemp("arms")
    raw = tiny_params(work, prepared_32, epochs=EPOCHS, num_trials=NUM_TRIALS, searcher={"kind": "optuna"},
                      variants={
                          "gaussian": {"overrides": {"likelihood.family": "gaussian"}},
                          "ssim": {"overrides": {"likelihood.family": "ssim", "train.epochs": SSIM_EPOCHS}},
                          "avae": {"overrides": {"model.kind": "avae"}, "metric": "val_mse_255", "mode": "min"},
                      })
    params = parse_params(raw)
    init_ray()
    summary = run_sweep(params, workdir=work)
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    yield params, summary, client, work
    ray.shutdown()


def test_equal_budget_and_own_seed_per_arm(arms_sweep):
    _, summary, client, _ = arms_sweep
    by_arm = {arm: [t for t in summary["trials"] if t["variant"] == arm] for arm in ("gaussian", "ssim", "avae")}
    assert {arm: len(ts) for arm, ts in by_arm.items()} == {"gaussian": NUM_TRIALS, "ssim": NUM_TRIALS,
                                                           "avae": NUM_TRIALS}
    assert all(t["status"] == "FINISHED" for t in summary["trials"])
    runs = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert sorted(r.data.tags["sweep_variant"] for r in runs) == sorted(arm for arm in by_arm for _ in range(NUM_TRIALS))
    assert [summary["variants"][a]["searcher_seed"] for a in ("gaussian", "ssim", "avae")] == [0, 1, 2]
    # Different seeds: no arm replays another arm's sampled values.
    betas = {arm: {round(t["config"]["train.beta"], 12) for t in ts} for arm, ts in by_arm.items()}
    assert not (betas["gaussian"] & betas["ssim"]) and not (betas["gaussian"] & betas["avae"])
    assert not (betas["ssim"] & betas["avae"])


def test_each_arm_is_selected_by_its_own_metric(arms_sweep):
    _, summary, client, _ = arms_sweep
    for arm, metric, pick in (("gaussian", "val_elbo", max), ("ssim", "val_elbo", max), ("avae", "val_mse_255", min)):
        trials = [t for t in summary["trials"] if t["variant"] == arm]
        assert {t["metric"] for t in trials} == {metric}
        assert summary["best_per_variant"][arm]["trial_id"] == pick(trials, key=lambda t: t["metrics"][metric])["trial_id"]
        run = client.get_run(summary["best_per_variant"][arm]["run_id"])
        assert run.data.tags["selection_metric"] == metric


def test_elbo_metric_ranks_only_densities(arms_sweep):
    _, summary, _, _ = arms_sweep
    assert summary["metric"] == "val_elbo"
    best = summary["best_trial"]
    assert best["family"] == "gaussian" and best["elbo_valid"] is True
    gaussian = [t for t in summary["trials"] if t["variant"] == "gaussian"]
    assert best["trial_id"] == max(gaussian, key=lambda t: t["metrics"]["val_elbo"])["trial_id"]
    assert {t["elbo_valid"] for t in summary["trials"] if t["variant"] != "gaussian"} == {False}


def test_an_arms_own_epochs_are_its_horizon(arms_sweep):
    _, summary, client, _ = arms_sweep
    for t in summary["trials"]:
        expected = SSIM_EPOCHS if t["variant"] == "ssim" else EPOCHS
        assert t["max_epochs"] == expected and t["epochs"] == expected
        run = client.get_run(t["run_id"])
        assert run.data.tags["early_stopped"] == "false" and int(run.data.tags["epochs_run"]) == expected
    assert summary["num_early_stopped"] == 0  # FIFO: nothing stops early, though the SSIM arm runs 2 of 3


def test_report_names_the_sweeps_winner(arms_sweep):
    from study.report import write_report

    _, summary, client, work = arms_sweep
    metrics = write_report(summary, work / "reports", client)
    assert metrics["best"]["run_id"] == summary["best_trial"]["run_id"]
    saved = json.loads((work / "reports" / "metrics.json").read_text())
    assert saved["best"]["run_id"] == summary["best_trial"]["run_id"]
    assert math.isclose(saved["best"]["val_elbo"], summary["best_trial"]["metrics"]["val_elbo"], rel_tol=1e-9)
    # Each arm's best row names its trial, its run and the values the searcher sampled for it.
    text = (work / "reports" / "summary.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "trial_id" not in line]
    for trial in summary["best_per_variant"].values():
        (row,) = [r for r in rows if trial["run_id"] in r]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == trial["trial_id"]
        for key, value in trial["config"].items():
            shown = float(cells[4].split(f"{key}=")[1].split(",")[0])
            assert math.isclose(shown, value, rel_tol=5e-4), (key, shown, value)  # 4 significant digits


def test_rerun_after_an_interruption_between_arms_resumes_per_arm(arms_sweep):
    """The driver stopped after two arms: the state file lists them finished and the third unfinished."""
    from study.sweep import run_sweep
    from study.sweep_state import STATE_SUFFIX

    params, summary, client, work = arms_sweep
    state_path = work / "ray_results" / f"{params.sweep.name}{STATE_SUFFIX}"
    state = json.loads(state_path.read_text())
    assert set(state["arms"]) == {"gaussian", "ssim", "avae"}
    del state["arms"]["avae"]
    state["status"] = "running"
    state_path.write_text(json.dumps(state))
    before = {r.info.run_id for r in child_runs(client, summary["experiment_id"], summary["parent_run_id"])}

    again = run_sweep(params, workdir=work)
    assert again["resumed"] is True and again["parent_run_id"] == summary["parent_run_id"]
    key = lambda s: sorted((t["variant"], t["trial_id"], t["run_id"]) for t in s["trials"])  # noqa: E731
    assert key(again) == key(summary)  # the finished arms reused, the unfinished one restored: same trials
    after = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert {r.info.run_id for r in after} == before and all(r.info.status == "FINISHED" for r in after)
    assert again["best_trial"]["trial_id"] == summary["best_trial"]["trial_id"]
