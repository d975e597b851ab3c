"""One rule picks "the best trial" (study.selection), and the sweep's summary and the report both apply it.

Checked here on synthetic trial records whose winners differ under the two rules the project used to have (the
sweep ranking every arm by a non-density metric, the report preferring density rows), on a real Ray ``Result``
with an empty error message, and on the ASHA horizon of an arm that sets its own ``train.epochs``.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from study.selection import DENSITY_METRICS, competes, is_density_metric, select_best


def trial(trial_id, variant, family, elbo_valid, metric, mode, status="FINISHED", **metrics):
    return {"trial_id": trial_id, "run_id": f"run-{trial_id}", "variant": variant, "family": family,
            "elbo_valid": elbo_valid, "metric": metric, "mode": mode, "status": status, "metrics": metrics,
            "config": {}, "epochs": 3, "max_epochs": 3}


def synthetic_trials(metric: str, mode: str) -> list[dict]:
    """A Gaussian arm, an SSIM arm (not a density; the highest 'val_elbo'), an AVAE arm selected by MSE, and a
    failed trial with the best numbers of all."""
    return [
        trial("g1", "gaussian", "gaussian", True, metric, mode, val_elbo=-120.0, val_mse_255=600.0),
        trial("g2", "gaussian", "gaussian", True, metric, mode, val_elbo=-100.0, val_mse_255=650.0),
        trial("s1", "ssim", "ssim", False, metric, mode, val_elbo=50.0, val_mse_255=300.0),
        trial("s2", "ssim", "ssim", False, metric, mode, val_elbo=40.0, val_mse_255=float("nan")),
        trial("a1", "avae", "avae", False, "val_mse_255", "min", val_mse_255=200.0),
        trial("f1", "gaussian", "gaussian", True, metric, mode, status="FAILED", val_elbo=1e6, val_mse_255=1.0),
    ]


def brute_force_best(trials, metric, mode):
    """Independent statement of the rule: finished, finite, selected by ``metric``, density-valid if needed."""
    density = metric in {"val_elbo", "val_log_likelihood", "val_bits_per_dim", "test_nll"}
    pool = [t for t in trials if t["status"] == "FINISHED" and t["metric"] == metric
            and math.isfinite(t["metrics"].get(metric, math.nan)) and (t["elbo_valid"] or not density)]
    if not pool:
        return None
    return (max if mode == "max" else min)(pool, key=lambda t: t["metrics"][metric])


def test_density_metrics_are_an_explicit_list():
    assert {"val_elbo", "val_log_likelihood", "val_bits_per_dim", "test_nll", "test_nll_bits_per_dim"} <= DENSITY_METRICS
    assert not is_density_metric("val_mse_255") and not is_density_metric("val_sharpness_ratio")
    # Not a substring test: names that merely contain "elbo" or "nll" are not density metrics.
    assert not is_density_metric("val_elbo_gap_to_mse") and not is_density_metric("nll_note")


@pytest.mark.parametrize(("metric", "mode", "winner"), [
    ("val_elbo", "max", "g2"),      # the SSIM arm's higher "ELBO" is a loss value: never ranked by it
    ("val_mse_255", "min", "s1"),   # a non-density metric ranks every arm selected by it (not the AVAE's MSE arm
                                    # here: the AVAE was selected by the same metric, so it competes: see below)
])
def test_select_best_follows_the_rule(metric, mode, winner):
    trials = synthetic_trials(metric, mode)
    expected = brute_force_best(trials, metric, mode)
    chosen = select_best(trials, metric, mode)
    assert chosen is expected
    if metric == "val_elbo":
        assert chosen["trial_id"] == winner
    else:  # the AVAE arm (200) beats the SSIM arm (300) when all are selected by MSE
        assert chosen["trial_id"] == "a1"
        assert select_best([t for t in trials if t["family"] != "avae"], metric, mode)["trial_id"] == winner
    assert not competes(trials[-1], metric)  # failed
    assert competes(trials[2], metric, within_arm=True)  # the SSIM arm's own ranking
    assert select_best([], metric, mode) is None
    with pytest.raises(ValueError, match="mode"):
        select_best(trials, metric, "best")


def report_inputs(trials: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (trials_table, runs) frames the report builds from MLflow for these trials."""
    rows, runs = [], []
    for t in trials:
        rows.append({"run_id": t["run_id"], "trial_id": t["trial_id"], "status": t["status"], "family": t["family"],
                     "elbo_valid": "true" if t["elbo_valid"] else "false", "epochs_run": t["epochs"],
                     "early_stopped": "false", "variant": t["variant"], "selection_metric": t["metric"],
                     "selection_mode": t["mode"], **t["metrics"]})
        runs.append({"run_id": t["run_id"]})
    return pd.DataFrame(rows), pd.DataFrame(runs)


@pytest.mark.parametrize(("metric", "mode"), [("val_elbo", "max"), ("val_mse_255", "min")])
def test_sweep_summary_and_report_name_the_same_winners(metric, mode):
    from study.report import best_overall, best_per_setting
    from study.sweep import best_trials

    trials = synthetic_trials(metric, mode)
    best, per_arm = best_trials(trials, ["gaussian", "ssim", "avae"], metric, mode)
    table, runs = report_inputs(trials)
    per_setting = best_per_setting(table, runs, metric, mode)
    top = best_overall(per_setting, metric, mode)
    assert top is not None and top["trial_id"] == best["trial_id"] == brute_force_best(trials, metric, mode)["trial_id"]
    # Per arm (one setting per arm here): the same trial, by the arm's own metric.
    by_setting = dict(zip(per_setting["setting"], per_setting["trial_id"]))
    assert by_setting == {arm: t["trial_id"] for arm, t in per_arm.items()}
    assert per_arm["avae"]["trial_id"] == "a1" and per_arm["gaussian"]["trial_id"] == (
        "g2" if metric == "val_elbo" else "g1")
    # Within its own arm a loss arm is ranked by its own metric (minus its objective for "val_elbo").
    assert per_arm["ssim"]["trial_id"] == "s1"


def test_collect_records_an_exception_with_an_empty_message(tmp_path):
    from ray.tune import Result

    from study.sweep import _collect

    class Tracker:
        def run_id(self, trial_id):
            return f"run-{trial_id}"

    result = Result(metrics={"trial_id": "t1", "epoch": 1}, checkpoint=None, error=RuntimeError(),
                    path=str(tmp_path / "t1"))
    (record,) = _collect([result], Tracker(), "gaussian", "gaussian", "val_elbo", "max", max_epochs=3)
    assert record["status"] == "FAILED" and record["error"] == "RuntimeError"
    assert record["max_epochs"] == 3 and record["epochs"] == 1 and record["elbo_valid"] is True


def test_asha_horizon_is_the_arms_own_epochs():
    from study.config import parse_params
    from study.sweep_space import _scheduler

    params = parse_params({"train": {"epochs": 10}, "sweep": {"scheduler": {"kind": "asha", "grace_period": 4}}})
    assert _scheduler(params, "val_elbo", "max")._max_t == 10
    short = _scheduler(params, "val_elbo", "max", max_epochs=3)
    assert short._max_t == 3


@pytest.mark.parametrize(("estimator", "valid"), [("network", True), ("wiener_ls", False)])
def test_collect_tags_each_trial_by_its_sampled_estimator(tmp_path, estimator, valid):
    """A blur arm that searches the estimator: only its network-kernel trials are densities (ranked by ELBO)."""
    from ray.tune import Result

    from study.config import parse_params
    from study.sweep import _collect

    class Tracker:
        def run_id(self, trial_id):
            return f"run-{trial_id}"

    arm_base = parse_params({"likelihood": {"family": "blur"}}).base_trial_config()
    result = Result(metrics={"trial_id": "t1", "epoch": 3, "val_elbo": 1.0,
                             "config": {"likelihood.blur.estimator": estimator}},
                    checkpoint=None, error=None, path=str(tmp_path / "t1"))
    assert result.config == {"likelihood.blur.estimator": estimator}
    (record,) = _collect([result], Tracker(), "blur", "blur", "val_elbo", "max", arm_base=arm_base, max_epochs=3)
    assert record["elbo_valid"] is valid
    assert (select_best([record], "val_elbo", "max") is not None) is valid
