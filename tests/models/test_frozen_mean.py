"""The frozen-mean control (study.models.frozen_mean): a structured precision learned on a fixed Gaussian VAE."""

from __future__ import annotations

import pytest
import torch

from study.config import TrialConfig
from study.data.loader import DeviceSplit
from study.train import load_checkpoint, run_trial
from tests.conftest import tiny_trial_config


@pytest.fixture(scope="module")
def gaussian_checkpoint(prepared_grey_32, tmp_path_factory):
    """A per-pixel Gaussian VAE trained 2 epochs on the grey sample: the mean the control freezes."""
    config = tiny_trial_config(prepared_grey_32).model_copy(deep=True)
    config.likelihood.gaussian.sigma_mode = "per_pixel"
    workdir = tmp_path_factory.mktemp("gaussian")
    run_trial(config, workdir=workdir)
    return workdir / "checkpoint"


def _control_config(data_dir, checkpoint, **train) -> TrialConfig:
    base = tiny_trial_config(data_dir, **train).model_dump(mode="json")
    base["likelihood"]["family"] = "structured"
    base["likelihood"]["structured"] = {"neighbourhood_size": 3}
    base["model"]["frozen_mean_checkpoint"] = str(checkpoint)
    return TrialConfig.model_validate(base)


def test_control_keeps_the_gaussian_posterior_and_mean_and_learns_only_the_precision(
        prepared_grey_32, gaussian_checkpoint, tmp_path):
    _, gaussian, _ = load_checkpoint(gaussian_checkpoint)
    before = {k: v.clone() for k, v in gaussian.state_dict().items()}
    run_trial(_control_config(prepared_grey_32, gaussian_checkpoint, epochs=2), workdir=tmp_path)
    _, control, _ = load_checkpoint(tmp_path / "checkpoint")
    gaussian.eval(), control.eval()

    x = DeviceSplit(prepared_grey_32, "val", "cpu").take(torch.arange(4))  # (4, 1, 32, 32) real faces
    with torch.no_grad():
        mu_g, logvar_g = gaussian.encode(x)
        mu_c, logvar_c = control.encode(x)
        torch.testing.assert_close(mu_c, mu_g, rtol=0, atol=0)
        torch.testing.assert_close(logvar_c, logvar_g, rtol=0, atol=0)
        # The KL of every image is the Gaussian VAE's (torch.distributions as the oracle).
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(mu_c, (0.5 * logvar_c).exp()), torch.distributions.Normal(0.0, 1.0)).sum(1)
        kl_g = torch.distributions.kl_divergence(
            torch.distributions.Normal(mu_g, (0.5 * logvar_g).exp()), torch.distributions.Normal(0.0, 1.0)).sum(1)
        torch.testing.assert_close(kl, kl_g, rtol=0, atol=0)
        z = torch.randn(4, gaussian.latent_dim, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(control.likelihood.mean(control.decode(z)),
                                   gaussian.likelihood.mean(gaussian.decode(z)), rtol=0, atol=1e-7)
    # Training moved the precision head only: the Gaussian model it was copied from is untouched too.
    for key, value in gaussian.state_dict().items():
        assert torch.equal(value, before[key]), key
    fresh = _control_config(prepared_grey_32, gaussian_checkpoint)
    from study.train import build_model

    untrained = build_model(fresh, (1, 32, 32), "grey")
    untrained.load_mean_model(gaussian)
    changed = [k for k, v in control.decoder.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, untrained.decoder.state_dict()[k])]
    assert changed, "the precision decoder did not train"


def test_control_needs_the_structured_family_and_a_gaussian_checkpoint(prepared_grey_32, gaussian_checkpoint, tmp_path):
    config = tiny_trial_config(prepared_grey_32).model_dump(mode="json")
    config["model"]["frozen_mean_checkpoint"] = str(gaussian_checkpoint)
    with pytest.raises(ValueError, match="frozen_mean_checkpoint.*structured"):
        TrialConfig.model_validate(config)  # a Gaussian arm with a frozen mean makes no sense
    with pytest.raises(ValueError, match="names a sweep arm"):
        run_trial(_control_config(prepared_grey_32, "arm:gaussian"), workdir=tmp_path / "a")
    control_dir = tmp_path / "control"
    run_trial(_control_config(prepared_grey_32, gaussian_checkpoint, epochs=1), workdir=control_dir)
    with pytest.raises(ValueError, match="must be a Gaussian VAE"):
        run_trial(_control_config(prepared_grey_32, control_dir / "checkpoint"), workdir=tmp_path / "b")
