"""Sweep report: MLflow runs -> pandas -> tables, ``metrics.json`` and figures in ``reports/``.

The runs are read back through the MLflow client (the tracking store is the source of truth, not Ray's result
files), so the report agrees with what ``mlflow ui`` shows. Outputs (all written atomically):

- ``trials.csv``: one row per trial: run id, Ray trial id, status, epochs run, early stop, the sampled
  parameters and the last epoch's metrics;
- ``summary.md``: the best trial per likelihood setting (family and its main option) by the sweep's metric,
  with its Ray trial id, MLflow run id, epochs run and sampled hyperparameters (4 significant digits), and ELBO,
  KL, bits per dimension and MSE on [0, 255];
- ``metrics.json``: the best trial's metrics and the sweep's counts, for ``dvc metrics show``;
- ``best_reconstructions.png``: the best trial's validation reconstructions below their inputs, with prior
  samples beside them;
- for a two-objective sweep (``sweep.objectives``): ``pareto_front.md``, the finished trials no other finished
  trial dominates on both objectives (also a section of ``summary.md``), and ``figures/pareto_objectives.png``,
  every trial in the objectives' plane with that front;
- with an ``evaluate`` stage's results (:func:`write_paper_report`): ``tables/`` (Dorta et al. Table 1: NLL,
  avg KL, MI, marginal KL; Table 2: MSE on [0, 255] mean +- std; the AVAE table: MSE, LPIPS, FID; all metrics;
  with seed replicates every metric as mean +- 95% CI over seeds, and ``paired_comparisons``: each arm against
  the baseline arm, image by image) as Markdown and CSV, and ``figures/``: input / reconstruction / sample
  grids of every arm side by side, residual maps, MSE against sharpness for all trials with the Pareto front, and variance loss against MSE
  for all trials (Asperti 2020).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by a pipeline stage
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from study.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from study.formatting import format_value  # noqa: E402
from study.report_figures import (  # noqa: E402
    grid_comparison,
    pareto_front,
    pareto_mse_sharpness,
    residual_maps,
    variance_loss_vs_mse,
)
from study.report_tables import paper_tables  # noqa: E402
from study.selection import select_best  # noqa: E402

# The options that distinguish settings within a family (a row of the summary table).
SETTING_PARAMS = {
    "gaussian": ["likelihood.gaussian.sigma_mode"],
    "structured": ["likelihood.structured.neighbourhood_size", "likelihood.structured.num_basis",
                   "likelihood.structured.dilations"],
    "blur": ["likelihood.blur.estimator"],
    "laplace": ["likelihood.laplace.scale_mode"],
}
SUMMARY_METRICS = ["val_elbo", "val_kl", "val_log_likelihood", "val_bits_per_dim", "val_mse_255"]
ELBO_METRICS = ["val_elbo", "val_log_likelihood", "val_bits_per_dim"]


def load_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """The sweep's child runs as a DataFrame (MLflow's ``search_runs`` layout: ``params.*``, ``metrics.*``,
    ``tags.*`` columns), sorted by start time."""
    runs = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            max_results=1000,
            page_token=page_token,
        )
        runs += page
        page_token = page.token
        if not page_token:
            break
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "start_time": run.info.start_time,
        }
        row |= {f"params.{k}": v for k, v in run.data.params.items()}
        row |= {f"metrics.{k}": v for k, v in run.data.metrics.items()}
        row |= {f"tags.{k}": v for k, v in run.data.tags.items()}
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values("start_time").reset_index(drop=True) if len(frame) else frame


def trials_table(runs: pd.DataFrame, sampled: list[str]) -> pd.DataFrame:
    """One row per trial with its status, sampled parameters and final metrics."""
    table = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "trial_id": runs.get("tags.ray_trial_id"),
            "status": runs["status"],
            "family": runs.get("tags.likelihood_family"),
            "elbo_valid": runs.get("tags.elbo_valid"),
            "epochs_run": pd.to_numeric(runs.get("tags.epochs_run"), errors="coerce"),
            "early_stopped": runs.get("tags.early_stopped"),
            "variant": runs.get("tags.sweep_variant"),
            "selection_metric": runs.get("tags.selection_metric"),
            "selection_mode": runs.get("tags.selection_mode"),
        }
    )
    for path in sampled:
        if f"params.{path}" in runs:
            table[path] = runs[f"params.{path}"]
    metric_cols = sorted(c for c in runs.columns if c.startswith("metrics."))
    for col in metric_cols:
        table[col.removeprefix("metrics.")] = runs[col]
    return table


def _setting(family: str, runs_row: pd.Series) -> str:
    """``family (option=value, ...)``: the row label of a trial's likelihood setting."""
    parts = []
    for path in SETTING_PARAMS.get(family, []):
        value = runs_row.get(f"params.{path}")
        if value is not None and value != "None":
            parts.append(f"{path.rsplit('.', 1)[-1]}={value}")
    return f"{family} ({', '.join(parts)})" if parts else str(family)


def best_per_setting(table: pd.DataFrame, runs: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Best finished trial of each setting, chosen by that trial's own selection metric (the sweep's, or its
    arm's, e.g. ``val_mse_255`` for an AVAE), sorted by the sweep's ``metric`` where present; a ``setting``
    column labels the rows."""
    finished = table[table["status"] == "FINISHED"].copy()
    if finished.empty:
        return finished.assign(setting=[])
    finished["setting"] = [_setting(r["family"], runs.loc[i]) for i, r in finished.iterrows()]
    chosen = []
    for _, group in finished.groupby("setting", sort=False):
        selection = group["selection_metric"].dropna()
        own_metric = selection.iloc[0] if len(selection) else metric
        own_mode = group["selection_mode"].dropna().iloc[0] if group["selection_mode"].notna().any() else mode
        pick = select_best(_candidates(group, own_metric), own_metric, own_mode, within_arm=True)
        if pick is not None:
            chosen.append(group.loc[pick["index"]])
    best = pd.DataFrame(chosen)
    if best.empty:
        return best.assign(setting=[])
    if metric in best:
        best = best.sort_values(metric, ascending=mode == "min", na_position="last")
    return best


def _candidates(table: pd.DataFrame, metric: str) -> list[dict[str, Any]]:
    """Rows of :func:`trials_table` as the trial records :func:`study.selection.select_best` ranks (the fields of
    a trial in ``results/sweep.json``), each with its row ``index``."""
    records = []
    for index, row in table.iterrows():
        own = row.get("selection_metric")
        records.append({
            "index": index,
            "status": row.get("status"),
            "metric": own if isinstance(own, str) else metric,
            "metrics": {name: row.get(name) for name in table.columns},
            "elbo_valid": str(row.get("elbo_valid")).lower() == "true",
        })
    return records


def best_overall(best: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The best trial of the sweep by its ``metric``, from the best-per-setting rows, by the rule the sweep's
    summary uses (:func:`study.selection.select_best`); None when no row competes."""
    pick = select_best(_candidates(best, metric), metric, mode) if not best.empty else None
    return best.loc[pick["index"]] if pick is not None else None


def sampled_text(row: pd.Series, sampled: list[str]) -> str:
    """A trial's sampled hyperparameters as ``key=value, ...`` (numbers to 4 significant digits), e.g.
    ``train.beta=0.5, train.lr=0.0003162``; ``-`` when the searcher sampled none."""
    parts = []
    for key in sampled:
        value = row.get(key)
        if value is None or (isinstance(value, float) and pd.isna(value)):
            continue
        try:
            text = format_value(float(value)) if not isinstance(value, bool) else str(value)
        except (TypeError, ValueError):
            text = str(value)
        parts.append(f"{key}={text}")
    return ", ".join(parts) or "-"


def _markdown_table(frame: pd.DataFrame, columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|\n"
    lines = []
    for _, row in frame.iterrows():
        cells = []
        for col in columns:
            value = row.get(col)
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _figure(client: MlflowClient, run_id: str, title: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        recon = plt.imread(client.download_artifacts(run_id, "images/reconstructions.png", tmp))
        samples = plt.imread(client.download_artifacts(run_id, "images/samples.png", tmp))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [recon.shape[1], samples.shape[1]]})
        axes[0].imshow(recon)
        axes[0].set_title("validation inputs (rows 1, 3, ...) and\nreconstructions E[x | mu(x)] (rows 2, 4, ...)",
                          fontsize=9)
        axes[1].imshow(samples)
        axes[1].set_title("prior samples E[x | z], z ~ N(0, I)", fontsize=9)
        for ax in axes:
            ax.axis("off")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        out = Path(tmp) / "figure.png"
        fig.savefig(out, dpi=120, bbox_inches="tight")  # no title cut at the canvas edge
        plt.close(fig)
        return out.read_bytes()


def objectives_front(table: pd.DataFrame, objectives: list[dict[str, str]]) -> pd.DataFrame:
    """The finished trials of ``table`` (:func:`trials_table`) that no other finished trial dominates on
    ``objectives`` (``[{metric, mode}, ...]``), sorted by the first objective."""
    names = [o["metric"] for o in objectives]
    if not all(n in table for n in names):
        return table.iloc[0:0]
    finished = table[table["status"] == "FINISHED"]
    if finished.empty:
        return finished
    mask = pareto_front(finished, minimise=[o["metric"] for o in objectives if o["mode"] == "min"],
                        maximise=[o["metric"] for o in objectives if o["mode"] == "max"])
    return finished[mask].sort_values(names[0], ascending=objectives[0]["mode"] == "min")


def _objectives_figure(table: pd.DataFrame, front: pd.DataFrame, objectives: list[dict[str, str]]) -> bytes:
    """Every finished trial in the plane of two objectives, coloured by arm, the Pareto front circled."""
    x, y = (o["metric"] for o in objectives)
    finished = table[table["status"] == "FINISHED"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name, group in finished.groupby(finished["variant"].fillna("trials").astype(str)):
        ax.scatter(group[x], group[y], s=28, alpha=0.8, label=name)
    if not front.empty:
        ax.plot(front[x], front[y], color="black", linewidth=1, alpha=0.7)
        ax.scatter(front[x], front[y], s=110, facecolors="none", edgecolors="black", linewidths=1.2,
                   label="Pareto front")
    ax.set_xlabel(f"{x} ({'lower' if objectives[0]['mode'] == 'min' else 'higher'} is better)")
    ax.set_ylabel(f"{y} ({'lower' if objectives[1]['mode'] == 'min' else 'higher'} is better)")
    ax.set_title("Multi-objective sweep: final epoch of every finished trial", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pareto.png"
        fig.savefig(out, dpi=120, bbox_inches="tight")  # no title cut at the canvas edge
        plt.close(fig)
        return out.read_bytes()


def write_report(summary: dict[str, Any], output_dir: str | Path, client: MlflowClient) -> dict[str, Any]:
    """Write every report file for the sweep ``summary`` (``results/sweep.json``) into ``output_dir``.

    Returns:
        The content of ``metrics.json``.

    Raises:
        RuntimeError: the sweep has no runs in MLflow (wrong tracking URI?).
    """
    output_dir = Path(output_dir)
    runs = load_runs(client, summary["experiment_id"], summary["parent_run_id"])
    if runs.empty:
        raise RuntimeError(
            f"no child runs of sweep run {summary['parent_run_id']} in MLflow at {summary['tracking_uri']}: "
            "is MLFLOW_TRACKING_URI / tracking.uri the store the sweep logged to?"
        )
    sampled = sorted({k for t in summary["trials"] for k in t["config"]})
    table = trials_table(runs, sampled)
    atomic_write_text(output_dir / "trials.csv", table.to_csv(index=False))

    metric, mode = summary["metric"], summary["mode"]
    best_all = best_per_setting(table, runs, metric, mode)
    if not best_all.empty:  # what a sweep user wants of a best row: which trial, and with what values
        best_all = best_all.assign(sampled=[sampled_text(row, sampled) for _, row in best_all.iterrows()])
    valid = best_all["elbo_valid"] == "true" if not best_all.empty else pd.Series(dtype=bool)
    best, losses = best_all[valid], best_all[~valid]
    columns = ["setting", "trial_id", "run_id", "epochs_run", "sampled"] + [m for m in SUMMARY_METRICS if m in best_all]
    loss_columns = [c for c in columns if c not in ELBO_METRICS]
    failed = table[table["status"] == "FAILED"]
    md = [
        f"# Sweep `{summary['sweep']}`\n",
        f"{len(table)} trials in MLflow (parent run `{summary['parent_run_id']}`): "
        f"{int((table['status'] == 'FINISHED').sum())} finished "
        f"({int((table['early_stopped'] == 'true').sum())} stopped early by the scheduler), {len(failed)} failed.",
        f"Selection metric: `{metric}` ({mode}), applied within each setting. ELBO and KL in nats per image;",
        "bits per dimension = -ELBO / (D ln 2) over the dimensions modelled; MSE per pixel on the [0, 255] scale",
        "(in RGB for YCbCr data).\n",
        "## Best trial per likelihood setting\n",
        _markdown_table(best, columns) if not best.empty else "No likelihood trial finished.\n",
    ]
    if not losses.empty:
        md += [
            "\n## Other arms (comparison losses and the AVAE: not normalised likelihoods, never ranked by ELBO or NLL)\n",
            _markdown_table(losses, loss_columns),
        ]
    if not failed.empty:
        md += ["\n## Failed trials\n", _markdown_table(failed.assign(reason=runs.loc[failed.index].get("tags.failure_reason")),
                                                       ["run_id", "trial_id", "reason"])]
    objectives = summary.get("objectives") or []
    front = objectives_front(table, objectives) if len(objectives) == 2 else None
    if front is not None:
        names = [o["metric"] for o in objectives]
        directions = ", ".join(f"`{o['metric']}` ({o['mode']})" for o in objectives)
        section = [
            "\n## Pareto front\n",
            f"Finished trials that no other finished trial beats on both objectives, {directions}, at their last "
            "epoch (a trial the scheduler stopped early competes with its last values). "
            "Figure: `figures/pareto_objectives.png`.\n",
            _markdown_table(front, ["run_id", "trial_id", "variant", *names, *[c for c in sampled if c in front]])
            if not front.empty else "No finished trial has both objectives.\n",
        ]
        md += section
        title = f"# Sweep `{summary['sweep']}`: Pareto front\n"
        atomic_write_text(output_dir / "pareto_front.md", title + "\n".join(section))
        figure = _objectives_figure(table, front, objectives)
        atomic_write_bytes(output_dir / "figures" / "pareto_objectives.png", figure)
    atomic_write_text(output_dir / "summary.md", "\n".join(md))

    metrics: dict[str, Any] = {
        "num_trials": int(len(table)),
        "num_finished": int((table["status"] == "FINISHED").sum()),
        "num_failed": int(len(failed)),
        "num_early_stopped": int((table["early_stopped"] == "true").sum()),
    }
    if front is not None:
        metrics["pareto_front"] = list(front["run_id"])
    metrics["per_setting"] = {
        row["setting"]: {m: float(row[m]) for m in SUMMARY_METRICS if m in row and pd.notna(row[m])
                         and (row["elbo_valid"] == "true" or m not in ELBO_METRICS)}
        for _, row in best_all.iterrows()
    }
    top = best_overall(best_all, metric, mode)
    if top is not None:
        metrics["best"] = {"run_id": top["run_id"], "setting": top["setting"]} | {
            m: float(top[m]) for m in SUMMARY_METRICS if m in top and pd.notna(top[m])
        }
        title = f"best trial {top['trial_id']} ({top['setting']}): {metric} = {top[metric]:.1f}"
        atomic_write_bytes(output_dir / "best_reconstructions.png", _figure(client, top["run_id"], title))
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_paper_report(evaluation_dir: str | Path, output_dir: str | Path, trials: pd.DataFrame,
                       baseline: str | None = None) -> dict[str, Path]:
    """Paper-style tables and figures from an ``evaluate`` stage's outputs and the sweep's trials table.

    With seed replicates in the evaluation (its ``replicates`` block and ``per_image.npz``), every table cell is
    the mean +- 95% Student-t interval over the arm's seeds (the selected trial's spread over test images kept
    beside it; :mod:`study.report_tables`), and ``tables/paired_comparisons`` compares each arm with the
    ``baseline`` arm image by image (:mod:`study.report_replicates`).

    Args:
        evaluation_dir: holds ``summary.json`` (per arm: run id, family, elbo_valid, metrics; optionally
            ``replicates``), ``examples.npz`` (``<arm>/input``, ``<arm>/reconstruction``, ``<arm>/sample``: float
            (n, H, W, 3)) and, with replicates, ``per_image.npz``.
        output_dir: ``tables/`` and ``figures/`` are written there.
        trials: :func:`trials_table` of every trial (validation metrics, for the all-trials plots).
        baseline: ``report.baseline``, the arm of the paired comparisons (None: the first Gaussian arm).

    Returns:
        name -> path of every file written.
    """
    import numpy as np

    from study.report_replicates import (
        has_replicates,
        load_evaluation,
        paired_comparisons,
        paired_table,
        seed_summaries,
    )

    evaluation_dir, output_dir = Path(evaluation_dir), Path(output_dir)
    evaluation, per_image = load_evaluation(evaluation_dir)
    split = evaluation["split"]
    rows = []
    for arm, result in evaluation["arms"].items():
        row = {"family": result["family"], "setting": arm, "run_id": result["run_id"], "elbo_valid": result["elbo_valid"]}
        row |= result["metrics"]
        row |= {name: float("nan") for name in result["unavailable"]}
        rows.append(row)
    written: dict[str, Path] = {}
    replicated = has_replicates(evaluation)
    seeds = seed_summaries(evaluation) if replicated else None
    tables = paper_tables(pd.DataFrame(rows), prefix=split, seeds=seeds, num_images=evaluation.get("num_images"))
    if replicated:
        tables["paired_comparisons"] = paired_table(paired_comparisons(evaluation, per_image, baseline))
    for name, (markdown, csv) in tables.items():
        written[f"{name}.md"] = atomic_write_text(output_dir / "tables" / f"{name}.md", markdown)
        written[f"{name}.csv"] = atomic_write_text(output_dir / "tables" / f"{name}.csv", csv)

    figures = output_dir / "figures"
    with np.load(evaluation_dir / "examples.npz") as npz:
        sets: dict[str, dict[str, np.ndarray]] = {}
        for key in npz.files:
            arm, kind = key.split("/")
            sets.setdefault(arm, {})[kind] = npz[key]
    if sets:
        first = next(iter(sets.values()))
        # One row per arm: the same test inputs, its reconstructions and its samples.
        written["comparison_grid.png"] = atomic_write_bytes(figures / "comparison_grid.png", grid_comparison(sets))
        recons = {arm: s["reconstruction"] for arm, s in sets.items()}
        written["residual_maps.png"] = atomic_write_bytes(figures / "residual_maps.png", residual_maps(first["input"], recons))
    frame = trials[trials["status"] == "FINISHED"].copy()
    # The tables' units: MSE on [0, 255]; the variance loss ([0, 1]^2 pixel units) scaled alike so y = x still
    # compares the two (Asperti 2020).
    if "val_variance_loss" in frame:
        frame["val_variance_loss_255"] = frame["val_variance_loss"] * 255.0**2
    frame["full_schedule"] = frame.get("early_stopped", pd.Series("false", index=frame.index)).astype(str) != "true"
    arm = "variant" if "variant" in frame and frame["variant"].notna().all() else "family"
    written["pareto_mse_sharpness.png"] = atomic_write_bytes(
        figures / "pareto_mse_sharpness.png",
        pareto_mse_sharpness(frame, x="val_mse_255", y="val_sharpness_ratio", label=arm, complete="full_schedule"),
    )
    written["variance_loss_vs_mse.png"] = atomic_write_bytes(
        figures / "variance_loss_vs_mse.png",
        variance_loss_vs_mse(frame, x="val_mse_255", y="val_variance_loss_255", label=arm, complete="full_schedule",
                             scale="[0, 255]"),
    )
    return written
