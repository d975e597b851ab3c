"""VAE shapes: the decoder head follows the likelihood, resolutions 32 and 64."""

from __future__ import annotations

import pytest
import torch

from study.likelihoods.gaussian import GaussianLikelihood
from study.models.vae import VAE


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("mode", ["learned_global", "per_pixel"])
def test_shapes(resolution, mode):
    lik = GaussianLikelihood(mode)
    model = VAE(lik, image_channels=3, resolution=resolution, latent_dim=10, width=8)
    x = torch.rand(2, 3, resolution, resolution)
    out = model(x)
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (2, 10)
    assert out["dist_params"].shape == (2, lik.param_channels(3), resolution, resolution)
    assert model.sample_prior(3).shape == (3, 3, resolution, resolution)


def test_bad_resolution():
    with pytest.raises(ValueError, match="power of two"):
        VAE(GaussianLikelihood(), resolution=48)
