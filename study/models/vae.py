"""Convolutional VAE whose decoder head is sized by its likelihood.

DCGAN-style blocks (Radford et al. 2016): 4x4 convolutions with stride 2, batch norm, LeakyReLU(0.2) in the
encoder and ReLU in the decoder, as in the VAE-GAN baseline of Larsen et al. 2016 that Dorta et al. 2018 build
on. For resolution R the encoder halves R down to 4x4 (log2(R / 4) blocks) and the decoder mirrors it; the
decoder's last layer emits ``likelihood.param_channels(image_channels)`` channels, which the likelihood
interprets (mean, scales, precision factors...).

The posterior q(z | x) = N(mu(x), diag(exp(logvar(x)))) and the prior p(z) = N(0, I) (Kingma & Welling 2014).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from study.likelihoods.base import Likelihood


def _num_blocks(resolution: int) -> int:
    blocks = math.log2(resolution / 4)
    if resolution < 8 or not blocks.is_integer():
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
    return int(blocks)


def encoder_trunk(image_channels: int, resolution: int, width: int) -> tuple[nn.Sequential, int]:
    """Strided-conv trunk (B, C, R, R) -> (B, width * 2^(n-1), 4, 4); returns it and its flat feature size."""
    layers: list[nn.Module] = []
    channels_in = image_channels
    n = _num_blocks(resolution)
    for i in range(n):
        channels_out = width * 2**i
        layers.append(nn.Conv2d(channels_in, channels_out, 4, stride=2, padding=1, bias=i == 0))
        if i > 0:  # DCGAN: no batch norm on the first layer
            layers.append(nn.BatchNorm2d(channels_out))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        channels_in = channels_out
    return nn.Sequential(*layers), channels_in * 16


class Decoder(nn.Module):
    """z (B, latent_dim) -> raw likelihood parameters (B, out_channels, R, R)."""

    def __init__(self, latent_dim: int, out_channels: int, resolution: int, width: int) -> None:
        super().__init__()
        n = _num_blocks(resolution)
        self.top_channels = width * 2 ** (n - 1)
        self.fc = nn.Sequential(nn.Linear(latent_dim, self.top_channels * 16), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        channels_in = self.top_channels
        for i in reversed(range(n - 1)):
            channels_out = width * 2**i
            layers += [
                nn.ConvTranspose2d(channels_in, channels_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels_out),
                nn.ReLU(inplace=True),
            ]
            channels_in = channels_out
        layers.append(nn.ConvTranspose2d(channels_in, out_channels, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], self.top_channels, 4, 4)  # (B, top, 4, 4)
        return self.net(h)  # (B, out_channels, R, R)


class VAE(nn.Module):
    """VAE with a pluggable reconstruction likelihood.

    Args:
        likelihood: the p(x | z) family; its ``param_channels`` sizes the decoder head.
        image_channels: C of the input images (3 for RGB, 1 for grey / Y).
        resolution: R, square images R x R; a power of two >= 8 (the study uses 32 and 64).
        latent_dim: d, size of z (128 in Larsen et al. 2016 and Dorta et al. 2018).
        width: channels of the first encoder block, doubled per block (DCGAN uses 64).

    Raises:
        ValueError: unsupported resolution.
    """

    def __init__(
        self,
        likelihood: Likelihood,
        image_channels: int = 3,
        resolution: int = 64,
        latent_dim: int = 128,
        width: int = 32,
    ) -> None:
        super().__init__()
        self.likelihood = likelihood
        self.image_channels = image_channels
        self.resolution = resolution
        self.latent_dim = latent_dim
        self.encoder, features = encoder_trunk(image_channels, resolution, width)
        self.posterior = nn.Linear(features, 2 * latent_dim)
        self.decoder = Decoder(latent_dim, likelihood.param_channels(image_channels), resolution, width)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | x) parameters: (mu, logvar), each float (B, latent_dim); x float (B, C, R, R) in [0, 1]."""
        h = self.encoder(x * 2.0 - 1.0).flatten(1)  # centred inputs; (B, features)
        mu, logvar = self.posterior(h).chunk(2, dim=1)  # (B, d) each
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """Raw likelihood parameters, float (B, param_channels, R, R), for latents z (B, latent_dim)."""
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One reparameterised pass: ``mu``, ``logvar``, ``z`` (B, d) and decoder ``dist_params``."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps  # (B, d)
        return {"mu": mu, "logvar": logvar, "z": z, "dist_params": self.decode(z)}

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Means of p(x | z) for z ~ N(0, I): float (n, C, R, R), nominally in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.likelihood.mean(self.decode(z))
