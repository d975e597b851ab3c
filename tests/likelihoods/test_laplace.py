"""Factorised Laplace likelihood (study.likelihoods.laplace)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from study.likelihoods.laplace import LaplaceLikelihood

MODES = ["fixed", "learned_global", "per_pixel"]


def _params(lik: LaplaceLikelihood, shape=(3, 2, 5, 4), seed: int = 0) -> torch.Tensor:
    b, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, lik.param_channels(c), h, w, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_log_prob_matches_torch(mode: str) -> None:
    lik = LaplaceLikelihood(scale_mode=mode, scale=0.07).double()
    params = _params(lik)
    x = torch.rand(3, 2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if mode == "per_pixel":
        mu = torch.sigmoid(params[:, :2])
        b = 1e-3 + F.softplus(params[:, 2:])
    else:
        mu = torch.sigmoid(params)
        b = torch.full_like(mu, 0.07 + (1e-3 if mode == "learned_global" else 0.0))
    ref = torch.distributions.Laplace(mu, b).log_prob(x).flatten(1).sum(1)
    out = lik.log_prob(x, params)
    assert out.shape == (3,)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lik.mean(params), mu)
    torch.testing.assert_close(lik.scale(params), b)


def test_param_channels_and_gradients() -> None:
    assert LaplaceLikelihood("per_pixel").param_channels(3) == 6
    assert LaplaceLikelihood("fixed").param_channels(3) == 3
    lik = LaplaceLikelihood("learned_global")
    params = torch.randn(2, 3, 4, 4, requires_grad=True)
    lik.log_prob(torch.rand(2, 3, 4, 4), params).sum().backward()
    assert params.grad is not None and lik.log_scale.grad is not None
    assert list(LaplaceLikelihood("fixed").parameters()) == []


@pytest.mark.parametrize("mode", MODES)
def test_sample_statistics(mode: str) -> None:
    n = 20000
    lik = LaplaceLikelihood(scale_mode=mode, scale=0.05).double().requires_grad_(False)
    params = _params(lik, shape=(1, 1, 4, 4)).expand(n, -1, -1, -1)  # many draws of one image
    gen = torch.Generator().manual_seed(2)
    draws = lik.sample(params, generator=gen)
    mu, b = lik.mean(params[:1]), lik.scale(params[:1])
    assert draws.shape == (n, 1, 4, 4)
    # per pixel: the sample mean's standard error is sqrt(2) b / sqrt(n); mean absolute deviation -> b
    tol = 6 * math.sqrt(2) * b.max().item() / math.sqrt(n)
    torch.testing.assert_close(draws.mean(0, keepdim=True), mu, atol=tol, rtol=0)
    mad = (draws - mu).abs().mean(0, keepdim=True)
    torch.testing.assert_close(mad, b, rtol=0.05, atol=0)
    # the generator makes draws reproducible
    again = lik.sample(params, generator=torch.Generator().manual_seed(2))
    assert torch.equal(draws, again)


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        LaplaceLikelihood("diagonal")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LaplaceLikelihood(scale=0.0)
    with pytest.raises(ValueError):
        LaplaceLikelihood(min_scale=-1.0)
