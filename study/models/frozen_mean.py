"""The structured covariance fitted on a frozen Gaussian VAE's mean: the control that splits the NLL gain.

A structured likelihood trained jointly (Dorta et al. 2018) changes two things against the factorised Gaussian
VAE: the covariance of the residual and, through the shared network, the mean mu(z) itself. This model keeps the
encoder q(z | x) and the mean mu(z) of a trained Gaussian VAE fixed and learns only a new decoder for the
precision channels of the sparse Cholesky factor (Dorta et al. 2018, Eqs. 6-8). The NLL difference between it
and the Gaussian it was built on is therefore the covariance's share of the gain; the difference between the
jointly trained structured model and this control is the mean's share.

Parameter layout: the structured likelihood reads its decoder output as (1 + Q) C channels, quantity q of image
channel c at q * C + c, q = 0 the raw mean (``study.likelihoods.structured``). The factorised Gaussian's first
C output channels are its raw mean with the same ``sigmoid`` link (``study.likelihoods.gaussian``), so copying
them gives exactly the Gaussian's mu(z).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from study.likelihoods.base import Likelihood
from study.models.vae import VAE, Decoder


class FrozenMeanVAE(VAE):
    """A VAE whose q(z | x) and mean mu(z) are a frozen Gaussian VAE's, with a trainable precision decoder.

    Args: as :class:`study.models.vae.VAE`; ``likelihood`` must be a structured likelihood (its first C of
        ``param_channels(C)`` are the raw mean). After construction the frozen parts are random until
        :meth:`load_mean_model` copies a trained Gaussian VAE in (a checkpoint of this class carries them).

    Only ``decoder`` (the precision head, Q C output channels) and the likelihood's own parameters train;
    ``encoder``, ``posterior`` and ``mean_decoder`` have ``requires_grad = False`` and stay in eval mode (their
    BatchNorm statistics are the Gaussian VAE's), so the KL term of every image is the Gaussian VAE's.
    """

    def __init__(self, likelihood: Likelihood, image_channels: int = 3, resolution: int = 64,
                 latent_dim: int = 128, width: int = 32) -> None:
        super().__init__(likelihood, image_channels, resolution, latent_dim, width)
        total = likelihood.param_channels(image_channels)
        if total <= image_channels:
            raise ValueError(f"{type(likelihood).__name__} has no channels beyond the mean; the frozen-mean control "
                             "needs the structured likelihood")
        self.decoder = Decoder(latent_dim, total - image_channels, resolution, width)  # precision channels only
        self.mean_decoder = Decoder(latent_dim, image_channels, resolution, width)  # raw mean, copied and frozen
        self._freeze()

    def _frozen(self) -> list[nn.Module]:
        return [self.encoder, self.posterior, self.mean_decoder]

    def _freeze(self) -> None:
        for module in self._frozen():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> "FrozenMeanVAE":
        super().train(mode)
        for module in self._frozen():  # BatchNorm of the frozen parts keeps the Gaussian VAE's statistics
            module.eval()
        return self

    @torch.no_grad()
    def load_mean_model(self, gaussian: VAE) -> None:
        """Copy q(z | x) and the raw-mean channels of mu(z) from a trained Gaussian VAE of the same shape.

        Raises:
            ValueError: ``gaussian`` has a different latent size, resolution, channels or width.
        """
        channels = self.image_channels
        if (gaussian.latent_dim, gaussian.resolution, gaussian.image_channels) != (
                self.latent_dim, self.resolution, channels):
            raise ValueError(
                f"mean model has latent_dim {gaussian.latent_dim}, resolution {gaussian.resolution}, "
                f"{gaussian.image_channels} channels; this control needs {self.latent_dim}, {self.resolution}, "
                f"{channels}")
        self.encoder.load_state_dict(gaussian.encoder.state_dict())
        self.posterior.load_state_dict(gaussian.posterior.state_dict())
        state = copy.deepcopy(gaussian.decoder.state_dict())
        head = [k for k in state if k.startswith("net.")][-2:]  # the last ConvTranspose2d: weight (in, out, k, k), bias
        for key in head:
            # weight: out channels on dim 1; bias: dim 0. The first C output channels are the raw mean.
            state[key] = state[key][:, :channels] if state[key].dim() == 4 else state[key][:channels]
        self.mean_decoder.load_state_dict(state)
        self._freeze()

    def decode(self, z: Tensor) -> Tensor:
        """Raw structured parameters (B, (1 + Q) C, R, R): the frozen raw mean, then the learned precision."""
        return torch.cat([self.mean_decoder(z), self.decoder(z)], dim=1)
