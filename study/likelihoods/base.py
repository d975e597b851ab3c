"""The interface every reconstruction likelihood p(x | z) implements.

A likelihood turns the decoder's raw output ``dist_params`` (B, P, H, W) into a distribution over images x
(B, C, H, W) in [0, 1]. ``log_prob`` is in **nats per image, summed over pixels and channels, with every
normalising constant and log-determinant included**, so ELBOs of different likelihoods over the same pixel
space compare directly (as Dorta et al. 2018, Table 1, compare likelihood families by their NLL).

Families that are *not* normalised densities (perceptual or frequency losses used as reconstruction terms)
set ``elbo_valid = False``; their ``log_prob`` is minus a loss, and reports never rank them by NLL.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class Likelihood(nn.Module, ABC):
    """Base class of reconstruction likelihoods p(x | z).

    Subclasses own only the maths of p(x | z); priors on its parameters and extra training terms live in
    ``study.objectives`` and read them through accessors.
    """

    #: True when ``log_prob`` is a normalised log-density, so ``elbo`` and NLL are meaningful.
    elbo_valid: bool = True

    @abstractmethod
    def param_channels(self, image_channels: int) -> int:
        """Decoder output channels per pixel needed for images of ``image_channels`` channels."""

    @abstractmethod
    def log_prob(self, x: Tensor, dist_params: Tensor) -> Tensor:
        """log p(x | z) per image.

        Args:
            x: images, float (B, C, H, W) in [0, 1].
            dist_params: decoder output, float (B, param_channels(C), H, W), unconstrained.

        Returns:
            float (B,) in nats per image (summed over all modelled dimensions).
        """

    @abstractmethod
    def mean(self, dist_params: Tensor) -> Tensor:
        """E[x | z], float (B, C, H, W), nominally in [0, 1] (not clipped)."""

    @abstractmethod
    def sample(self, dist_params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One draw x ~ p(x | z), float (B, C, H, W), not clipped to [0, 1]."""

    # ------------------------------------------------------------------------------------ optional hooks
    def num_dims(self, image_shape: tuple[int, int, int]) -> int:
        """Dimensions D actually modelled for images of shape (C, H, W): the bits-per-dimension divisor."""
        channels, height, width = image_shape
        return channels * height * width

    def log_prob_given_z(self, x: Tensor, dist_params: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) for ``dist_params = decode(z)``: the entry point training and the metrics use, since some
        families need z itself (the blur family's kernel k_gamma(z)); default ``log_prob``.

        Args:
            x: images, float (B, C, H, W) in [0, 1].
            dist_params: decoder output for z, float (B, param_channels(C), H, W).
            z: the latent codes, float (B, latent_dim).

        Returns:
            float (B,) in nats per image, as ``log_prob``.
        """
        return self.log_prob(x, dist_params)

    def sample_given_z(self, dist_params: Tensor, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One draw x ~ p(x | z) for ``dist_params = decode(z)``, from the same density ``log_prob_given_z`` scores;
        default ``sample``. Float (B, C, H, W), not clipped to [0, 1]; z float (B, latent_dim)."""
        return self.sample(dist_params, generator=generator)

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by ``auxiliary_loss`` in an alternating step, never by the ELBO's optimiser."""
        return []

    def auxiliary_loss(self, x: Tensor, dist_params: Tensor, z: Tensor) -> Tensor | None:
        """Scalar loss of the alternating step (e.g. the blur kernel network's), or None when there is none."""
        return None
