"""Factorised Laplace likelihood: the L1 reconstruction loss as a normalised density, so the ELBO stays valid.

p(x | z) = prod_i Laplace(x_i; mu_i(z), b_i) over every pixel and channel i of an image in [0, 1], so

    log p(x | z) = sum_i [ -|x_i - mu_i| / b_i - log(2 b_i) ]   (nats per image).

With ``scale_mode='fixed'`` this is the L1 loss up to scale 1/b and a constant; ``learned_global`` learns one b with
the network (the Laplace analogue of Dai & Wipf's learned gamma); ``per_pixel`` lets the decoder predict b_i(z).
Its standard deviation is sqrt(2) b, and E|x - mu| = b.

Parametrisation mirrors :mod:`study.likelihoods.gaussian`: mean = ``sigmoid`` of the decoder output, predicted
scales ``min_scale + softplus(.)`` (per pixel) or ``min_scale + exp(.)`` (global), so the density stays bounded.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.likelihoods.base import Likelihood

_LOG_2 = math.log(2.0)


class LaplaceLikelihood(Likelihood):
    """Diagonal Laplace p(x | z) with fixed, learned-global or per-pixel scale b.

    Args:
        scale_mode: ``fixed``, ``learned_global`` or ``per_pixel``.
        scale: the fixed b, or the initial global b, in [0, 1] image units (> 0). b = 0.1 has the same standard
            deviation as a Gaussian sigma of 0.141.
        min_scale: floor added to learned / predicted b (> 0); 1e-3 is a quarter of one 8-bit grey level.

    Raises:
        ValueError: an unknown ``scale_mode`` or a non-positive ``scale`` / ``min_scale``.
    """

    def __init__(
        self,
        scale_mode: Literal["fixed", "learned_global", "per_pixel"] = "learned_global",
        scale: float = 0.1,
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        if scale_mode not in ("fixed", "learned_global", "per_pixel"):
            raise ValueError(f"unknown scale_mode {scale_mode!r}")
        if scale <= 0 or min_scale <= 0:
            raise ValueError("scale and min_scale must be positive")
        self.scale_mode = scale_mode
        self.min_scale = float(min_scale)
        if scale_mode == "fixed":
            self.register_buffer("log_scale", torch.tensor(math.log(scale)))
        elif scale_mode == "learned_global":
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def param_channels(self, image_channels: int) -> int:
        return 2 * image_channels if self.scale_mode == "per_pixel" else image_channels

    def _split(self, dist_params: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log b), each broadcastable to (B, C, H, W)."""
        if self.scale_mode == "per_pixel":
            raw_mu, raw_scale = dist_params.chunk(2, dim=1)  # (B, C, H, W) each
            b = self.min_scale + F.softplus(raw_scale)
            return torch.sigmoid(raw_mu), torch.log(b)
        if self.scale_mode == "learned_global":
            b = self.min_scale + self.log_scale.exp()
            return torch.sigmoid(dist_params), torch.log(b).expand_as(dist_params)
        return torch.sigmoid(dist_params), self.log_scale.expand_as(dist_params)

    def scale(self, dist_params: Tensor) -> Tensor:
        """Per-pixel Laplace scale b, float (B, C, H, W), > 0, in [0, 1] image units (std = sqrt(2) b)."""
        return self._split(dist_params)[1].exp()

    def log_prob(self, x: Tensor, dist_params: Tensor) -> Tensor:
        mu, log_b = self._split(dist_params)
        per_dim = -(x - mu).abs() * torch.exp(-log_b) - log_b - _LOG_2  # (B, C, H, W)
        return per_dim.flatten(1).sum(1)  # (B,)

    def mean(self, dist_params: Tensor) -> Tensor:
        return self._split(dist_params)[0]

    def sample(self, dist_params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mu, log_b = self._split(dist_params)
        # Laplace(0, 1) = E1 - E2 with E ~ Exp(1) = -log(1 - U); 1 - U lies in (0, 1], so the draw is finite.
        u = torch.rand((2, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)  # (2, B, C, H, W)
        noise = torch.log1p(-u[1]) - torch.log1p(-u[0])
        return mu + log_b.exp() * noise
