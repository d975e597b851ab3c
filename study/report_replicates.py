"""Seed replicates in the report: per-arm mean and confidence interval over seeds of every test metric, and paired
comparisons of each arm with a baseline arm on the same test images (pure numpy / scipy / pandas; no MLflow).

Input: the ``evaluate`` stage's ``summary.json`` (its ``replicates`` block: arm -> evaluated replicates, each with
``seed``, ``run_id``, ``metrics`` and ``elbo_valid``) and ``per_image.npz`` (float64 (N,) arrays keyed
``<arm>/<run_id>/<metric>``: ``nll`` in nats per image, ``mse_255`` per pixel on [0, 255], ...). A replicate is
the arm's selected configuration re-trained with a fresh seed; the selected trial itself is not one of them (the
search picked it for its validation score, so its test score is biased upwards).

- :func:`seed_summaries`: per arm and metric, the mean over seeds and the half-width of the two-sided Student-t
  interval, t_{(1 + c) / 2, n - 1} s / sqrt(n) (:func:`study.statistics.mean_ci`).
- :func:`paired_comparisons`: per arm and metric (:data:`PAIRED_METRICS`), the per-image values averaged over the
  arm's seeds minus those of the baseline averaged over its seeds, their mean, its Student-t interval and two
  two-sided paired tests over the test images (paired t-test and Wilcoxon signed-rank;
  :func:`study.statistics.paired_comparison_over_seeds`). A difference < 0 favours the arm (both metrics are lower
  is better). NLL is compared only when both arms are normalised densities (``elbo_valid``); the others are listed
  apart, never ranked by NLL.
- :func:`paired_table` (Markdown and CSV) and :func:`replicate_metrics` (the ``replicates`` block of the report's
  ``metrics.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from study.report_tables import SEED_CONFIDENCE, SeedSummary, _markdown, format_value
from study.statistics import TEST_NAMES, mean_ci, paired_comparison_over_seeds

#: Per-image metric -> its label: the metrics compared image by image (``per_image.npz`` names).
PAIRED_METRICS: dict[str, str] = {"nll": "NLL (nats per image)", "mse_255": "MSE [0, 255]"}
#: Metrics that exist only for a normalised density p(x | z) (elbo_valid).
DENSITY_METRICS = frozenset({"nll"})
#: The tests reported for every comparison, in table order (keys of :data:`study.statistics.TEST_NAMES`).
TESTS = ("t", "wilcoxon")


def load_evaluation(evaluation_dir: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``summary.json`` and ``per_image.npz`` (key -> float64 (N,) array; empty if the file is absent)."""
    evaluation_dir = Path(evaluation_dir)
    evaluation = json.loads((evaluation_dir / "summary.json").read_text())
    path = evaluation_dir / "per_image.npz"
    per_image: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path) as npz:
            per_image = {key: np.asarray(npz[key], dtype=np.float64) for key in npz.files}
    return evaluation, per_image


def has_replicates(evaluation: dict[str, Any]) -> bool:
    """True when the evaluation holds a replicates block with at least one evaluated replicate."""
    return any(evaluation.get("replicates", {}).values())


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def seed_summaries(evaluation: dict[str, Any], confidence: float = SEED_CONFIDENCE
                   ) -> dict[str, dict[str, SeedSummary]]:
    """Arm -> metric -> :class:`study.report_tables.SeedSummary` over the arm's evaluated replicates.

    Every metric any replicate of the arm has (or lists as unavailable) is summarised. A metric finite in all n
    seeds gets its mean and Student-t half-width (``inf`` for n = 1); one missing or non-finite in some seeds gets
    ``n`` = the seeds that have it and NaN mean / half-width, so a table shows the gap instead of an average over
    the remaining seeds. Arms without an evaluated replicate are absent.
    """
    out: dict[str, dict[str, SeedSummary]] = {}
    for arm, replicates in (evaluation.get("replicates") or {}).items():
        if not replicates:
            continue
        names = sorted({m for rep in replicates for m in (*rep.get("metrics", {}), *rep.get("unavailable", {}))})
        total = len(replicates)
        summaries = {}
        for name in names:
            values = [rep.get("metrics", {}).get(name) for rep in replicates]
            finite = [float(v) for v in values if _finite(v)]
            if len(finite) == total:
                mean, half, n = mean_ci(finite, confidence)
                summaries[name] = SeedSummary(mean, half, n, total)
            else:
                summaries[name] = SeedSummary(math.nan, math.nan, len(finite), total)
        out[arm] = summaries
    return out


def choose_baseline(evaluation: dict[str, Any], requested: str | None) -> tuple[str | None, str]:
    """The baseline arm and how it was chosen (or why there is none).

    ``requested`` (``report.baseline``) wins; otherwise the first arm, in the sweep's order, whose family is
    ``gaussian``. None when the requested arm was not evaluated, or no arm is Gaussian.
    """
    arms = evaluation.get("arms", {})
    if requested is not None:
        if requested in arms or requested in (evaluation.get("replicates") or {}):
            return requested, f"report.baseline = {requested}"
        return None, f"report.baseline {requested!r} was not evaluated (evaluated arms: {sorted(arms)})"
    for arm, record in arms.items():
        if record.get("family") == "gaussian":
            return arm, "the first Gaussian arm, as report.baseline is null"
    return None, "no arm has the gaussian family: set report.baseline to compare the arms"


def _elbo_valid(evaluation: dict[str, Any], arm: str) -> bool:
    """A normalised density for the selected trial and every replicate of the arm."""
    selected = evaluation.get("arms", {}).get(arm, {}).get("elbo_valid")
    replicates = (evaluation.get("replicates") or {}).get(arm, [])
    flags = ([bool(selected)] if selected is not None else []) + [bool(r.get("elbo_valid")) for r in replicates]
    return bool(flags) and all(flags)


@dataclass
class Comparisons:
    """What :func:`paired_comparisons` found.

    Attributes:
        baseline: the baseline arm (None: no comparison was possible, see ``baseline_rule``).
        baseline_rule: how it was chosen, or why there is none.
        rows: one dict per computed comparison: ``metric``, ``arm``, ``baseline``, ``arm_seeds``,
            ``baseline_seeds``, ``images``, ``mean_difference``, ``ci_low``, ``ci_high`` (arm - baseline, the
            metric's units), ``p_t`` and ``p_wilcoxon`` (two-sided), ``confidence``.
        not_compared: one dict per (metric, arm) left out: ``metric``, ``arm``, ``reason``.
    """

    baseline: str | None
    baseline_rule: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    not_compared: list[dict[str, str]] = field(default_factory=list)


def _seed_matrix(per_image: dict[str, np.ndarray], arm: str, replicates: list[dict[str, Any]], metric: str
                 ) -> np.ndarray:
    """float64 (seeds, images) of one arm's replicates for ``metric``.

    Raises:
        KeyError: a replicate's array is not in ``per_image.npz``.
    """
    rows = []
    for rep in replicates:
        key = f"{arm}/{rep['run_id']}/{metric}"
        if key not in per_image:
            raise KeyError(f"per_image.npz has no {key!r}")
        rows.append(per_image[key])
    return np.stack(rows)


def paired_comparisons(evaluation: dict[str, Any], per_image: dict[str, np.ndarray], baseline: str | None = None,
                       confidence: float = SEED_CONFIDENCE) -> Comparisons:
    """Each arm against the baseline on per-test-image values averaged over seeds (see the module docstring).

    Args:
        evaluation: the evaluate stage's ``summary.json``.
        per_image: ``per_image.npz`` as a dict (:func:`load_evaluation`).
        baseline: ``report.baseline`` (None: the first Gaussian arm).
        confidence: of the mean difference's interval.

    Returns:
        :class:`Comparisons`. A comparison that cannot be made (an arm without finished replicates, a missing
        array, NaN values, a non-density arm for NLL) is in ``not_compared`` with the reason, never silently
        dropped.
    """
    chosen, rule = choose_baseline(evaluation, baseline)
    result = Comparisons(chosen, rule)
    replicates = evaluation.get("replicates") or {}
    if chosen is None:
        return result
    base_reps = replicates.get(chosen, [])
    base_valid = _elbo_valid(evaluation, chosen)
    arms = [a for a in dict.fromkeys([*evaluation.get("arms", {}), *replicates]) if a != chosen]
    for metric in PAIRED_METRICS:
        for arm in arms:
            reps = replicates.get(arm, [])

            def skip(reason: str) -> None:
                result.not_compared.append({"metric": metric, "arm": arm, "reason": reason})

            if metric in DENSITY_METRICS and not (base_valid and _elbo_valid(evaluation, arm)):
                which = arm if not _elbo_valid(evaluation, arm) else chosen
                skip(f"{which} is not a normalised density (elbo_valid = false): no NLL to compare")
                continue
            if not reps or not base_reps:
                skip(f"no finished replicate of {arm if not reps else chosen}")
                continue
            try:
                a = _seed_matrix(per_image, arm, reps, metric)
                b = _seed_matrix(per_image, chosen, base_reps, metric)
                comparisons = {test: paired_comparison_over_seeds(a, b, confidence, test) for test in TESTS}
            except (KeyError, ValueError) as err:
                skip(str(err).strip("'\""))
                continue
            t = comparisons["t"]
            result.rows.append({
                "metric": metric, "arm": arm, "baseline": chosen, "arm_seeds": int(a.shape[0]),
                "baseline_seeds": int(b.shape[0]), "images": t.n, "mean_difference": t.mean_difference,
                "ci_low": t.ci_low, "ci_high": t.ci_high, "p_t": t.p_value,
                "p_wilcoxon": comparisons["wilcoxon"].p_value, "confidence": confidence,
            })
    return result


_P_HEADERS = {"t": f"p, {TEST_NAMES['t']}", "wilcoxon": f"p, {TEST_NAMES['wilcoxon']}"}


def paired_table(comparisons: Comparisons) -> tuple[str, str]:
    """(markdown, csv) of the paired comparisons; the comparisons left out are listed under the Markdown table."""
    level = int(round(100 * SEED_CONFIDENCE))
    headers = ["Metric", "Arm", "Baseline", "Seeds (arm / baseline)", "Test images",
               "Mean difference (arm - baseline)", f"{level}% CI", _P_HEADERS["t"], _P_HEADERS["wilcoxon"]]
    md_rows = [[PAIRED_METRICS[r["metric"]], r["arm"], r["baseline"], f"{r['arm_seeds']} / {r['baseline_seeds']}",
                str(r["images"]), format_value(r["mean_difference"]),
                f"[{format_value(r['ci_low'])}, {format_value(r['ci_high'])}]",
                format_value(r["p_t"]), format_value(r["p_wilcoxon"])] for r in comparisons.rows]
    baseline = f"`{comparisons.baseline}`" if comparisons.baseline else "(none)"
    caption = (f"*Paired comparisons with the baseline arm {baseline}: {comparisons.baseline_rule}. For each test "
               "image, the "
               "metric is averaged over each arm's seed replicates; the difference arm - baseline of these averages "
               f"is then averaged over the test images, with its two-sided {level}% Student-t interval over images "
               "and two two-sided paired tests of 'no difference' over images (the paired t-test, scipy.stats."
               "ttest_rel, and the Wilcoxon signed-rank test, scipy.stats.wilcoxon). NLL: IWAE bound in nats per "
               "image; MSE per pixel on [0, 255] (in RGB for YCbCr data). Both are lower is better, so a negative "
               "difference favours the arm. NLL is compared only between normalised densities (elbo_valid).*")
    markdown = f"{caption}\n\n" + (_markdown(headers, md_rows) if md_rows else "No comparison could be made.\n")
    if comparisons.not_compared:
        markdown += "\nNot compared:\n\n" + "".join(
            f"- {PAIRED_METRICS[r['metric']]}, {r['arm']}: {r['reason']}\n" for r in comparisons.not_compared)
    columns = ["metric", "arm", "baseline", "arm_seeds", "baseline_seeds", "images", "mean_difference", "ci_low",
               "ci_high", "p_t", "p_wilcoxon", "confidence"]
    csv = pd.DataFrame.from_records(comparisons.rows, columns=columns).to_csv(index=False)
    return markdown, csv


def _json_number(value: float) -> float | None:
    return float(value) if _finite(value) else None


def replicate_metrics(evaluation: dict[str, Any], per_image: dict[str, np.ndarray], baseline: str | None = None,
                      confidence: float = SEED_CONFIDENCE) -> dict[str, Any] | None:
    """The ``replicates`` block of the report's ``metrics.json`` (strict JSON: non-finite numbers are null), or
    None without replicates.

    Layout: ``confidence``, ``baseline``, ``baseline_rule``; ``arms.<arm>``: ``n_seeds``, ``seeds``, ``run_ids``,
    ``failed`` (the skipped replicates' seeds) and ``metrics.<metric>``: ``mean``, ``ci_half_width``,
    ``ci_low``, ``ci_high``, ``n``, ``total``; ``paired.<metric>.<arm>``: a row of :class:`Comparisons`;
    ``not_compared.<metric>.<arm>``: the reason.
    """
    if not has_replicates(evaluation):
        return None
    summaries = seed_summaries(evaluation, confidence)
    skipped = evaluation.get("replicates_skipped") or {}
    arms_block: dict[str, Any] = {}
    for arm, replicates in (evaluation.get("replicates") or {}).items():
        arms_block[arm] = {
            "n_seeds": len(replicates),
            "seeds": [r["seed"] for r in replicates],
            "run_ids": [r["run_id"] for r in replicates],
            "failed": [r.get("seed") for r in skipped.get(arm, [])],
            "metrics": {
                name: {"mean": _json_number(s.mean), "ci_half_width": _json_number(s.half_width),
                       "ci_low": _json_number(s.mean - s.half_width), "ci_high": _json_number(s.mean + s.half_width),
                       "n": s.n, "total": s.total}
                for name, s in summaries.get(arm, {}).items()
            },
        }
    comparisons = paired_comparisons(evaluation, per_image, baseline, confidence)
    paired: dict[str, dict[str, Any]] = {}
    for row in comparisons.rows:
        paired.setdefault(row["metric"], {})[row["arm"]] = {k: (_json_number(v) if isinstance(v, float) else v)
                                                            for k, v in row.items() if k not in ("metric", "arm")}
    not_compared: dict[str, dict[str, str]] = {}
    for row in comparisons.not_compared:
        not_compared.setdefault(row["metric"], {})[row["arm"]] = row["reason"]
    return {"confidence": confidence, "baseline": comparisons.baseline, "baseline_rule": comparisons.baseline_rule,
            "arms": arms_block, "paired": paired, "not_compared": not_compared}


__all__ = [
    "DENSITY_METRICS",
    "PAIRED_METRICS",
    "TESTS",
    "Comparisons",
    "choose_baseline",
    "has_replicates",
    "load_evaluation",
    "paired_comparisons",
    "paired_table",
    "replicate_metrics",
    "seed_summaries",
]
