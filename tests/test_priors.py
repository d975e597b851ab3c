"""Gamma prior on precision diagonals (study.priors, Dorta et al. 2018 Eq. 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from study.priors import gamma_log_prob


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (2.5, 0.3), (0.7, 40.0), (50.0, 0.01)])
def test_matches_scipy(alpha: float, beta: float) -> None:
    rng = np.random.default_rng(0)
    lam = rng.gamma(2.0, 3.0, size=(4, 1, 6, 5))  # (B, 1, H, W) positive precisions
    ours = gamma_log_prob(torch.from_numpy(lam), alpha, beta)
    ref = stats.gamma.logpdf(lam, a=alpha, scale=1.0 / beta).reshape(4, -1).sum(1)
    assert ours.shape == (4,) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-9)


def test_matches_torch_distribution() -> None:
    lam = torch.rand(3, 2, 7, dtype=torch.float64) * 10 + 1e-3
    ours = gamma_log_prob(lam, 3.0, 0.5)
    ref = torch.distributions.Gamma(torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(ours, ref.log_prob(lam).reshape(3, -1).sum(1))


def test_flat_input_and_gradient() -> None:
    lam = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)  # (B,), one entry per image
    out = gamma_log_prob(lam, 2.0, 1.0)
    out.sum().backward()
    # d/dl [(a - 1) log l - b l] = (a - 1) / l - b
    torch.testing.assert_close(lam.grad, 1.0 / lam.detach() - 1.0)


def test_exponential_prior_at_zero_is_finite() -> None:
    # alpha_G = 1 is the exponential density beta exp(-beta l): finite at l = 0
    out = gamma_log_prob(torch.zeros(1, 2, dtype=torch.float64), 1.0, 2.0)
    torch.testing.assert_close(out, torch.tensor([2 * np.log(2.0)], dtype=torch.float64))


@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, -2.0), (float("nan"), 1.0)])
def test_rejects_bad_parameters(alpha: float, beta: float) -> None:
    with pytest.raises(ValueError):
        gamma_log_prob(torch.ones(2, 3), alpha, beta)
