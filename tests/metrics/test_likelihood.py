"""Likelihood metrics on a linear-Gaussian VAE whose log p(x) is known in closed form.

Model (float64): z ~ N(0, I_d), x = W z + b + sigma * noise, x shaped as a (1, 4, 4) image, so
p(x) = N(x; b, W W^T + sigma^2 I). W has orthogonal columns, which makes the exact posterior p(z | x)
diagonal: N(m(x), S) with S = (I + W^T W / sigma^2)^-1 and m(x) = S W^T (x - b) / sigma^2. That gives two
encoders: the exact one (every importance weight equals p(x), a deterministic check of the arithmetic) and a
deliberately wrong one (shifted mean, variance too small), for which the bounds are strict.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal, kl_divergence

from study.likelihoods.base import Likelihood
from study.metrics import likelihood as lk

D_SIDE, LATENT, SIGMA = 4, 3, 0.5
D = D_SIDE * D_SIDE


class IdentityMeanGaussian(Likelihood):
    """p(x | z) = N(x; params, sigma^2 I) with a fixed sigma and identity mean (the linear model's decoder)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def param_channels(self, image_channels: int) -> int:
        return image_channels

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        per_dim = -0.5 * ((x - params) / self.sigma) ** 2 - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)
        return per_dim.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return params

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return params + self.sigma * torch.randn(params.shape, generator=generator, dtype=params.dtype)


class LinearVAE(nn.Module):
    """encode/decode/likelihood protocol for the linear-Gaussian model; ``exact=False`` perturbs q."""

    def __init__(self, exact: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(D, LATENT, generator=g, dtype=torch.float64))
        self.W = q * torch.tensor([1.5, 1.0, 0.6], dtype=torch.float64)  # (D, d), orthogonal columns
        self.b = 0.5 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64)  # (D,)
        wtw = self.W.T @ self.W  # diagonal up to round-off
        self.post_cov = torch.linalg.inv(torch.eye(LATENT, dtype=torch.float64) + wtw / SIGMA**2)
        self.exact = exact
        self.likelihood = IdentityMeanGaussian(SIGMA)
        self.dropout = nn.Dropout(0.5)  # only to check that the metrics switch to eval mode
        self.eval()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r = x.flatten(1) - self.b  # (B, D)
        mu = r @ self.W @ self.post_cov.T / SIGMA**2  # (B, d), exact posterior mean
        var = torch.diagonal(self.post_cov).expand_as(mu)
        if not self.exact:
            # Shifted and too narrow: heavy-tailed importance weights, so the IWAE bound tightens slowly
            # enough for each step K = 1 -> 10 -> 100 -> 1000 to be resolved above Monte Carlo noise.
            mu, var = 0.7 * mu + 0.2, 0.25 * var
        return self.dropout(mu), var.log()

    def decode(self, z: Tensor) -> Tensor:
        return (z @ self.W.T + self.b).view(-1, 1, D_SIDE, D_SIDE)

    def exact_log_marginal(self, x: Tensor) -> Tensor:
        cov = self.W @ self.W.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
        return MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x.flatten(1))

    def sample_data(self, n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, LATENT, generator=g, dtype=torch.float64)
        return self.decode(z) + SIGMA * torch.randn(n, 1, D_SIDE, D_SIDE, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def data() -> Tensor:
    return LinearVAE(exact=True).sample_data(64, seed=1)  # (64, 1, 4, 4) float64


def test_exact_posterior_gives_exact_nll_for_any_k_and_chunking(data):
    model = LinearVAE(exact=True)
    assert torch.allclose(model.post_cov, torch.diag(torch.diagonal(model.post_cov)), atol=1e-12)
    exact_nll = -model.exact_log_marginal(data)
    for k, bs in [(1, 512), (37, 5), (200, 64)]:  # bs=5 < B: ragged image groups and sample chunks
        nll = lk.iwae_nll(model, data, num_samples=k, batch_size=bs, generator=torch.Generator().manual_seed(k))
        assert nll.dtype == torch.float64 and nll.shape == (64,)
        torch.testing.assert_close(nll, exact_nll, atol=1e-9, rtol=0)


def test_iwae_bound_above_exact_and_tightens_with_k():
    model = LinearVAE(exact=False)
    data = model.sample_data(256, seed=2)
    exact_nll = -model.exact_log_marginal(data)  # (256,)
    nll = {}
    for k in (1, 10, 100, 1000):
        # Same seed and one chunk for every K: the K draws are the first K of the 1000 (common random
        # numbers), so the paired differences below are far less noisy than independent runs.
        gen = torch.Generator().manual_seed(1000)
        nll[k] = lk.iwae_nll(model, data, num_samples=k, batch_size=10**6, generator=gen)
        gap = nll[k] - exact_nll  # (256,), >= 0 in expectation for every image
        se = gap.std() / math.sqrt(gap.numel())
        assert gap.mean() > -3 * se, f"K={k}: IWAE NLL below the exact NLL beyond Monte Carlo error"
    for k_small, k_big in [(1, 10), (10, 100), (100, 1000)]:
        diff = nll[k_small] - nll[k_big]  # (256,)
        assert diff.mean() > 3 * diff.std() / math.sqrt(diff.numel()), (k_small, k_big, diff.mean())
    gap1, gap1000 = (nll[1] - exact_nll).mean(), (nll[1000] - exact_nll).mean()
    assert gap1 > 1.0  # the wrong posterior costs nats at K = 1 (the KL to the true posterior)
    assert gap1000 < 0.35 * gap1


def test_iwae_k1_is_negative_elbo_in_expectation(data):
    model = LinearVAE(exact=False)
    mu, logvar = model.encode(data)
    var = logvar.exp()
    # Closed-form ELBO: E_q log N(x; W z + b, s^2 I) = log N(x; W mu + b, s^2 I) - tr(W^T W diag(var)) / (2 s^2).
    trace_term = 0.5 * (var * (model.W**2).sum(0)).sum(1) / SIGMA**2  # (B,), W^T W is diagonal
    expected_ll = model.likelihood.log_prob(data, model.decode(mu)) - trace_term
    elbo = expected_ll - lk.gaussian_kl_to_standard_normal(mu, logvar)
    gen = torch.Generator().manual_seed(3)
    nll1 = lk.iwae_nll(model, data.repeat(50, 1, 1, 1), num_samples=1, generator=gen)
    err = nll1.view(50, 64).mean(0) + elbo  # (64,) per-image error of the 50-draw average
    assert err.mean().abs() < 4 * err.std() / math.sqrt(64)

    terms = lk.elbo_terms(model, data, num_samples=4000, generator=torch.Generator().manual_seed(4))
    err = terms.reconstruction - expected_ll  # (64,), Monte Carlo error of 4000 draws, SE about 0.06 nats
    assert err.mean().abs() < 4 * err.std() / math.sqrt(64)
    assert err.abs().max() < 0.35
    torch.testing.assert_close(terms.elbo, terms.reconstruction - terms.kl)
    assert torch.all(terms.elbo.mean() <= model.exact_log_marginal(data).mean())


def test_elbo_kl_matches_torch_distributions(data):
    model = LinearVAE(exact=False)
    terms = lk.elbo_terms(model, data, generator=torch.Generator().manual_seed(0))
    mu, logvar = model.encode(data)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    torch.testing.assert_close(terms.kl, ref)
    # Also on random float32 parameters, as a VAE would produce.
    g = torch.Generator().manual_seed(5)
    mu, logvar = torch.randn(10, 7, generator=g), torch.randn(10, 7, generator=g)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(lk.gaussian_kl_to_standard_normal(mu, logvar), ref)


def test_metrics_restore_training_mode_and_are_reproducible(data):
    model = LinearVAE(exact=False).train()
    a = lk.iwae_nll(model, data[:8], num_samples=20, generator=torch.Generator().manual_seed(9))
    assert model.training
    b = lk.iwae_nll(model, data[:8], num_samples=20, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # eval mode inside: dropout inactive, same draws
    with pytest.raises(ValueError):
        lk.iwae_nll(model, data, num_samples=0)
    model.likelihood.elbo_valid = False  # e.g. a perceptual loss used as a reconstruction term
    with pytest.raises(ValueError, match="normalised"):
        lk.iwae_nll(model, data, num_samples=2)


def test_bits_per_dim():
    assert lk.to_bits_per_dim(math.log(2) * 12, 12) == pytest.approx(1.0)
    torch.testing.assert_close(lk.to_bits_per_dim(torch.tensor([0.0, 8 * math.log(2)]), 4), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError):
        lk.to_bits_per_dim(1.0, 0)


def test_aggregate_posterior_matches_mixture_reference():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(50, 4, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(50, 4, generator=g, dtype=torch.float64) - 1
    z = torch.randn(30, 4, generator=g, dtype=torch.float64) * 2
    mixture = MixtureSameFamily(
        Categorical(logits=torch.zeros(50, dtype=torch.float64)), Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    )
    ref = mixture.log_prob(z)
    torch.testing.assert_close(lk.aggregate_posterior_log_prob(z, mu, logvar), ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lk.aggregate_posterior_log_prob(z, mu, logvar, chunk_size=7), ref, atol=1e-10, rtol=0)


def test_elbo_surgery_identities():
    g = torch.Generator().manual_seed(3)
    n, d = 300, 5
    mu = torch.randn(n, d, generator=g) * 1.5
    logvar = torch.randn(n, d, generator=g) * 0.3 - 1.0
    out = lk.elbo_surgery(mu, logvar, num_z_samples=4, generator=torch.Generator().manual_seed(0))
    ref_kl = kl_divergence(Normal(mu.double(), (0.5 * logvar.double()).exp()), Normal(0.0, 1.0)).sum(1).mean()
    assert out["avg_kl"] == pytest.approx(ref_kl.item(), rel=1e-12)
    assert out["avg_kl"] == pytest.approx(out["mutual_information"] + out["marginal_kl"], abs=1e-10)
    assert out["avg_kl_mc"] == pytest.approx(out["mutual_information"] + out["marginal_kl_direct"], abs=1e-10)
    assert out["max_mutual_information"] == pytest.approx(math.log(n))
    assert 0 < out["mutual_information"] <= math.log(n)
    # The two marginal-KL estimators differ only by the MC error of avg KL (1200 draws).
    assert out["marginal_kl_direct"] == pytest.approx(out["marginal_kl"], abs=0.3)
    # Chunking does not change anything (same draws: eps is always randn((S, N, d))).
    again = lk.elbo_surgery(mu, logvar, num_z_samples=4, generator=torch.Generator().manual_seed(0), chunk_size=17)
    for key in out:
        assert again[key] == pytest.approx(out[key], abs=1e-10)


def test_elbo_surgery_extremes():
    n = 100
    g = torch.Generator().manual_seed(4)
    # Every image has the same posterior: z carries no information about n.
    same = lk.elbo_surgery(torch.full((n, 3), 0.4), torch.full((n, 3), -0.5), generator=g)
    assert same["mutual_information"] == pytest.approx(0.0, abs=1e-10)
    assert same["marginal_kl"] == pytest.approx(same["avg_kl"], abs=1e-10)
    # Far apart, narrow posteriors: z identifies n, MI reaches its ceiling log N.
    mu = torch.arange(n, dtype=torch.float64).unsqueeze(1) * 10.0
    apart = lk.elbo_surgery(mu, torch.full((n, 1), -4.0, dtype=torch.float64), num_z_samples=3, generator=g)
    assert apart["mutual_information"] == pytest.approx(math.log(n), abs=1e-8)
    assert apart["mutual_information"] <= math.log(n)


def test_elbo_surgery_on_linear_vae_posteriors(data):
    model = LinearVAE(exact=False)
    mu, logvar = model.encode(data)
    out = lk.elbo_surgery(mu, logvar, num_z_samples=8, generator=torch.Generator().manual_seed(1))
    assert out["mutual_information"] <= out["max_mutual_information"] == pytest.approx(math.log(64))
    assert out["mutual_information"] > 0
    assert out["avg_kl"] == pytest.approx(out["mutual_information"] + out["marginal_kl"], abs=1e-10)
    with pytest.raises(ValueError):
        lk.elbo_surgery(mu, logvar[:, :2])
