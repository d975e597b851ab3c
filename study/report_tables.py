"""Paper-style tables of evaluated trials, as Markdown and CSV strings (pure pandas; no MLflow).

Input: a DataFrame with one row per evaluated trial (a (family / setting, run) pair), holding the metric columns
that :func:`study.evaluate.evaluate_model` produces (``<prefix>_mse_255``, ``<prefix>_mse_255_std``, ...; see
:meth:`study.evaluate.EvaluationResult.to_row`) plus ``family``, ``setting``, ``run_id`` and ``elbo_valid``. A
metric that is missing or NaN is shown as ``unavailable`` (e.g. FID without the Inception weights). Rows keep the
order (family, setting, run_id); pick the runs to show (e.g. the best run per setting) before calling.

Tables (the papers' layouts):

- ``dorta_table1``: Dorta et al. 2018, Table 1: NLL (IWAE bound, nats per image, mean +- std over test images;
  lower is better) and bits per dimension, avg KL, mutual information, marginal KL, max MI = log N. Only rows with
  ``elbo_valid`` true: losses that are not normalised densities have no NLL and are never ranked by it; they are
  named in a note under the Markdown table.
- ``dorta_table2``: Dorta et al. 2018, Table 2: MSE on the [0, 255] scale, mean +- std over images.
- ``avae``: Plumerault et al. 2020 (AVAE): MSE, LPIPS, FID. MSE is given on the [0, 1] scale and, for comparison
  with AVAE's printed numbers, on AVAE's [-1, 1] scale (4x); FID of reconstructions and of prior samples vs the test
  images, from the study's one FID implementation (comparable within the study only).
- ``all_metrics``: PSNR, SSIM, sharpness and gradient ratios (reconstructions and samples vs inputs), Asperti's
  variance loss for reconstructions and samples and its ratio to the MSE, for every row.

Formatting: ``mean +- std`` with the std rounded to 2 significant digits and the mean to the same decimal place
(never dropping integer digits: -4016 +- 813); single values with 4 significant digits. The CSV holds the raw
numbers (``<column> mean`` and ``<column> std`` as separate columns, full precision) with the literal string
``unavailable`` where a value is missing.

Seed replicates (``seeds``, one :class:`SeedSummary` per arm and metric): every metric column becomes
``<column>: mean +- 95% CI (n seeds)``, the mean over the arm's replicates (re-trainings of its selected
configuration with fresh seeds) and the half-width of the two-sided Student-t interval, t_{0.975, n - 1} s /
sqrt(n) (:func:`study.statistics.mean_ci`); a column that had a spread over images keeps it as ``<column>: spread
over test images (selected trial)``. The CSV keeps the selected trial's columns and adds ``<column> seeds mean``,
``<column> seeds CI half-width`` (``inf`` for one seed) and ``<column> seeds n``. Without ``seeds`` the tables are
those of a single trial per arm, as above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from study.formatting import UNAVAILABLE, _decimals_for, _is_missing, format_value  # noqa: F401 (re-exported)

PM = " +- "
ID_COLUMNS = ("family", "setting", "run_id")
#: Label of the single-trial mean +- std column when seed replicates are shown.
SPREAD_LABEL = "spread over test images (selected trial)"
#: Label of the seed columns; the interval's confidence is :data:`SEED_CONFIDENCE`.
SEED_LABEL = "mean +- 95% CI (n seeds)"
SEED_CONFIDENCE = 0.95


@dataclass(frozen=True)
class SeedSummary:
    """One metric of one arm over its seed replicates.

    Attributes:
        mean: mean over the ``n`` seeds (the metric's units); NaN when ``n < total``.
        half_width: half-width of the two-sided Student-t interval (:data:`SEED_CONFIDENCE`), ``inf`` for n = 1.
        n: seeds with a finite value.
        total: seeds evaluated. A metric missing or non-finite in some of them is not averaged over the others
            (a diverged replicate must be seen): its cell says how many seeds lack it.
    """

    mean: float
    half_width: float
    n: int
    total: int


def format_seed_ci(summary: SeedSummary | None) -> str:
    """``mean +- half_width (n seeds)`` with :func:`format_mean_std`'s rounding (the half-width to 2 significant
    digits); ``+- n/a (1 seed)`` for a single seed, ``+- 0`` for identical seeds; ``unavailable`` when no seed has
    the metric, ``unavailable (k of n seeds not finite)`` when only some lack it."""
    if summary is None or summary.n == 0:
        return UNAVAILABLE
    if summary.n < summary.total:
        return f"{UNAVAILABLE} ({summary.total - summary.n} of {summary.total} seeds not finite)"
    unit = "seed" if summary.n == 1 else "seeds"
    if not math.isfinite(summary.half_width):
        return f"{format_value(summary.mean)}{PM}n/a ({summary.n} {unit})"
    if summary.half_width == 0:
        return f"{format_value(summary.mean)}{PM}0 ({summary.n} {unit})"
    return f"{format_mean_std(summary.mean, summary.half_width)} ({summary.n} {unit})"


def format_mean_std(mean: object, std: object, std_digits: int = 2, significant: int = 4) -> str:
    """``mean +- std`` rounded to the std's precision: std to ``std_digits`` significant digits, mean alike.

    Integer digits are never rounded away (Dorta's ``-4016 +- 813``, ``704 +- 324``); small values keep enough
    decimals (``0.0300 +- 0.0120`` -> ``0.030 +- 0.012``). Without a usable std (missing, zero) the mean alone is
    shown with ``significant`` digits; a missing mean gives ``unavailable``.

    Args:
        mean, std: floats (NaN / None: missing).
        std_digits: significant digits of the std (>= 1).
        significant: digits of a mean shown without a std.

    Returns:
        str.
    """
    if _is_missing(mean):
        return UNAVAILABLE
    if _is_missing(std) or float(std) == 0:  # type: ignore[arg-type]
        return format_value(mean, significant)
    m, s = float(mean), abs(float(std))  # type: ignore[arg-type]
    decimals = _decimals_for(s, std_digits)
    if abs(m) >= 1e6 or max(abs(m), s) < 1e-4:
        return f"{m:.{significant - 1}e}{PM}{s:.{std_digits - 1}e}"
    return f"{m:.{decimals}f}{PM}{s:.{decimals}f}"


def _as_bool(value: object) -> bool:
    """``elbo_valid`` as stored anywhere: bool, 0 / 1, or the strings MLflow params come back as."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    if _is_missing(value):
        return False
    return bool(value)


@dataclass(frozen=True)
class _Column:
    """One table column: its header and how to read it from a row (a metric, or a metric and its std)."""

    header: str
    metric: str
    with_std: bool = False


def _cell(row: pd.Series, col: _Column, prefix: str) -> str:
    mean = row.get(f"{prefix}_{col.metric}")
    if col.with_std:
        return format_mean_std(mean, row.get(f"{prefix}_{col.metric}_std"))
    return format_value(mean)


def _raw(row: pd.Series, name: str) -> object:
    value = row.get(name)
    return UNAVAILABLE if _is_missing(value) else float(value)  # type: ignore[arg-type]


def _escape(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_escape(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    frame = df.copy()
    for col in ID_COLUMNS:
        if col not in frame.columns:
            frame[col] = ""
    return frame.sort_values(list(ID_COLUMNS), kind="stable", key=lambda s: s.astype(str)).reset_index(drop=True)


Seeds = dict[str, dict[str, SeedSummary]]  # arm (the ``setting`` column) -> full metric name -> its seed summary

_SEED_CAPTION = (" Seed replicates: each metric is the mean over the arm's n replicates (its selected configuration "
                 "re-trained with n fresh seeds, the search's seed excluded so the selection does not bias it) +- "
                 "the half-width of the two-sided 95% Student-t interval, t(0.975, n - 1) s / sqrt(n), s the "
                 f"standard deviation over seeds; '{SPREAD_LABEL}' is the mean +- std over test images of the "
                 "single trial the search selected (the Run column).")


def _seed_cell(r: pd.Series, c: _Column, prefix: str, seeds: Seeds) -> str:
    arm = seeds.get(str(r["setting"]))
    if not arm:
        return f"{UNAVAILABLE} (no finished replicate)"
    return format_seed_ci(arm.get(f"{prefix}_{c.metric}"))


def _seed_raw(r: pd.Series, c: _Column, prefix: str, seeds: Seeds) -> dict[str, object]:
    summary = seeds.get(str(r["setting"]), {}).get(f"{prefix}_{c.metric}")
    usable = summary is not None and summary.n > 0 and summary.n == summary.total
    return {
        f"{c.header} seeds mean": summary.mean if usable else UNAVAILABLE,
        f"{c.header} seeds CI half-width": summary.half_width if usable else UNAVAILABLE,
        f"{c.header} seeds n": summary.n if summary is not None else 0,
    }


def _build(df: pd.DataFrame, columns: list[_Column], prefix: str, caption: str, note: str = "",
           seeds: Seeds | None = None) -> tuple[str, str]:
    """(markdown, csv) of ``df``'s rows with the id columns and ``columns`` (with seed columns when ``seeds``)."""
    ids = ["Family", "Setting", "Run"]
    if seeds:
        headers = [h for c in columns for h in ((f"{c.header}: {SEED_LABEL}", f"{c.header}: {SPREAD_LABEL}")
                                                if c.with_std else (f"{c.header}: {SEED_LABEL}",))]
        md_rows = [[str(r["family"]), str(r["setting"]), str(r["run_id"])]
                   + [cell for c in columns for cell in (
                       (_seed_cell(r, c, prefix, seeds), _cell(r, c, prefix)) if c.with_std
                       else (_seed_cell(r, c, prefix, seeds),))]
                   for _, r in df.iterrows()]
        caption = (caption[:-1] + _SEED_CAPTION + "*") if caption.endswith("*") else caption + _SEED_CAPTION
    else:
        headers = [c.header for c in columns]
        md_rows = [[str(r["family"]), str(r["setting"]), str(r["run_id"])] + [_cell(r, c, prefix) for c in columns]
                   for _, r in df.iterrows()]
    markdown = f"{caption}\n\n" + _markdown(ids + headers, md_rows)
    if note:
        markdown += f"\n{note}\n"
    records = []
    for _, r in df.iterrows():
        rec: dict[str, object] = {"family": r["family"], "setting": r["setting"], "run_id": r["run_id"]}
        for c in columns:
            if c.with_std:
                rec[f"{c.header} mean"] = _raw(r, f"{prefix}_{c.metric}")
                rec[f"{c.header} std"] = _raw(r, f"{prefix}_{c.metric}_std")
            else:
                rec[c.header] = _raw(r, f"{prefix}_{c.metric}")
        if seeds:
            for c in columns:
                rec |= _seed_raw(r, c, prefix, seeds)
        records.append(rec)
    csv_columns = list(ID_COLUMNS) + [
        name for c in columns for name in ((f"{c.header} mean", f"{c.header} std") if c.with_std else (c.header,))
    ]
    if seeds:
        csv_columns += [f"{c.header} seeds {part}" for c in columns for part in ("mean", "CI half-width", "n")]
    csv = pd.DataFrame.from_records(records, columns=csv_columns).to_csv(index=False)
    return markdown, csv


def dorta_table1(df: pd.DataFrame, prefix: str = "test", seeds: Seeds | None = None) -> tuple[str, str]:
    """Dorta et al. 2018, Table 1 style: NLL (nats, mean +- std), bits/dim, avg KL, MI, marginal KL, log N.

    Only rows whose ``elbo_valid`` is true; the others are listed in a note under the Markdown table (never ranked
    by NLL). Returns (markdown, csv).
    """
    frame = _ordered(df)
    valid = frame["elbo_valid"].map(_as_bool) if "elbo_valid" in frame.columns else pd.Series(False, frame.index)
    columns = [
        _Column("NLL (nats)", "nll", with_std=True),
        _Column("NLL (bits/dim)", "nll_bits_per_dim"),
        _Column("Avg KL", "avg_kl"),
        _Column("MI", "mutual_information"),
        _Column("Marginal KL", "marginal_kl"),
        _Column("Max MI (log N)", "max_mutual_information"),
    ]
    excluded = frame[~valid]
    note = ""
    if len(excluded):
        names = ", ".join(f"{r['family']}/{r['setting']} ({r['run_id']})" for _, r in excluded.iterrows())
        note = (f"Not listed (reconstruction loss is not a normalised density, elbo_valid = false, so it has no NLL "
                f"and is never ranked by one): {names}.")
    caption = ("*Dorta et al. 2018, Table 1 style. NLL: importance-weighted bound (Burda et al. 2016), nats per "
               "image on the [0, 1] density scale (can be negative), mean +- std over test images; lower is better. "
               "Avg KL = MI + marginal KL (ELBO surgery, Hoffman & Johnson 2016, S = N test images), nats.*")
    return _build(frame[valid], columns, prefix, caption, note, seeds)


def dorta_table2(df: pd.DataFrame, prefix: str = "test", seeds: Seeds | None = None) -> tuple[str, str]:
    """Dorta et al. 2018, Table 2 style: MSE on [0, 255], mean +- std over images. Returns (markdown, csv)."""
    caption = ("*Dorta et al. 2018, Table 2 style. MSE of the reconstruction per pixel on the [0, 255] scale, "
               "mean +- std over test images; lower is better.*")
    columns = [_Column("MSE [0, 255]", "mse_255", with_std=True)]
    floor = f"{prefix}_chroma_floor_mse_255"
    if floor in df.columns and df[floor].map(lambda v: not _is_missing(v)).any():
        # YCbCr arms: their MSE is measured against the RGB before the conversion (as Dorta et al. do), so it
        # includes the chroma downsampling error; the floor column says how much of it no model can remove.
        columns.append(_Column("Chroma floor [0, 255]", "chroma_floor_mse_255"))
        caption = caption[:-1] + (" For YCbCr arms the reference is the RGB before the conversion to YCbCr; the "
                                  "chroma floor is the MSE of the stored data itself (Y with downsampled Cb, Cr, "
                                  "converted back) against it: about the least a YCbCr model can reach.*")
    return _build(_ordered(df), columns, prefix, caption, seeds=seeds)


def avae_table(df: pd.DataFrame, prefix: str = "test", seeds: Seeds | None = None) -> tuple[str, str]:
    """AVAE (Plumerault et al. 2020) style: MSE ([0, 1] and [-1, 1]), LPIPS, FID. Returns (markdown, csv)."""
    columns = [
        _Column("MSE [0, 1]", "mse", with_std=True),
        _Column("MSE [-1, 1] (AVAE scale)", "mse_pm1", with_std=True),
        _Column("LPIPS", "lpips", with_std=True),
        _Column("FID recon", "fid_recon"),
        _Column("FID samples", "fid_samples"),
    ]
    caption = ("*AVAE (Plumerault et al. 2020) style. MSE per pixel on the [0, 1] scale (and x4 on AVAE's [-1, 1] "
               "scale), LPIPS-Alex v0.1, mean +- std over test images; FID of reconstructions and of prior samples "
               "against the test images with the study's single FID implementation (not comparable with published "
               "FIDs). Lower is better for all.*")
    return _build(_ordered(df), columns, prefix, caption, seeds=seeds)


def all_metrics_table(df: pd.DataFrame, prefix: str = "test", seeds: Seeds | None = None) -> tuple[str, str]:
    """PSNR, SSIM, sharpness / gradient ratios, variance losses and VL / MSE for every row. Returns (md, csv)."""
    columns = [
        _Column("MSE [0, 1]", "mse", with_std=True),
        _Column("PSNR (dB)", "psnr", with_std=True),
        _Column("SSIM", "ssim", with_std=True),
        _Column("Sharpness ratio", "sharpness_ratio"),
        _Column("Gradient ratio", "gradient_ratio"),
        _Column("Sample sharpness ratio", "sample_sharpness_ratio"),
        _Column("Variance loss recon", "variance_loss_recon"),
        _Column("Variance loss samples", "variance_loss_samples"),
        _Column("VL / MSE", "variance_loss_mse_ratio"),
    ]
    caption = ("*All reconstruction metrics. PSNR and SSIM on [0, 1] images, mean +- std over test images. "
               "Sharpness ratio: mean Laplacian variance of reconstructions (or samples) / inputs; gradient ratio: "
               "the same for the Sobel magnitude (< 1 = blurrier). Variance loss (Asperti 2020): mean per-pixel "
               "variance of the test images minus that of their reconstructions / of as many prior samples, [0, 1]^2 "
               "units; VL / MSE is close to 1 when the loss of variance is all reconstruction error.*")
    return _build(_ordered(df), columns, prefix, caption, seeds=seeds)


#: Table name -> builder, in report order.
TABLES: dict[str, Callable[..., tuple[str, str]]] = {
    "dorta_table1": dorta_table1,
    "dorta_table2": dorta_table2,
    "avae": avae_table,
    "all_metrics": all_metrics_table,
}


def paper_tables(df: pd.DataFrame, prefix: str = "test", seeds: Seeds | None = None,
                 num_images: int | None = None) -> dict[str, tuple[str, str]]:
    """Every table: name -> (markdown, csv), names as in :data:`TABLES`.

    Args:
        df: one row per evaluated trial; columns ``family``, ``setting``, ``run_id``, ``elbo_valid`` and
            ``<prefix>_<metric>`` / ``<prefix>_<metric>_std`` metric columns (missing ones show as unavailable).
        prefix: the evaluated split's metric prefix.
        seeds: arm (``setting``) -> full metric name (``test_nll``) -> :class:`SeedSummary` of its replicates;
            None or empty: single-trial tables.
        num_images: how many test images every +- is over; the captions then say so ("over 4 test images"), a
            spread over a handful of images being no confidence interval.

    Returns:
        dict name -> (Markdown string, CSV string).
    """
    tables = {name: build(df, prefix, seeds=seeds) for name, build in TABLES.items()}
    if num_images is not None:
        # The captions' "mean +- std over test images"; column headers (the seed tables' spread label) stay.
        tables = {name: (markdown.replace("std over test images", f"std over {num_images} test images"), csv)
                  for name, (markdown, csv) in tables.items()}
    return tables


__all__ = [
    "PM",
    "SPREAD_LABEL",
    "SEED_LABEL",
    "TABLES",
    "UNAVAILABLE",
    "SeedSummary",
    "all_metrics_table",
    "avae_table",
    "dorta_table1",
    "dorta_table2",
    "format_mean_std",
    "format_seed_ci",
    "format_value",
    "paper_tables",
]
