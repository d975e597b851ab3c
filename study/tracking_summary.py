"""The sweep's parent MLflow run carries the sweep's result, so the runs table and the run page answer "what won"
without opening ``sweep_summary.json``.

Written once the sweep ends (:meth:`study.tracking.SweepTracker.finish_sweep`):

- metrics: ``best_<metric>`` (the best trial overall by the sweep's ``metric``), ``best_<metric>/<arm>`` (each
  arm's selected trial by the arm's own metric), ``trials_total``, ``trials_finished``, ``trials_failed`` and
  ``trials_stopped_early`` (finished before their arm's ``train.epochs``, by ASHA / the median rule);
- tags: ``best_arm``, ``best_trial_id``, ``best_run_id``, ``best.<arm>.trial_id`` / ``best.<arm>.run_id``,
  and ``best.sampled.<key>`` for every value the searcher sampled for the best trial (4 significant digits);
- the run description (MLflow's ``mlflow.note.content``, the Markdown note on the run page): one row per arm with
  its selected trial, a link to that trial's run, its metric, epochs and sampled values.
"""

from __future__ import annotations

import time
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from study.formatting import format_value

NOTE_TAG = "mlflow.note.content"


def _sampled(trial: dict[str, Any]) -> dict[str, str]:
    """The searcher's sampled values of a trial record (``config``: dotted key -> value), formatted."""
    out = {}
    for key, value in sorted((trial.get("config") or {}).items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out[key] = str(value)
        else:
            out[key] = format_value(value)
    return out


def _metric_value(trial: dict[str, Any] | None) -> float | None:
    if not trial:
        return None
    value = (trial.get("metrics") or {}).get(trial.get("metric"))
    return float(value) if isinstance(value, (int, float)) else None


def sweep_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics from a sweep summary (``results/sweep.json``'s fields)."""
    trials = summary.get("trials") or []
    metrics: dict[str, float] = {
        "trials_total": float(summary.get("num_trials", len(trials))),
        "trials_failed": float(summary.get("num_failed", 0)),
        "trials_finished": float(sum(t.get("status") == "FINISHED" for t in trials)),
        "trials_stopped_early": float(summary.get("num_early_stopped", 0)),
    }
    if (value := _metric_value(summary.get("best_trial"))) is not None:
        metrics[f"best_{summary['best_trial']['metric']}"] = value
    for arm, trial in (summary.get("best_per_variant") or {}).items():
        if (value := _metric_value(trial)) is not None:
            metrics[f"best_{trial['metric']}/{arm}"] = value
    return metrics


def sweep_tags(summary: dict[str, Any]) -> dict[str, str]:
    """The parent run's best-trial tags from a sweep summary."""
    tags: dict[str, str] = {}
    best = summary.get("best_trial")
    if best:
        tags |= {"best_arm": str(best.get("variant")), "best_trial_id": str(best.get("trial_id")),
                 "best_run_id": str(best.get("run_id"))}
        tags |= {f"best.sampled.{key}": value for key, value in _sampled(best).items()}
    for arm, trial in (summary.get("best_per_variant") or {}).items():
        tags[f"best.{arm}.trial_id"] = str(trial.get("trial_id"))
        tags[f"best.{arm}.run_id"] = str(trial.get("run_id"))
    return tags


def sweep_description(summary: dict[str, Any]) -> str:
    """The parent run's Markdown note: the counts and one row per arm's selected trial (with a link to its run)."""
    experiment = summary.get("experiment_id")
    lines = [
        f"**Sweep `{summary.get('sweep')}`**: {summary.get('num_trials', 0)} trials, "
        f"{summary.get('num_early_stopped', 0)} stopped early by the scheduler ({summary.get('scheduler')}), "
        f"{summary.get('num_failed', 0)} failed. Each arm's trial is selected by its own metric; the best overall "
        f"by `{summary.get('metric')}` ({summary.get('mode')}).",
        "",
        "| arm | selected trial | run | metric | value | epochs | sampled hyperparameters |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for arm, trial in (summary.get("best_per_variant") or {}).items():
        run_id = str(trial.get("run_id"))
        link = f"[{run_id[:8]}](#/experiments/{experiment}/runs/{run_id})" if experiment else run_id[:8]
        sampled = ", ".join(f"`{k}` = {v}" for k, v in _sampled(trial).items()) or "(none sampled)"
        lines.append(f"| {arm} | {trial.get('trial_id')} | {link} | `{trial.get('metric')}` | "
                     f"{format_value(_metric_value(trial))} | {trial.get('epochs')}/{trial.get('max_epochs')} | "
                     f"{sampled} |")
    best = summary.get("best_trial")
    if best:
        lines += ["", f"Best overall: **{best.get('variant')}**, trial {best.get('trial_id')} "
                      f"(`{summary.get('metric')}` = {format_value(_metric_value(best))})."]
    return "\n".join(lines) + "\n"


def describe_sweep(client: MlflowClient, parent_run_id: str, summary: dict[str, Any]) -> None:
    """Write :func:`sweep_metrics`, :func:`sweep_tags` and :func:`sweep_description` into the parent run."""
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in sweep_metrics(summary).items()]
    tags = [RunTag(key, value[:5000]) for key, value in sweep_tags(summary).items()]
    tags.append(RunTag(NOTE_TAG, sweep_description(summary)))
    for start in range(0, max(len(tags), 1), 100):  # MLflow caps a batch at 100 tags
        client.log_batch(parent_run_id, metrics=metrics if start == 0 else [], tags=tags[start : start + 100])
