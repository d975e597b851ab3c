"""Training objectives: the (beta-)ELBO and its parts.

For an image x with D modelled dimensions, q(z|x) = N(mu, diag(sigma^2)) and p(z) = N(0, I):

    ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))                          (Kingma & Welling 2014, Eq. 3)
    KL      = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)                 (ibid., Appendix B)
    loss    = -(E_q[log p(x | z)] - beta * KL)                                   (Higgins et al. 2017, Eq. 4)

The ELBO is always *reported* with beta = 1 (as Dorta et al. 2018 evaluate beta-VAE), in nats per image and as
bits per dimension, -ELBO / (D ln 2), an upper bound on the NLL in bits per dimension.

Dorta et al. 2018 train the structured-residual VAE on

    loss = -ELBO + alpha(epoch) * ||x - mu(z)||^2 - log Gamma(diag(Lambda(z)); alpha_G, beta_G)    (Eq. 14, 13)

:func:`training_loss` composes these: the alpha schedule comes from ``study.schedules``, the Gamma prior from
``study.priors``, the squared-error penalty is :func:`variance_minimiser_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from study.priors import gamma_log_prob


def variance_minimiser_loss(x: Tensor, mean: Tensor) -> Tensor:
    """||x - mu(z)||_2^2 per image, the term alpha multiplies in Dorta et al. 2018, Eq. 14.

    Args:
        x: images, float (B, ...) in [0, 1].
        mean: the likelihood's mean mu(z), same shape and units.

    Returns:
        float (B,): squared error summed over all pixels and channels (image units^2), not averaged.

    Raises:
        ValueError: shapes differ or there is no batch axis.
    """
    if x.shape != mean.shape:
        raise ValueError(f"x {tuple(x.shape)} and mean {tuple(mean.shape)} differ in shape")
    if x.dim() < 1:
        raise ValueError("expected a batch axis: (B, ...)")
    return (x - mean).square().reshape(x.shape[0], -1).sum(1)  # (B,)


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row.

    Args:
        mu, logvar: float (B, d).

    Returns:
        float (B,), nats, >= 0.
    """
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=1)


def bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Convert nats per image to bits per dimension: nats / (D ln 2)."""
    return nats / (num_dims * math.log(2.0))


@dataclass
class ElboTerms:
    """Per-image terms of one Monte Carlo (single z sample) ELBO estimate, all float (B,) in nats."""

    log_likelihood: Tensor  # log p(x | z)
    kl: Tensor  # KL(q(z|x) || p(z))

    @property
    def elbo(self) -> Tensor:
        return self.log_likelihood - self.kl

    def loss(self, beta: float) -> Tensor:
        """Scalar beta-VAE loss, mean over the batch: -(log p(x|z) - beta * KL)."""
        return -(self.log_likelihood - beta * self.kl).mean()


def elbo_terms(log_likelihood: Tensor, mu: Tensor, logvar: Tensor) -> ElboTerms:
    """Bundle log p(x|z) (B,) with the analytic KL of q(z|x) = N(mu, exp(logvar)) (B, d) against N(0, I)."""
    return ElboTerms(log_likelihood=log_likelihood, kl=kl_standard_normal(mu, logvar))


def training_loss(
    terms: ElboTerms,
    beta: float,
    x: Tensor | None = None,
    mean: Tensor | None = None,
    variance_minimiser_alpha: float = 0.0,
    precision_diagonal: Tensor | None = None,
    gamma_concentration: float | None = None,
    gamma_rate: float | None = None,
) -> Tensor:
    """Scalar training loss, mean over the batch: the beta-VAE loss plus the optional Dorta et al. terms.

    Args:
        terms: per-image log p(x|z) and KL (B,).
        beta: KL weight (>= 0).
        x, mean: images and the likelihood mean, float (B, C, H, W) in [0, 1]; needed when alpha > 0.
        variance_minimiser_alpha: alpha of Eq. 14 (image units^-2); 0 disables the term.
        precision_diagonal: lambda_ii (B, ...) > 0 for the Gamma prior of Eq. 13; None disables it.
        gamma_concentration, gamma_rate: alpha_G, beta_G of the Gamma prior.
    """
    loss = terms.loss(beta)
    if variance_minimiser_alpha:
        loss = loss + variance_minimiser_alpha * variance_minimiser_loss(x, mean).mean()
    if precision_diagonal is not None:
        loss = loss - gamma_log_prob(precision_diagonal, gamma_concentration, gamma_rate).mean()
    return loss
