"""Factorised Gaussian likelihood against torch.distributions.Normal (float64, random inputs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from study.likelihoods.gaussian import GaussianLikelihood


@pytest.mark.parametrize("mode", ["fixed", "learned_global", "per_pixel"])
def test_log_prob_equals_torch_normal(mode):
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # so the stored log sigma is float64 from the start
    try:
        lik = GaussianLikelihood(sigma_mode=mode, sigma=0.2, min_sigma=1e-3)
    finally:
        torch.set_default_dtype(default)
    channels = lik.param_channels(3)
    assert channels == (6 if mode == "per_pixel" else 3)
    params = torch.randn(4, channels, 5, 7, dtype=torch.float64) * 2
    x = torch.rand(4, 3, 5, 7, dtype=torch.float64)
    if mode == "per_pixel":
        mu = torch.sigmoid(params[:, :3])
        sigma = 1e-3 + torch.nn.functional.softplus(params[:, 3:])
    elif mode == "learned_global":
        mu, sigma = torch.sigmoid(params), torch.full_like(x, 1e-3 + 0.2)
    else:
        mu, sigma = torch.sigmoid(params), torch.full_like(x, 0.2)
    expected = Normal(mu, sigma).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(lik.log_prob(x, params), expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(lik.mean(params), mu)


def test_learned_global_sigma_receives_gradient():
    lik = GaussianLikelihood("learned_global", sigma=0.5)
    x, params = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    lik.log_prob(x, params).sum().backward()
    assert lik.log_sigma.grad is not None and lik.log_sigma.grad.abs() > 0
    assert not list(GaussianLikelihood("fixed").parameters())  # fixed sigma is a buffer, not learned


def test_samples_have_the_predicted_moments():
    lik = GaussianLikelihood("per_pixel").double()
    params = torch.randn(1, 2, 3, 3, dtype=torch.float64).expand(20000, -1, -1, -1)
    draws = lik.sample(params, generator=torch.Generator().manual_seed(1))
    mu, sigma = lik.mean(params[:1])[0], lik.sigma(params[:1])[0]
    n = draws.shape[0]
    assert (draws.mean(0) - mu).abs().max() < 5 * sigma.max() / math.sqrt(n)
    assert ((draws.std(0) / sigma) - 1).abs().max() < 0.05


def test_bad_arguments():
    with pytest.raises(ValueError):
        GaussianLikelihood("diagonal")
    with pytest.raises(ValueError):
        GaussianLikelihood("fixed", sigma=0.0)
