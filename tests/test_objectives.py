"""ELBO parts against torch.distributions (float64, random inputs)."""

from __future__ import annotations

import math

import torch
from torch.distributions import Normal, kl_divergence

from study.objectives import bits_per_dim, elbo_terms, kl_standard_normal


def test_kl_matches_torch_kl_divergence():
    torch.manual_seed(0)
    mu = torch.randn(8, 16, dtype=torch.float64) * 3
    logvar = torch.randn(8, 16, dtype=torch.float64) * 2
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl_standard_normal(mu, logvar), kl_divergence(q, p).sum(1), rtol=1e-12, atol=1e-12)


def test_elbo_and_beta_loss():
    torch.manual_seed(1)
    loglik = torch.randn(5, dtype=torch.float64) * 100
    mu, logvar = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    terms = elbo_terms(loglik, mu, logvar)
    kl = kl_standard_normal(mu, logvar)
    torch.testing.assert_close(terms.elbo, loglik - kl)
    torch.testing.assert_close(terms.loss(4.0), -(loglik - 4.0 * kl).mean())
    torch.testing.assert_close(terms.loss(1.0), -terms.elbo.mean())


def test_bits_per_dim():
    assert math.isclose(bits_per_dim(64 * 64 * 3 * math.log(2), 64 * 64 * 3), 1.0)
