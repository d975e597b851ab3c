"""study.statistics against scipy on fixed arrays, against closed forms worked by hand, and by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from study.statistics import (
    format_mean_ci,
    mean_ci,
    paired_comparison,
    paired_comparison_over_seeds,
    seed_mean,
)

RNG = np.random.default_rng(20240518)
ARRAYS = [RNG.normal(-5500.0, 300.0, size=n) for n in (2, 3, 5, 12)]


@pytest.mark.parametrize("values", ARRAYS, ids=lambda v: f"n{len(v)}")
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_mean_ci_equals_scipy_t_interval(values, confidence):
    mean, half, n = mean_ci(values, confidence)
    low, high = stats.t.interval(confidence, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert n == len(values) and mean == pytest.approx(np.mean(values), rel=1e-15)
    assert mean - half == pytest.approx(low, rel=1e-12) and mean + half == pytest.approx(high, rel=1e-12)


def test_mean_ci_three_values_by_hand():
    # values 1, 2, 6: mean 3; s^2 = (4 + 1 + 9) / 2 = 7; s / sqrt(3) = sqrt(7 / 3). For 2 dof the t CDF is
    # 1/2 + t / (2 sqrt(2 + t^2)), so t_q = (2q - 1) sqrt(2 / (1 - (2q - 1)^2)): t_{0.975, 2} = 4.3027 (tables: 4.303)
    t975 = 0.95 * math.sqrt(2.0 / (1.0 - 0.95**2))
    assert round(t975, 3) == 4.303
    mean, half, n = mean_ci([1.0, 2.0, 6.0])
    assert (mean, n) == (3.0, 3)
    assert half == pytest.approx(t975 * math.sqrt(7.0 / 3.0), rel=1e-12)  # 6.5724...


def test_mean_ci_edge_cases():
    mean, half, n = mean_ci([4.5])
    assert (mean, n) == (4.5, 1) and math.isinf(half)  # one seed: no spread estimate
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 0.0, 3)
    with pytest.raises(ValueError, match="1 of 3 values are NaN or infinite .*index 1"):
        mean_ci([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="at least 1"):
        mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="1-D"):
        mean_ci(np.ones((2, 2)))


def test_interval_covers_the_true_mean_at_its_level():
    """Student t with 3 seeds: over 4,000 simulated normal samples the 95% interval holds the true mean in 95% of
    them (binomial sd 0.0034; the z interval with the same n would cover only ~0.80)."""
    rng = np.random.default_rng(7)
    samples = rng.normal(10.0, 2.0, size=(4000, 3))
    covered = [abs(mean - 10.0) <= half for mean, half, _ in map(mean_ci, samples)]
    assert abs(np.mean(covered) - 0.95) < 0.014


@pytest.mark.parametrize("n", [5, 40])
def test_paired_t_equals_scipy(n):
    rng = np.random.default_rng(n)
    b = rng.normal(-5000.0, 400.0, size=n)  # per-image NLL of the baseline, nats
    a = b + rng.normal(-30.0, 50.0, size=n)  # a correlated arm, as two models on the same images are
    result = paired_comparison(a, b, 0.95, test="t")
    reference = stats.ttest_rel(a, b)
    ci = reference.confidence_interval(0.95)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert result.ci_low == pytest.approx(ci.low, rel=1e-12) and result.ci_high == pytest.approx(ci.high, rel=1e-12)
    assert result.mean_difference == pytest.approx(np.mean(a - b), rel=1e-14)
    assert result.n == n and result.test_name == "paired t-test (two-sided)" and result.confidence == 0.95


def test_paired_t_worked_example():
    # d = a - b = (1, 1, 3): mean 5/3, s_d^2 = (4/9 + 4/9 + 16/9) / 2 = 4/3, t = (5/3) / sqrt(4/9) = 2.5 on 2 dof.
    # For 2 dof the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so the two-sided p is 1 - t / sqrt(2 + t^2).
    result = paired_comparison([1.0, 2.0, 4.0], [0.0, 1.0, 1.0])
    assert result.mean_difference == pytest.approx(5.0 / 3.0, rel=1e-15)
    assert result.p_value == pytest.approx(1.0 - 2.5 / math.sqrt(8.25), rel=1e-12)  # 0.129611...
    half = 0.95 * math.sqrt(2.0 / (1.0 - 0.95**2)) * math.sqrt(4.0 / 9.0)  # t_{0.975, 2} * s_d / sqrt(3)
    assert (result.ci_low, result.ci_high) == pytest.approx((5.0 / 3.0 - half, 5.0 / 3.0 + half), rel=1e-12)


def test_wilcoxon_equals_scipy_and_the_exact_worked_example():
    rng = np.random.default_rng(3)
    b = rng.normal(0.02, 0.005, size=30)  # per-image MSE
    a = b + rng.standard_t(2, size=30) * 1e-3  # heavy-tailed differences
    result = paired_comparison(a, b, test="wilcoxon")
    assert result.p_value == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-12)
    assert result.test_name == "Wilcoxon signed-rank test (two-sided)"
    t_result = paired_comparison(a, b, test="t")  # the interval is the t interval of the mean either way
    assert (result.ci_low, result.ci_high) == (t_result.ci_low, t_result.ci_high)
    # d = (1, 2, 3.5, 4, -0.5): ranks of |d| are 2, 3, 4, 5, 1, so W- = 1. Exactly, 2 of the 2^5 sign patterns
    # give a rank sum <= 1 ({} and {1}); the two-sided p is 2 * 2 / 32 = 0.125.
    worked = paired_comparison([1.0, 2.0, 3.5, 4.0, -0.5], [0.0] * 5, test="wilcoxon")
    assert worked.p_value == pytest.approx(0.125, rel=1e-12)


def test_paired_edge_cases():
    same = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (same.mean_difference, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    shifted = paired_comparison([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # constant non-zero difference
    assert shifted.p_value == 0.0 and shifted.ci_low == shifted.ci_high == 1.0
    with pytest.raises(ValueError, match=r"b: 1 of 3 values are NaN .*index 2"):
        paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, float("nan")])
    with pytest.raises(ValueError, match="same items"):
        paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_comparison([1.0], [2.0])
    with pytest.raises(ValueError, match="unknown test"):
        paired_comparison([1.0, 2.0], [2.0, 3.0], test="sign")


def test_comparison_over_seeds_averages_each_image_over_its_seeds():
    rng = np.random.default_rng(11)
    a = rng.normal(-100.0, 10.0, size=(3, 8))  # (seeds, images)
    b = rng.normal(-95.0, 10.0, size=(5, 8))  # a baseline with more seeds
    a_means = [sum(a[s, i] for s in range(3)) / 3 for i in range(8)]
    b_means = [sum(b[s, i] for s in range(5)) / 5 for i in range(8)]
    for test in ("t", "wilcoxon"):
        result = paired_comparison_over_seeds(a, b, test=test)
        reference = stats.ttest_rel(a_means, b_means) if test == "t" else stats.wilcoxon(a_means, b_means)
        assert result.n == 8 and result.p_value == pytest.approx(reference.pvalue, rel=1e-12)
        assert result.mean_difference == pytest.approx(np.mean(a) - np.mean(b), rel=1e-12)
    np.testing.assert_allclose(seed_mean(a[0]), a[0])  # 1-D input: one seed
    broken = a.copy()
    broken[2, 5] = np.inf
    with pytest.raises(ValueError, match="seed 2, image 5"):
        paired_comparison_over_seeds(broken, b)
    with pytest.raises(ValueError, match="different images"):
        paired_comparison_over_seeds(a, b[:, :7])


def test_format_mean_ci():
    assert format_mean_ci(-5553.21, 41.04, 3) == "-5553.2 +- 41.0 (3 seeds)"
    assert format_mean_ci(0.5, math.inf, 1, digits=2) == "0.50 +- n/a (1 seed)"
