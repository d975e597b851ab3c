"""Statistics for seed replicates: confidence intervals over seeds and paired comparisons over test images.

Pure functions of numpy arrays (numpy and scipy only), so every number in a report can be recomputed by hand:

- :func:`mean_ci`: a metric measured once per seed (per-seed mean NLL, MSE, ...) -> its mean and the half-width
  of the two-sided Student-t confidence interval, mean +- t_{(1 + c) / 2, n - 1} * s / sqrt(n), s the sample
  standard deviation (ddof = 1). This treats the seeds as independent draws of the whole training run.
- :func:`paired_comparison`: two arms evaluated on the same test images -> the mean per-image difference, its
  Student-t interval and a two-sided paired test (paired t-test, ``scipy.stats.ttest_rel``, or Wilcoxon
  signed-rank, ``scipy.stats.wilcoxon``). Pairing by image removes the (large) spread between images, which is
  why a comparison of two arms is not read off their two separate intervals.
- :func:`paired_comparison_over_seeds`: the same after averaging each arm's per-image values over its seeds, so
  the test's unit is the test image and each image's value is its seed-averaged metric.

Units are those of the inputs (nats per image for NLL, squared intensity for MSE); differences are ``a - b``, so
for a lower-is-better metric a negative difference favours ``a``. Inputs with NaN or infinite entries are refused
with a ValueError rather than silently dropped: a diverged replicate must be seen, not averaged away.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

TEST_NAMES = {
    "t": "paired t-test (two-sided)",
    "wilcoxon": "Wilcoxon signed-rank test (two-sided)",
}


def _finite_vector(values: Any, name: str, minimum: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of values, got shape {x.shape}")
    if x.size < minimum:
        raise ValueError(f"{name}: need at least {minimum} value(s), got {x.size}")
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: {int(bad.sum())} of {x.size} values are NaN or infinite (first at index "
                         f"{first}: {x[first]}); drop or re-run the failed replicate instead of averaging it")
    return x


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def t_half_width(values: Any, confidence: float = 0.95) -> float:
    """Half-width of the two-sided Student-t interval of the mean: t_{(1 + c) / 2, n - 1} * s / sqrt(n).

    ``t`` is ``scipy.stats.t.ppf``, s the sample standard deviation (ddof = 1). For n = 1 there is no spread
    estimate (0 degrees of freedom) and the half-width is ``math.inf``.

    Args:
        values: float (n,), finite, n >= 1.
        confidence: c in (0, 1).

    Raises:
        ValueError: not 1-D, empty, NaN / infinite entries, or c outside (0, 1).
    """
    _check_confidence(confidence)
    x = _finite_vector(values, "values", 1)
    if x.size == 1:
        return math.inf
    sem = float(np.std(x, ddof=1)) / math.sqrt(x.size)
    return float(stats.t.ppf(0.5 * (1.0 + confidence), x.size - 1)) * sem


def mean_ci(values: Any, confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean of per-seed values and the half-width of its Student-t confidence interval.

    The interval is ``mean +- half_width``, identical to ``scipy.stats.t.interval(confidence, n - 1, loc=mean,
    scale=scipy.stats.sem(values))``.

    Args:
        values: float (n,) array-like, one value per seed (e.g. each replicate's mean test NLL in nats), finite.
        confidence: c in (0, 1); 0.95 gives the usual 95% interval.

    Returns:
        ``(mean, half_width, n)``: floats in the units of ``values`` and the count. For n = 1, ``half_width`` is
        ``math.inf`` (a single seed says nothing about seed-to-seed spread); for identical values it is 0.

    Raises:
        ValueError: not 1-D, empty, a NaN or infinite value (its index is named), or c outside (0, 1).
    """
    _check_confidence(confidence)
    x = _finite_vector(values, "values", 1)
    return float(x.mean()), t_half_width(x, confidence), int(x.size)


def format_mean_ci(mean: float, half_width: float, n: int, digits: int = 1, unit: str = "seeds") -> str:
    """``"mean +- half_width (n seeds)"`` for tables, e.g. ``"-5553.2 +- 41.0 (3 seeds)"``; an infinite
    half-width (n = 1) is written ``"+- n/a"``."""
    hw = "n/a" if not math.isfinite(half_width) else f"{half_width:.{digits}f}"
    return f"{mean:.{digits}f} +- {hw} ({n} {unit if n != 1 else unit.rstrip('s')})"


@dataclass(frozen=True)
class PairedComparison:
    """A paired comparison of two arms on the same items (test images).

    Attributes:
        mean_difference: mean of d = a - b over the n items, in the inputs' units.
        ci_low, ci_high: the two-sided Student-t confidence interval of that mean (``confidence``), whichever
            test is chosen: mean(d) -+ t_{(1 + c) / 2, n - 1} * s_d / sqrt(n).
        p_value: two-sided p-value of ``test_name`` for "no difference", in [0, 1].
        test_name: the test, for tables: ``"paired t-test (two-sided)"`` or ``"Wilcoxon signed-rank test
            (two-sided)"``.
        n: number of pairs.
        confidence: c of the interval.
    """

    mean_difference: float
    ci_low: float
    ci_high: float
    p_value: float
    test_name: str
    n: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields."""
        return asdict(self)


def paired_comparison(
    a: Any, b: Any, confidence: float = 0.95, test: Literal["t", "wilcoxon"] = "t"
) -> PairedComparison:
    """Compare two arms' values on the same items by their per-item differences d = a - b.

    Tests (both two-sided, null hypothesis "no difference"):

    - ``"t"``: the paired t-test, ``scipy.stats.ttest_rel(a, b)``: t = mean(d) / (s_d / sqrt(n)) on n - 1
      degrees of freedom; assumes d roughly normal (reasonable for per-image NLL differences averaged over seeds
      with tens of images or more).
    - ``"wilcoxon"``: the Wilcoxon signed-rank test, ``scipy.stats.wilcoxon(a, b)`` with scipy's defaults (zero
      differences dropped, ``zero_method="wilcox"``; the exact null distribution for n <= 50 without ties or
      zeros, else the normal approximation): no normality assumption, for heavy-tailed differences.

    The interval is the Student-t interval of mean(d) for either test (equal to
    ``scipy.stats.ttest_rel(a, b).confidence_interval(confidence)``). When every difference is exactly 0 the
    data show no difference at all: ``p_value`` is 1.0 and the interval is (0, 0) (scipy's t-test would return
    NaN there). When the differences are a non-zero constant, the t-test's p-value is 0.

    Args:
        a, b: float (n,) array-likes, item i of each measured on the same test image i (e.g. per-image NLL in
            nats, or per-image MSE), finite, n >= 2.
        confidence: c in (0, 1) of the interval.
        test: ``"t"`` or ``"wilcoxon"``.

    Returns:
        :class:`PairedComparison`.

    Raises:
        ValueError: shapes differ or are not 1-D, fewer than 2 pairs, a NaN or infinite value (named by array and
            index), c outside (0, 1), or an unknown ``test``.
    """
    _check_confidence(confidence)
    if test not in TEST_NAMES:
        raise ValueError(f"unknown test {test!r}; choose 't' (paired t-test) or 'wilcoxon' (signed-rank)")
    x = _finite_vector(a, "a", 2)
    y = _finite_vector(b, "b", 2)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same items: a has {x.size}, b has {y.size}")
    d = x - y
    mean = float(d.mean())
    if not d.any():
        return PairedComparison(0.0, 0.0, 0.0, 1.0, TEST_NAMES[test], int(d.size), confidence)
    half = t_half_width(d, confidence)
    if test == "t":
        # a constant non-zero difference has t = +-inf; scipy gets there through a cancellation warning
        p = 0.0 if np.ptp(d) == 0.0 else float(stats.ttest_rel(x, y).pvalue)
    else:
        p = float(stats.wilcoxon(x, y).pvalue)
    return PairedComparison(mean, mean - half, mean + half, p, TEST_NAMES[test], int(d.size), confidence)


def seed_mean(values: Any, name: str = "values") -> np.ndarray:
    """Per-item means over seeds: float (seeds, items) -> float (items,); a 1-D input is one seed.

    Raises:
        ValueError: not 1-D or 2-D, no seeds or items, or a NaN or infinite entry (its seed and item named).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected (seeds, images) values, got shape {np.shape(values)}")
    bad = ~np.isfinite(x)
    if bad.any():
        seed, item = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: {int(bad.sum())} of {x.size} values are NaN or infinite (first: seed {seed}, "
                         f"image {item}: {x[seed, item]}); drop or re-run the failed replicate")
    return x.mean(axis=0)


def paired_comparison_over_seeds(
    a: Any, b: Any, confidence: float = 0.95, test: Literal["t", "wilcoxon"] = "t"
) -> PairedComparison:
    """:func:`paired_comparison` of two arms' per-image values after averaging each over its seeds.

    Each arm's replicates are independent trainings, so arm ``a``'s seed k has no partner in arm ``b``; what is
    paired is the test image. Image i's value is its mean over the arm's seeds, and the per-image differences of
    these means are tested (n = number of test images). The arms may have different numbers of seeds.

    Args:
        a: float (seeds_a, images), e.g. per-image test NLL in nats of arm a's replicates; a 1-D (images,) input
            is a single seed.
        b: float (seeds_b, images), the baseline arm on the same images in the same order.
        confidence, test: see :func:`paired_comparison`.

    Returns:
        :class:`PairedComparison` of ``seed_mean(a) - seed_mean(b)``.

    Raises:
        ValueError: bad shapes, different image counts, NaN / infinite entries (seed and image named), fewer than
            2 images, or see :func:`paired_comparison`.
    """
    ma, mb = seed_mean(a, "a"), seed_mean(b, "b")
    if ma.shape != mb.shape:
        raise ValueError(f"the arms were evaluated on different images: a has {ma.size}, b has {mb.size}")
    return paired_comparison(ma, mb, confidence, test)
