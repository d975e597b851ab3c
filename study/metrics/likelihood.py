"""Likelihood metrics of a VAE: importance-weighted NLL, ELBO terms, and ELBO surgery.

These follow Dorta et al. 2018 ("Training VAEs Under Structured Residuals"), who report on the test set (Table 1):

- the NLL bound with K = 500 importance samples per image (Burda, Grosse & Salakhutdinov 2016, IWAE, Eq. 8):
  log p(x) >= E[ log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x) ],  z_k ~ q(z | x);
- the average KL and its "ELBO surgery" split (Hoffman & Johnson 2016, Eq. 3-4):
  E_x KL(q(z|x) || p(z)) = I_q(x; z) + KL(q(z) || p(z)),  q(z) = 1/N sum_n q(z | x_n),
  estimated with S = N, i.e. the aggregate posterior is the mixture over the whole evaluation set.

Every function works with any model following :class:`VAEProtocol`: a diagonal Gaussian encoder, a decoder
producing likelihood parameters, a :class:`study.likelihoods.base.Likelihood`, and the prior p(z) = N(0, I).
log p(x | z) is always ``likelihood.log_prob_given_z(x, decode(z), z)``: the same call for every family, which
families whose density needs z itself (the blur family's ``network`` kernel k_gamma(z)) use and the others
forward to ``log_prob``. All values are in nats; :func:`to_bits_per_dim` converts.

Units. ``Likelihood.log_prob`` is a density over images in [0, 1], so these NLLs are continuous NLLs on the
[0, 1] scale and can be negative (Dorta's Table 1 values are). The data are 8-bit values k / 255, so expressing
the same density per unit of [0, 255] adds log2(255) = 7.994 bits per dimension
(``to_bits_per_dim(nll, D) + log2(255)``), not 8. Neither number bounds the NLL of the discrete 8-bit data: the
familiar "+ 8 bits" bound holds for a density evaluated on uniformly dequantised inputs (k + u) / 256,
u ~ U[0, 1) (Theis, van den Oord & Bethge 2016, Sec. 3.1), while these metrics evaluate it at the 8-bit values
themselves, where a continuous density can be arbitrarily peaked.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from study.likelihoods.base import Likelihood

_LOG_2PI = math.log(2.0 * math.pi)


@runtime_checkable
class VAEProtocol(Protocol):
    """What the likelihood metrics need from a VAE (``study.models.vae.VAE`` satisfies it).

    - ``encode(x)``: images float (B, C, H, W) in [0, 1] -> ``(mu, logvar)``, each float (B, latent_dim), the
      diagonal Gaussian posterior q(z | x) = N(mu, diag(exp(logvar))).
    - ``decode(z)``: float (B, latent_dim) -> likelihood parameters float (B, P, H, W).
    - ``likelihood``: turns those parameters into log p(x | z) with ``log_prob_given_z(x, dist_params, z)``, float (B,)
      nats per image.
    - the prior is p(z) = N(0, I).
    """

    likelihood: Likelihood

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def decode(self, z: Tensor) -> Tensor: ...


@contextlib.contextmanager
def _eval_mode(model: object) -> Iterator[None]:
    """Put an nn.Module in eval mode (dropout, batch-norm statistics) and restore its mode afterwards."""
    train = getattr(model, "train", None)
    was_training = getattr(model, "training", None)
    if callable(train) and isinstance(was_training, bool):
        train(False)
        try:
            yield
        finally:
            train(was_training)
    else:
        yield


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last axis: float (..., d) -> (...), nats."""
    return -0.5 * (z.square() + _LOG_2PI).sum(-1)


def diagonal_gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last axis; all broadcast to (..., d) -> (...), nats."""
    return -0.5 * ((z - mu).square() * torch.exp(-logvar) + logvar + _LOG_2PI).sum(-1)


def gaussian_kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """Analytic KL( N(mu, diag(exp(logvar))) || N(0, I) ) per row (Kingma & Welling 2014, Appendix B).

    KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2).

    Args:
        mu, logvar: float (B, d) posterior parameters.

    Returns:
        float (B,), >= 0, nats.
    """
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)


def to_bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Convert nats per image to bits per dimension: ``nats / (num_dims * ln 2)``.

    Args:
        nats: NLL (or any log-density) in nats per image, a float or a tensor of any shape.
        num_dims: the number of modelled dimensions per image (C * H * W of the pixels actually modelled,
            e.g. 64 * 64 for a grey model); > 0.

    Returns:
        same type and shape as ``nats``, in bits per dimension.

    Raises:
        ValueError: ``num_dims`` <= 0.
    """
    if num_dims <= 0:
        raise ValueError(f"num_dims must be positive, got {num_dims}")
    return nats / (num_dims * math.log(2.0))


class ElboTerms(NamedTuple):
    """Per-image ELBO decomposition, each float (B,) in nats: ``elbo = reconstruction - kl``."""

    elbo: Tensor
    reconstruction: Tensor  # Monte Carlo estimate of E_q[log p(x | z)]
    kl: Tensor  # analytic KL(q(z | x) || N(0, I))


@torch.no_grad()
def elbo_terms(
    model: VAEProtocol,
    x: Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> ElboTerms:
    """Per-image ELBO with beta = 1: E_q[log p(x | z)] - KL(q(z | x) || p(z)).

    The reconstruction term is averaged over ``num_samples`` reparameterised draws z ~ q(z | x); the KL is
    analytic for the diagonal Gaussian posterior and the N(0, I) prior. For a likelihood with
    ``elbo_valid = False`` the "reconstruction" is minus its loss and the "elbo" is not a bound.
    Evaluation only: runs under ``torch.no_grad`` with the model temporarily in eval mode (training losses
    live in ``study.objectives``).

    Args:
        model: a :class:`VAEProtocol` model.
        x: images, float (B, C, H, W) in [0, 1].
        num_samples: draws of z per image for the reconstruction term (>= 1).
        generator: optional torch.Generator on ``x``'s device, for reproducible draws.

    Returns:
        :class:`ElboTerms` (elbo, reconstruction, kl), each float (B,) nats per image.

    Raises:
        ValueError: ``num_samples`` < 1.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    with _eval_mode(model):
        mu, logvar = model.encode(x)  # (B, d) each
        std = torch.exp(0.5 * logvar)
        recon = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for _ in range(num_samples):
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + std * eps  # (B, d)
            recon += model.likelihood.log_prob_given_z(x, model.decode(z), z).double()  # (B,)
        recon = (recon / num_samples).to(mu.dtype)
        kl = gaussian_kl_to_standard_normal(mu, logvar)  # (B,)
    return ElboTerms(elbo=recon - kl, reconstruction=recon, kl=kl)


@torch.no_grad()
def iwae_nll(
    model: VAEProtocol,
    x: Tensor,
    num_samples: int = 500,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Importance-weighted NLL bound per image (Burda et al. 2016, Eq. 8), as Dorta et al. 2018 report it.

    NLL_K(x) = -log (1/K) sum_{k=1..K} p(x | z_k) p(z_k) / q(z_k | x),  z_k ~ q(z | x) i.i.d.

    Its expectation is an upper bound on -log p(x) that decreases monotonically to it as K grows
    (K = 1 is the negative ELBO). The log-weights are accumulated with a running ``logaddexp`` in float64,
    chunk by chunk, so K = 500 on 64 x 64 images never holds more than ``batch_size`` decoder outputs.
    Runs under ``torch.no_grad`` with the model temporarily in eval mode.

    Args:
        model: a :class:`VAEProtocol` model.
        x: images, float (B, C, H, W) in [0, 1].
        num_samples: K, importance samples per image (>= 1); Dorta et al. use 500.
        batch_size: the most latent codes decoded in one call (images x samples per chunk), >= 1.
        generator: optional torch.Generator on ``x``'s device, for reproducible draws.

    Returns:
        float64 (B,), NLL bound in nats per image (may be negative for a continuous density); see
        :func:`to_bits_per_dim`.

    Raises:
        ValueError: ``num_samples`` or ``batch_size`` < 1, or the likelihood is not a normalised density
            (``elbo_valid = False``: its "NLL" would be a loss value, not comparable across models).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    if not getattr(model.likelihood, "elbo_valid", True):
        raise ValueError(f"{type(model.likelihood).__name__} is not a normalised density: NLL is undefined")
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    group = min(x.shape[0], batch_size)  # images encoded together
    with _eval_mode(model):
        for start in range(0, x.shape[0], group):
            xg = x[start : start + group]  # (G, C, H, W)
            g = xg.shape[0]
            mu, logvar = model.encode(xg)  # (G, d) each
            std = torch.exp(0.5 * logvar)
            per_chunk = max(1, batch_size // g)  # samples per decoder call
            acc = torch.full((g,), -math.inf, dtype=torch.float64, device=x.device)
            for k0 in range(0, num_samples, per_chunk):
                k = min(per_chunk, num_samples - k0)
                eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
                z = mu + std * eps  # (k, G, d)
                dist_params = model.decode(z.reshape(k * g, -1))  # (k*G, P, H, W)
                x_rep = xg.unsqueeze(0).expand(k, *xg.shape).reshape(k * g, *xg.shape[1:])  # (k*G, C, H, W)
                z_flat = z.reshape(k * g, -1)  # (k*G, d), row k * G + g as dist_params and x_rep
                log_px = model.likelihood.log_prob_given_z(x_rep, dist_params, z_flat).view(k, g)  # (k, G)
                log_pz = standard_normal_log_prob(z)  # (k, G)
                # log q(z | x) from eps directly: (z - mu)^2 / sigma^2 = eps^2, exact and cheaper.
                log_qz = -0.5 * (eps.square() + logvar + _LOG_2PI).sum(-1)  # (k, G)
                log_w = log_px.double() + log_pz.double() - log_qz.double()  # (k, G)
                acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))  # (G,)
            out[start : start + g] = -(acc - math.log(num_samples))
    return out


# Entries of one (rows, N) block of log q(z_i | x_m) in elbo_surgery: 2^23 doubles = 64 MiB.
_SURGERY_BLOCK_ELEMENTS = 1 << 23


def aggregate_posterior_log_prob(
    z: Tensor, mu: Tensor, logvar: Tensor, chunk_size: int | None = None
) -> Tensor:
    """log q(z) for the aggregate posterior q(z) = 1/N sum_m N(z; mu_m, diag(exp(logvar_m))).

    Computed as logsumexp_m log q(z | x_m) - log N in float64, ``chunk_size`` rows of z at a time, so the
    (M, N) table of component log-densities never exists at once. The quadratic form is expanded into
    matrix products (z^2 @ (1/var)^T - 2 z @ (mu/var)^T + sum mu^2/var), which is fast and, in float64,
    accurate to ~1e-9 nats even for posterior standard deviations of 1e-2.

    Args:
        z: float (M, d) points.
        mu, logvar: float (N, d) parameters of the N mixture components.
        chunk_size: rows of z per block; default keeps each (rows, N) block at about 64 MiB.

    Returns:
        float64 (M,), nats.
    """
    z, mu, logvar = z.double(), mu.double(), logvar.double()
    n, d = mu.shape
    inv_var = torch.exp(-logvar)  # (N, d)
    lin = mu * inv_var  # (N, d)
    # Per-component constant: -1/2 (sum mu^2/var + sum logvar + d log 2 pi)
    const = -0.5 * ((mu * lin).sum(-1) + logvar.sum(-1) + d * _LOG_2PI)  # (N,)
    rows = chunk_size or max(1, _SURGERY_BLOCK_ELEMENTS // n)
    out = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
    for start in range(0, z.shape[0], rows):
        zc = z[start : start + rows]  # (r, d)
        log_q = -0.5 * (zc.square() @ inv_var.T) + zc @ lin.T + const  # (r, N)
        out[start : start + rows] = torch.logsumexp(log_q, dim=1) - math.log(n)
    return out


@torch.no_grad()
def elbo_surgery(
    mu: Tensor,
    logvar: Tensor,
    num_z_samples: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """ELBO surgery (Hoffman & Johnson 2016) over an evaluation set of N images, with S = N (Dorta et al.).

    avg KL = E_n KL(q(z | x_n) || p(z)) = I_q(n; z) + KL(q(z) || p(z)), with the aggregate posterior
    q(z) = 1/N sum_m q(z | x_m) over the same N images and p(z) = N(0, I).

    Estimators (all in float64):
    - ``avg_kl``: analytic, mean over n of KL(q(z | x_n) || N(0, I)).
    - ``mutual_information``: Monte Carlo, mean over n and over ``num_z_samples`` draws z ~ q(z | x_n) of
      log q(z | x_n) - log q(z). Each term is <= log N (the mixture contains component n with weight 1/N),
      so the estimate never exceeds ``max_mutual_information`` = log N; for well separated posteriors it
      saturates there (Dorta's 9.87-9.89 against log 19962 = 9.90).
    - ``marginal_kl``: avg_kl - mutual_information, so the identity holds to round-off (as in Dorta's Table 1).
    - ``marginal_kl_direct``: Monte Carlo E_{q(z)}[log q(z) - log p(z)] with the same draws (z_{n,s} with n
      uniform are draws from q(z)); it agrees with ``marginal_kl`` within Monte Carlo error, and
      ``avg_kl_mc`` = mean[log q(z | x_n) - log p(z)] = ``mutual_information + marginal_kl_direct`` exactly.
    Both MC terms use log q(z) estimated with S = N, which Hoffman & Johnson note biases MI low for small N.

    Args:
        mu, logvar: float (N, d), the posterior parameters of every image of the evaluation set.
        num_z_samples: draws of z per image (>= 1).
        generator: optional torch.Generator on ``mu``'s device; draws are ``randn((num_z_samples, N, d))``.
        chunk_size: rows per block of the N x (N * num_z_samples) log-density table (default: ~64 MiB).

    Returns:
        dict with float nats ``avg_kl``, ``mutual_information``, ``marginal_kl``, ``max_mutual_information``
        (= log N), ``marginal_kl_direct``, ``avg_kl_mc``, and ``num_images`` (N, as float).

    Raises:
        ValueError: shapes differ or are not (N, d), N < 1, or ``num_z_samples`` < 1.
    """
    if mu.shape != logvar.shape or mu.ndim != 2 or mu.shape[0] < 1:
        raise ValueError(f"mu and logvar must both be (N, d), got {tuple(mu.shape)}, {tuple(logvar.shape)}")
    if num_z_samples < 1:
        raise ValueError(f"num_z_samples must be >= 1, got {num_z_samples}")
    mu, logvar = mu.double(), logvar.double()
    n, d = mu.shape
    avg_kl = gaussian_kl_to_standard_normal(mu, logvar).mean().item()

    eps = torch.randn((num_z_samples, n, d), generator=generator, device=mu.device, dtype=torch.float64)
    z = (mu + torch.exp(0.5 * logvar) * eps).reshape(num_z_samples * n, d)  # (S*N, d), row s*N + n
    log_q_cond = (-0.5 * (eps.square() + logvar + _LOG_2PI).sum(-1)).reshape(-1)  # (S*N,) log q(z|x_n)
    log_q_agg = aggregate_posterior_log_prob(z, mu, logvar, chunk_size)  # (S*N,) log q(z)
    log_p = standard_normal_log_prob(z)  # (S*N,)

    mi = (log_q_cond - log_q_agg).mean().item()
    marginal_direct = (log_q_agg - log_p).mean().item()
    return {
        "avg_kl": avg_kl,
        "mutual_information": mi,
        "marginal_kl": avg_kl - mi,
        "max_mutual_information": math.log(n),
        "marginal_kl_direct": marginal_direct,
        "avg_kl_mc": (log_q_cond - log_p).mean().item(),
        "num_images": float(n),
    }
