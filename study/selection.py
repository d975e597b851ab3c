"""Which trial is "the best": the one rule the sweep's summary and the report both apply.

A trial competes on a metric when

1. it finished (an errored trial has no final value to rank);
2. its value of the metric is finite;
3. its arm selected trials by that same metric (an arm tuned towards another metric, e.g. an AVAE arm selected by
   ``val_mse_255``, is not ranked against arms selected by ``val_elbo``); and
4. across arms, when the metric is a density quantity (:data:`DENSITY_METRICS`: ELBO, log-likelihood, NLL, bits
   per dimension), its reconstruction term is a normalised density of x given z (``elbo_valid``). A comparison
   loss (SSIM, focal frequency, LPIPS), a plug-in estimator whose density depends on x itself, or the AVAE has no
   ELBO that means what a likelihood's does, so ranking it against a likelihood by one would compare a loss value
   with a log-density. Within one arm (``within_arm=True``: one family, one objective) the arm's own metric ranks
   its trials whatever it is: for a loss arm its "ELBO" is minus its objective, which is what the arm was tuned on.

Whether a metric is a density quantity is an explicit list of names, never a guess from a substring of the name.
Nothing here imports Ray, MLflow or pandas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

_SPLITS = ("train", "val", "test")
_DENSITY_NAMES = ("elbo", "log_likelihood", "bits_per_dim", "nll", "nll_bits_per_dim", "elbo_reconstruction")

#: Metric names whose value is (a bound on) a log-density of the data: only ``elbo_valid`` trials are ranked by them.
DENSITY_METRICS: frozenset[str] = frozenset(f"{split}_{name}" for split in _SPLITS for name in _DENSITY_NAMES)


def is_density_metric(metric: str) -> bool:
    """Whether ``metric`` is in :data:`DENSITY_METRICS` (e.g. ``val_elbo``: True; ``val_mse_255``: False)."""
    return metric in DENSITY_METRICS


def _value(trial: Mapping[str, Any], metric: str) -> float | None:
    value = (trial.get("metrics") or {}).get(metric)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def competes(trial: Mapping[str, Any], metric: str, *, within_arm: bool = False) -> bool:
    """Whether ``trial`` may be ranked by ``metric`` (the four conditions of the module docstring).

    Args:
        trial: ``status`` (``FINISHED`` / ``FAILED``), ``metric`` (its arm's selection metric), ``metrics``
            (name -> value) and ``elbo_valid`` (bool) — the fields of a trial in ``results/sweep.json``.
        metric: the metric to rank by.
        within_arm: the trials ranked together are one arm's (condition 4 does not apply).
    """
    if trial.get("status") != "FINISHED" or trial.get("metric", metric) != metric:
        return False
    if _value(trial, metric) is None:
        return False
    return within_arm or bool(trial.get("elbo_valid", False)) or not is_density_metric(metric)


def select_best(trials: Iterable[Mapping[str, Any]], metric: str, mode: Literal["min", "max"], *,
                within_arm: bool = False) -> Mapping[str, Any] | None:
    """The trial with the best ``metric`` among those that :func:`competes`; None when none does.

    Ties keep the first trial in ``trials`` order.

    Raises:
        ValueError: ``mode`` is not ``min`` or ``max``.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    sign = 1.0 if mode == "max" else -1.0
    best, best_score = None, -math.inf
    for trial in trials:
        if not competes(trial, metric, within_arm=within_arm):
            continue
        score = sign * _value(trial, metric)  # type: ignore[operator]
        if best is None or score > best_score:
            best, best_score = trial, score
    return best
