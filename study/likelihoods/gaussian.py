"""Factorised Gaussian likelihood: the plain VAE and beta-VAE reconstruction term.

p(x | z) = prod_i N(x_i; mu_i(z), sigma_i^2) over every pixel and channel i of an image in [0, 1], so

    log p(x | z) = sum_i [ -(x_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i - log(2 pi) / 2 ]   (nats per image).

With ``sigma_mode='fixed'`` this is the L2 loss up to scale and a constant (Kingma & Welling 2014); with
``learned_global`` the single sigma is learned with the network (Dai & Wipf 2019's gamma, as in Asperti 2020);
with ``per_pixel`` the decoder predicts sigma_i(z) (heteroscedastic decoder, Dorta et al. 2018's "VAE"
baseline uses a diagonal covariance).

The mean is ``sigmoid`` of the decoder output so reconstructions stay in (0, 1); predicted sigmas are
``min_sigma + softplus(.)`` so the density stays bounded and gradients finite.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.likelihoods.base import Likelihood

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class GaussianLikelihood(Likelihood):
    """Diagonal Gaussian p(x | z) with fixed, learned-global or per-pixel sigma.

    Args:
        sigma_mode: ``fixed``, ``learned_global`` or ``per_pixel``.
        sigma: the fixed sigma, or the initial global sigma, in [0, 1] image units (> 0).
        min_sigma: floor added to learned / predicted sigma (> 0).

    Raises:
        ValueError: an unknown ``sigma_mode`` or a non-positive ``sigma`` / ``min_sigma``.
    """

    def __init__(
        self,
        sigma_mode: Literal["fixed", "learned_global", "per_pixel"] = "learned_global",
        sigma: float = 0.1,
        min_sigma: float = 1e-3,
    ) -> None:
        super().__init__()
        if sigma_mode not in ("fixed", "learned_global", "per_pixel"):
            raise ValueError(f"unknown sigma_mode {sigma_mode!r}")
        if sigma <= 0 or min_sigma <= 0:
            raise ValueError("sigma and min_sigma must be positive")
        self.sigma_mode = sigma_mode
        self.min_sigma = float(min_sigma)
        if sigma_mode == "fixed":
            self.register_buffer("log_sigma", torch.tensor(math.log(sigma)))
        elif sigma_mode == "learned_global":
            self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)))

    def param_channels(self, image_channels: int) -> int:
        return 2 * image_channels if self.sigma_mode == "per_pixel" else image_channels

    def _split(self, dist_params: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log sigma), each broadcastable to (B, C, H, W)."""
        if self.sigma_mode == "per_pixel":
            raw_mu, raw_sigma = dist_params.chunk(2, dim=1)  # (B, C, H, W) each
            sigma = self.min_sigma + F.softplus(raw_sigma)
            return torch.sigmoid(raw_mu), torch.log(sigma)
        if self.sigma_mode == "learned_global":
            sigma = self.min_sigma + self.log_sigma.exp()
            return torch.sigmoid(dist_params), torch.log(sigma).expand_as(dist_params)
        return torch.sigmoid(dist_params), self.log_sigma.expand_as(dist_params)

    def sigma(self, dist_params: Tensor) -> Tensor:
        """Per-pixel standard deviation, float (B, C, H, W), > 0, in [0, 1] image units."""
        return self._split(dist_params)[1].exp()

    def log_prob(self, x: Tensor, dist_params: Tensor) -> Tensor:
        mu, log_sigma = self._split(dist_params)
        z = (x - mu) * torch.exp(-log_sigma)
        per_dim = -0.5 * z.square() - log_sigma - _HALF_LOG_2PI  # (B, C, H, W)
        return per_dim.flatten(1).sum(1)  # (B,)

    def mean(self, dist_params: Tensor) -> Tensor:
        return self._split(dist_params)[0]

    def sample(self, dist_params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mu, log_sigma = self._split(dist_params)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + log_sigma.exp() * noise
