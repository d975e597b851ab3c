"""The claims table (study.report_claims): verdicts from seed replicates against scipy, and the trivial baseline
against torch.distributions on real sample images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from study.config import ClaimsConfig
from study.report_claims import claims_table, evaluate_claims, load_split, trivial_baseline

ARMS = {"gaussian": 0.0, "structured": -40.0, "beta": 0.0, "blur": 0.0, "control": -25.0}


def _evaluation(rng, n_images=30, seeds=3):
    """A synthetic evaluate summary: structured NLL 40 nats below the Gaussian's, beta-VAE MSE worst, blur sharper."""
    per_image, evaluation = {}, {"arms": {}, "replicates": {}}
    base_nll = rng.normal(-2000, 300, n_images)
    base_mse = rng.gamma(4.0, 100.0, n_images)
    for arm, shift in ARMS.items():
        evaluation["arms"][arm] = {"elbo_valid": True, "family": arm, "metrics": {}}
        reps = []
        for seed in range(seeds):
            run = f"{arm}-{seed}"
            nll = base_nll + shift + rng.normal(0, 5, n_images)
            mse = base_mse * (2.0 if arm == "beta" else 1.0) + rng.normal(0, 5, n_images)
            per_image[f"{arm}/{run}/nll"], per_image[f"{arm}/{run}/mse_255"] = nll, mse
            sharp = (1.0 if arm == "blur" else 0.3) + rng.normal(0, 0.02)
            reps.append({"seed": seed + 1, "run_id": run, "unavailable": {}, "elbo_valid": True,
                         "metrics": {"test_nll": nll.mean(), "test_mse_255": mse.mean(),
                                     "test_sharpness_ratio": sharp}})
        evaluation["replicates"][arm] = reps
    return evaluation, per_image


def test_verdicts_follow_the_paired_intervals_and_tests():
    rng = np.random.default_rng(0)
    evaluation, per_image = _evaluation(rng)
    claims = ClaimsConfig(gaussian="gaussian", structured=["structured"], beta_vae="beta", blur="blur",
                          control="control")
    records = {r["claim"]: r for r in evaluate_claims(evaluation, per_image, claims, None)}
    # Independent: the paired t interval of the seed-averaged per-image differences, with scipy.
    diff = (np.mean([per_image[f"structured/structured-{s}/nll"] for s in range(3)], axis=0)
            - np.mean([per_image[f"gaussian/gaussian-{s}/nll"] for s in range(3)], axis=0))
    low, high = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
    assert high < 0
    nll = records["structured NLL below the Gaussian's"]
    assert nll["verdict"] == "holds"
    assert f"{diff.mean():+.1f} [{low:+.1f}, {high:+.1f}]" in nll["figure"]
    assert f"{stats.ttest_rel(np.zeros_like(diff) + diff, np.zeros_like(diff)).pvalue:.2g}" in nll["figure"]
    assert records["structured MSE not worse than the Gaussian's"]["verdict"] == "holds"
    assert records["beta-VAE MSE the worst of the ELBO families"]["verdict"] == "holds"
    assert records["blur-error reconstructions sharper than the Gaussian's"]["verdict"] == "holds"
    share = records["covariance share of the structured NLL gain"]["verdict"]
    g, c, s = (np.mean([r["metrics"]["test_nll"] for r in evaluation["replicates"][a]])
               for a in ("gaussian", "control", "structured"))
    assert share == f"{(g - c) / (g - s):.0%} of the gain"
    assert records["every arm beats the trivial baseline"]["verdict"] == "not measured"
    assert "| structured NLL below the Gaussian's |" in claims_table(list(records.values()))


def test_a_claim_that_fails_is_reported_as_failing():
    rng = np.random.default_rng(1)
    evaluation, per_image = _evaluation(rng)
    for key in [k for k in per_image if k.startswith("structured/") and k.endswith("/mse_255")]:
        per_image[key] = per_image[key] + 200.0  # structured now clearly worse in MSE
    for rep in evaluation["replicates"]["gaussian"]:
        rep["metrics"]["test_mse_255"] = 1e6  # and the Gaussian the worst, not the beta-VAE
    claims = ClaimsConfig(gaussian="gaussian", structured=["structured"], beta_vae="beta")
    records = {r["claim"]: r for r in evaluate_claims(evaluation, per_image, claims, {"mse_255": 10.0, "nll": 0.0})}
    assert records["structured MSE not worse than the Gaussian's"]["verdict"] == "does not hold"
    assert records["beta-VAE MSE the worst of the ELBO families"]["verdict"] == "does not hold"
    beaten = records["every arm beats the trivial baseline"]
    assert beaten["verdict"] == "does not hold" and "gaussian MSE" in beaten["figure"]


def test_trivial_baseline_matches_torch_distributions_on_real_images(prepared_grey_32):
    train, test = load_split(prepared_grey_32, "train"), load_split(prepared_grey_32, "test")
    result = trivial_baseline(train, test)
    tr = torch.from_numpy(train).double() / 255
    te = torch.from_numpy(test).double() / 255
    mean = tr.mean(0)
    sigma = tr.std(0, unbiased=False).clamp_min(1e-3)
    nll = -torch.distributions.Normal(mean, sigma).log_prob(te).flatten(1).sum(1)
    assert result["nll"] == pytest.approx(nll.mean().item(), rel=1e-10)
    recon = mean - mean.mean() + te.mean(dim=(1, 2), keepdim=True)  # grey: one channel
    mse = ((recon - te) * 255).pow(2).flatten(1).mean(1)
    assert result["mse_255"] == pytest.approx(mse.mean().item(), rel=1e-10)
