"""The published claims a study tests, each stated as holding or not from the seed replicates, plus a trivial
baseline every arm has to beat (the report's ``claims.md``; ``report.claims`` names the arms).

Claims (tested in ``studies/reproduce``):

1. Dorta et al. 2018, Table 1: the structured residual model's test NLL is below the factorised Gaussian VAE's.
   Paired over test images (per-image NLL averaged over seeds, arm - Gaussian): holds when the whole 95% interval
   of the mean difference is below 0, contradicted when it is above 0, otherwise not shown.
2. Dorta et al. 2018, Table 2: the structured model's MSE is not worse than the Gaussian's. Paired MSE
   difference: holds unless its interval lies above 0.
3. Dorta et al. 2018, Tables 1 and 2: the beta-VAE (beta > 1, evaluated at beta = 1) has the worst MSE of the
   ELBO-trained families: its seed-mean test MSE is the largest among the arms that are normalised densities.
4. Bredell et al. 2023: blur-error reconstructions are sharper than the Gaussian's: the seed-mean sharpness ratio
   (reconstruction / input Laplacian variance) is larger, with Welch's t-test over seeds.
5. The control (a structured precision on the frozen Gaussian VAE's mean, ``study.models.frozen_mean``): the share
   of the structured model's NLL gain that the covariance alone gives, (NLL_gauss - NLL_control) /
   (NLL_gauss - NLL_structured), from seed means.

Trivial baseline: the reconstruction "training mean image, shifted to each test image's own mean intensity"
(MSE on [0, 255]), and, for the NLL, the factorised Gaussian density with the training mean image as its mean and
each pixel's training standard deviation around it as its sigma (a normalised density of x, in nats per image
for x in [0, 1], the evaluator's units; floored at 1e-3 like the models' ``min_sigma``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from study.report_replicates import paired_comparisons

NLL, MSE, SHARPNESS = "test_nll", "test_mse_255", "test_sharpness_ratio"


def trivial_baseline(train: np.ndarray, test: np.ndarray, min_sigma: float = 1e-3) -> dict[str, float]:
    """MSE and NLL of the trivial baseline (module docstring) on uint8 images (N, H, W, C) in [0, 255].

    Returns:
        ``mse_255`` (mean over test images of the per-pixel MSE on [0, 255]) with its standard deviation over
        images ``mse_255_std``, and ``nll`` (mean over test images, nats per image) with ``nll_std``.
    """
    train01 = train.astype(np.float64) / 255.0
    test01 = test.astype(np.float64) / 255.0
    mean_image = train01.mean(axis=0)  # (H, W, C)
    # Each image's own mean intensity per channel replaces the mean image's, as "each image's mean colour".
    shifted = mean_image[None] - mean_image.mean(axis=(0, 1)) + test01.mean(axis=(1, 2), keepdims=True)
    mse = ((shifted - test01) * 255.0) ** 2
    mse_per_image = mse.reshape(len(test01), -1).mean(axis=1)
    sigma = np.maximum(train01.std(axis=0), min_sigma)  # (H, W, C)
    log_density = stats.norm.logpdf(test01, loc=mean_image[None], scale=sigma[None])
    nll_per_image = -log_density.reshape(len(test01), -1).sum(axis=1)
    return {"mse_255": float(mse_per_image.mean()), "mse_255_std": float(mse_per_image.std()),
            "nll": float(nll_per_image.mean()), "nll_std": float(nll_per_image.std())}


def _seed_values(evaluation: dict[str, Any], arm: str, metric: str) -> np.ndarray:
    return np.array([float(r["metrics"][metric]) for r in (evaluation.get("replicates") or {}).get(arm, [])
                     if metric in r.get("metrics", {}) and math.isfinite(float(r["metrics"][metric]))])


def _row(comparisons, arm: str, metric: str) -> dict[str, Any] | None:
    return next((r for r in comparisons.rows if r["arm"] == arm and r["metric"] == metric), None)


def _interval(row: dict[str, Any]) -> str:
    return (f"{row['mean_difference']:+.1f} [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}] over {row['images']} "
            f"images, {row['arm_seeds']} vs {row['baseline_seeds']} seeds; paired t p = {row['p_t']:.2g}, "
            f"Wilcoxon p = {row['p_wilcoxon']:.2g}")


def evaluate_claims(evaluation: dict[str, Any], per_image: dict[str, np.ndarray], claims, baseline: dict | None
                    ) -> list[dict[str, Any]]:
    """One record per claim: ``claim``, ``source``, ``arms``, ``verdict`` (holds / not shown / does not hold /
    not measured), ``figure`` (the numbers the verdict rests on) and ``test`` (how it was decided).

    ``claims``: ``report.claims`` (:class:`study.config.ClaimsConfig`); ``baseline``: :func:`trivial_baseline`'s
    result, or None when the data could not be read.
    """
    gaussian = claims.gaussian
    comparisons = paired_comparisons(evaluation, per_image, gaussian)
    records: list[dict[str, Any]] = []

    def add(claim, source, arms, verdict, figure, test):
        records.append({"claim": claim, "source": source, "arms": arms, "verdict": verdict, "figure": figure,
                        "test": test})

    paired = "paired over test images (per-image values averaged over seeds, arm - Gaussian), 95% t interval"
    for arm in claims.structured:
        row = _row(comparisons, arm, "nll")
        if row is None:
            add("structured NLL below the Gaussian's", "Dorta et al. 2018, Table 1", [arm, gaussian],
                "not measured", "no paired NLL comparison (missing replicates or per-image values)", paired)
        else:
            verdict = "holds" if row["ci_high"] < 0 else "does not hold" if row["ci_low"] > 0 else "not shown"
            add("structured NLL below the Gaussian's", "Dorta et al. 2018, Table 1", [arm, gaussian], verdict,
                "NLL difference (nats) " + _interval(row), paired)
        row = _row(comparisons, arm, "mse_255")
        if row is None:
            add("structured MSE not worse than the Gaussian's", "Dorta et al. 2018, Table 2", [arm, gaussian],
                "not measured", "no paired MSE comparison", paired)
        else:
            add("structured MSE not worse than the Gaussian's", "Dorta et al. 2018, Table 2", [arm, gaussian],
                "does not hold" if row["ci_low"] > 0 else "holds", "MSE difference " + _interval(row), paired)

    if claims.beta_vae is not None:
        valid = [a for a, info in evaluation.get("arms", {}).items() if info.get("elbo_valid")]
        means = {a: _seed_values(evaluation, a, MSE) for a in valid}
        means = {a: float(v.mean()) for a, v in means.items() if v.size}
        if claims.beta_vae not in means:
            add("beta-VAE MSE the worst of the ELBO families", "Dorta et al. 2018, Tables 1-2", [claims.beta_vae],
                "not measured", "no replicate MSE for the beta-VAE arm", "largest seed-mean test MSE")
        else:
            worst = max(means, key=means.get)
            figure = ", ".join(f"{a} {m:.1f}" for a, m in sorted(means.items(), key=lambda kv: -kv[1]))
            add("beta-VAE MSE the worst of the ELBO families", "Dorta et al. 2018, Tables 1-2",
                [claims.beta_vae, *[a for a in means if a != claims.beta_vae]],
                "holds" if worst == claims.beta_vae else "does not hold", f"seed-mean test MSE: {figure}",
                "largest seed-mean test MSE among the elbo_valid arms")

    if claims.blur is not None:
        a, b = _seed_values(evaluation, claims.blur, SHARPNESS), _seed_values(evaluation, gaussian, SHARPNESS)
        if a.size < 2 or b.size < 2:
            add("blur-error reconstructions sharper than the Gaussian's", "Bredell et al. 2023",
                [claims.blur, gaussian], "not measured", "fewer than 2 seeds with a sharpness ratio",
                "Welch's t-test over seeds")
        else:
            p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
            verdict = ("holds" if a.mean() > b.mean() and p < 0.05 else
                       "does not hold" if a.mean() < b.mean() and p < 0.05 else "not shown")
            add("blur-error reconstructions sharper than the Gaussian's", "Bredell et al. 2023",
                [claims.blur, gaussian], verdict,
                f"seed-mean sharpness ratio {a.mean():.3f} (n={a.size}) vs {b.mean():.3f} (n={b.size}); "
                f"Welch t p = {p:.2g}", "Welch's t-test over seeds, two-sided, 5% level")

    if claims.control is not None and claims.structured:
        g, c, s = (_seed_values(evaluation, arm, NLL) for arm in (gaussian, claims.control, claims.structured[0]))
        if min(g.size, c.size, s.size) == 0 or g.mean() == s.mean():
            add("covariance share of the structured NLL gain", "frozen-mean control", [claims.control],
                "not measured", "missing replicate NLLs", "ratio of seed means")
        else:
            share = (g.mean() - c.mean()) / (g.mean() - s.mean())
            add("covariance share of the structured NLL gain", "frozen-mean control",
                [claims.control, gaussian, claims.structured[0]], f"{share:.0%} of the gain",
                f"seed-mean NLL: Gaussian {g.mean():.1f}, control {c.mean():.1f}, "
                f"{claims.structured[0]} {s.mean():.1f}", "(NLL_gauss - NLL_control) / (NLL_gauss - NLL_structured)")

    if baseline is None:
        add("every arm beats the trivial baseline", "sanity check", [], "not measured",
            "trivial baseline unavailable for this colour space", "seed means against the baseline")
    else:
        losers = []
        for arm in evaluation.get("arms", {}):
            mse = _seed_values(evaluation, arm, MSE)
            nll = _seed_values(evaluation, arm, NLL)
            if mse.size and mse.mean() >= baseline["mse_255"]:
                losers.append(f"{arm} MSE {mse.mean():.1f}")
            if nll.size and evaluation["arms"][arm].get("elbo_valid") and nll.mean() >= baseline["nll"]:
                losers.append(f"{arm} NLL {nll.mean():.1f}")
        add("every arm beats the trivial baseline", "sanity check", list(evaluation.get("arms", {})),
            "holds" if not losers else "does not hold",
            f"baseline MSE {baseline['mse_255']:.1f}, NLL {baseline['nll']:.1f} nats"
            + (f"; not beaten by: {', '.join(losers)}" if losers else ""),
            "seed-mean test MSE (every arm) and NLL (densities) below the baseline's")
    return records


def claims_table(records: list[dict[str, Any]]) -> str:
    """The claims as a Markdown table."""
    lines = ["| claim | source | arms | verdict | figure | test |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['claim']} | {r['source']} | {', '.join(r['arms'])} | **{r['verdict']}** | "
                     f"{r['figure']} | {r['test']} |")
    return "\n".join(lines) + "\n"


def load_split(dataset_dir: str | Path, split: str) -> np.ndarray:
    """uint8 (N, H, W, C) images of a prepared split (``<split>.npy``)."""
    return np.load(Path(dataset_dir) / f"{split}.npy")
