"""The result of one evaluation and its JSON form: :class:`EvaluationResult` (metrics, reasons for unavailable
metrics, implementations, the per-image table and the settings), with strict-JSON export (non-finite floats become
``null``) and import, and one report row per result.

Produced by :func:`study.evaluate.evaluate_model`; read by ``pipelines/evaluate.py`` and :mod:`study.report_tables`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class EvaluationResult:
    """Everything one evaluation produced.

    Attributes:
        metrics: flat name -> float, e.g. ``test_mse_255``, ``test_mse_255_std``, ``test_psnr``, ``test_ssim``,
            ``test_sharpness_ratio``, ``test_gradient_ratio``, ``test_variance_loss_recon``,
            ``test_variance_loss_samples``, ``test_variance_loss_mse_ratio``, ``test_nll``, ``test_nll_std``,
            ``test_nll_bits_per_dim``, ``test_elbo``, ``test_avg_kl``, ``test_mutual_information``,
            ``test_marginal_kl``, ``test_max_mutual_information``, ``test_lpips``, ``test_fid_recon``,
            ``test_fid_samples`` (the prefix is the evaluated split). Units: MSE in squared pixel units of its
            scale, PSNR in dB, NLL / ELBO / KL / MI in nats per image, FID in squared feature units. A metric is
            never both here and in ``unavailable``.
        unavailable: metric name -> why it was not computed (missing weights, not a normalised density, ...).
        implementations: what produced the metrics that have several implementations (``fid``, ``lpips``, ...).
        per_image: one row per evaluated image (index ``image``, in input order) with columns such as ``mse``,
            ``mse_255``, ``mse_pm1``, ``psnr``, ``ssim``, ``laplacian_variance_input``,
            ``laplacian_variance_recon``, ``gradient_magnitude_input``, ``gradient_magnitude_recon``, ``lpips``,
            ``nll``, ``nll_bits_per_dim``, ``elbo``, ``elbo_reconstruction``, ``kl``; a column exists only when its
            metric was computed.
        settings: how the evaluation ran (number of images, K, passes, seed, colour handling, model path, ...).
    """

    metrics: dict[str, float]
    unavailable: dict[str, str]
    implementations: dict[str, str]
    per_image: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, per_image: bool = True) -> dict[str, Any]:
        """A JSON-ready dict; non-finite floats (an infinite PSNR, a NaN ratio) become ``None``."""
        out: dict[str, Any] = {
            "metrics": {k: _finite_or_none(v) for k, v in self.metrics.items()},
            "unavailable": dict(self.unavailable),
            "implementations": dict(self.implementations),
            "settings": _jsonable(self.settings),
        }
        if per_image:
            out["per_image"] = {
                col: [_finite_or_none(v) for v in self.per_image[col].tolist()] for col in self.per_image.columns
            }
        return out

    def to_json(self, per_image: bool = True, indent: int | None = 2) -> str:
        """Strict JSON (no NaN / Infinity tokens: non-finite values are ``null``) of :meth:`to_dict`."""
        return json.dumps(self.to_dict(per_image), indent=indent, allow_nan=False, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> EvaluationResult:
        """Inverse of :meth:`to_json` (``null`` values come back as NaN)."""
        raw = json.loads(text)
        per_image = pd.DataFrame(
            {k: [math.nan if v is None else v for v in vals] for k, vals in raw.get("per_image", {}).items()}
        )
        per_image.index.name = "image"
        return cls(
            metrics={k: math.nan if v is None else float(v) for k, v in raw["metrics"].items()},
            unavailable=dict(raw["unavailable"]),
            implementations=dict(raw["implementations"]),
            per_image=per_image,
            settings=dict(raw.get("settings", {})),
        )

    def per_image_arrays(self) -> dict[str, np.ndarray]:
        """The per-image table as arrays for paired tests: column name -> float64 (N,), image i of every array the
        i-th evaluated image (input order).

        Always present: ``mse`` and ``mse_255`` (MSE of the clamped reconstruction per pixel on [0, 1] and on
        [0, 255], in pixel space: RGB against the pre-conversion RGB for YCbCr data, as the aggregate
        ``<prefix>_mse_255`` is), ``psnr`` (dB); for a normalised density also ``nll`` (IWAE bound, Burda et al.
        2016, nats per image), ``nll_bits_per_dim``, ``elbo``, ``kl`` (nats). The mean of each array over images
        is the aggregate metric ``<prefix>_<name>`` (:func:`study.evaluate_metrics.summarise`).
        """
        return {str(col): self.per_image[col].to_numpy(dtype=np.float64) for col in self.per_image.columns}

    def to_row(self) -> dict[str, Any]:
        """One row for :mod:`study.report_tables`: every metric (NaN where unavailable) plus ``elbo_valid``."""
        row: dict[str, Any] = dict(self.metrics)
        row.update({name: math.nan for name in self.unavailable})
        row["elbo_valid"] = bool(self.settings.get("elbo_valid", False))
        return row


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return _finite_or_none(value)
