"""AVAE: the four losses as the official code computes them, and each network updated only by its own loss."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from study.models.avae import (
    AVAE,
    NETWORKS,
    discriminator_loss,
    generator_loss,
    kl_loss,
    latent_reconstruction_loss,
    make_optimisers,
    network_gradients,
    network_objectives,
    reconstruction_nll,
    train_step,
)

LATENT = 6


def _model(seed: int = 0, **kwargs) -> AVAE:
    torch.manual_seed(seed)
    return AVAE(image_channels=3, resolution=16, latent_dim=LATENT, width=4, **kwargs)


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _snapshot(model: AVAE) -> dict[str, list[torch.Tensor]]:
    return {name: [p.detach().clone() for p in net.parameters()] for name, net in model.networks().items()}


def _changed(before: dict[str, list[torch.Tensor]], model: AVAE) -> set[str]:
    return {
        name
        for name, net in model.networks().items()
        if any(not torch.equal(a, p) for a, p in zip(before[name], net.parameters(), strict=True))
    }


# ------------------------------------------------------------------------------------------------ losses
def test_latent_loss_matches_its_formula():
    rng = np.random.default_rng(0)
    z, mu, log_sigma = (rng.normal(size=(5, 7)) for _ in range(3))
    expected = 0.0
    for b in range(5):
        precisions = [math.exp(-2.0 * log_sigma[b, k]) for k in range(7)]
        for j in range(7):
            w = precisions[j] / sum(precisions)
            expected += 0.5 * (z[b, j] - mu[b, j]) ** 2 * w  # summed over batch and dimensions
    t = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (z, mu, log_sigma)]
    got = latent_reconstruction_loss(*t)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # The weights are a stop-gradient: no gradient reaches log sigma, but mu gets one.
    g_mu, g_log_sigma = torch.autograd.grad(got, [t[1], t[2]], allow_unused=True)
    assert g_log_sigma is None and g_mu.abs().sum() > 0


def test_latent_loss_global_sigma_broadcasts():
    z, mu = torch.randn(3, 4), torch.randn(3, 4)
    log_sigma = torch.randn(4)
    assert latent_reconstruction_loss(z, mu, log_sigma) == pytest.approx(
        latent_reconstruction_loss(z, mu, log_sigma.expand(3, 4)).item()
    )


def test_generator_and_discriminator_losses_by_hand():
    real = torch.tensor([0.0, 2.0, -1.0])
    fake = torch.tensor([1.0, -2.0, 0.5])
    assert generator_loss(real).item() == pytest.approx(-(0.0 + 2.0 - 1.0) / 3)

    def bce(target: int, logit: float) -> float:
        p = 1.0 / (1.0 + math.exp(-logit))
        return -(target * math.log(p) + (1 - target) * math.log(1.0 - p))

    expected = sum(bce(1, r) + bce(0, f) for r, f in zip(real.tolist(), fake.tolist(), strict=True)) / 3
    assert discriminator_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    # A discriminator at chance pays 2 log 2.
    assert discriminator_loss(torch.zeros(2), torch.zeros(2)).item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_kl_matches_torch_distributions_for_global_sigma():
    model = _model()
    with torch.no_grad():
        model.encoder.log_sigma.copy_(torch.linspace(-1.0, 0.5, LATENT))
    mu, log_sigma = model.encode(_images())
    assert log_sigma.shape == mu.shape == (4, LATENT)
    assert torch.equal(log_sigma[0], log_sigma[3])  # global: the same for every image
    expected = kl_divergence(Normal(mu, log_sigma.exp()), Normal(0.0, 1.0)).sum(1).mean()
    assert kl_loss(mu, log_sigma).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_loss(mu, model.encoder.log_sigma).item() == pytest.approx(expected.item(), rel=1e-5)


def test_nll_is_half_squared_error_summed_per_image():
    x = torch.zeros(2, 1, 2, 2)
    mean = torch.full((2, 1, 2, 2), 0.5)
    assert reconstruction_nll(x, mean).item() == pytest.approx(0.5 * 4 * 0.25)
    with pytest.raises(ValueError, match="shape"):
        reconstruction_nll(x, mean[:, :, :1])


# ---------------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("input_dependent_sigma", [False, True])
def test_shapes_and_ranges(input_dependent_sigma):
    model = _model(input_dependent_sigma=input_dependent_sigma).eval()
    x = _images(3)
    mu, log_sigma = model.encode(x)
    assert mu.shape == log_sigma.shape == (3, LATENT)
    if not input_dependent_sigma:
        assert torch.equal(model.encoder.log_sigma, torch.zeros(LATENT))  # official init: sigma = 1
    for out in (model.reconstruct_decoder(x), model.reconstruct_generator(x), model.sample(3)):
        assert out.shape == (3, 3, 16, 16)
        assert out.min() >= 0 and out.max() <= 1
    assert model.discriminator(x).shape == (3,)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(model.sample(2, generator=g), model.sample(2, generator=torch.Generator().manual_seed(5)))


# ----------------------------------------------------------------------------------------------- updates
@pytest.mark.parametrize("name", NETWORKS)
def test_each_step_changes_only_its_own_network(name):
    model = _model().train()
    optimisers = make_optimisers(model, 1e-3, 1e-3, 1e-3)
    before = _snapshot(model)
    train_step(model, optimisers, _images(), beta=1.0, generator=torch.Generator().manual_seed(0), networks=(name,))
    assert _changed(before, model) == {name}


def test_full_step_equals_the_single_network_steps():
    """The simultaneous step gives every network exactly the update its own loss alone gives it."""
    model = _model().train()
    full = copy.deepcopy(model)
    train_step(full, make_optimisers(full, 1e-3, 2e-3, 3e-3), _images(), 1.0, generator=torch.Generator().manual_seed(0))
    for name in NETWORKS:
        single = copy.deepcopy(model)
        opts = make_optimisers(single, 1e-3, 2e-3, 3e-3)
        train_step(single, opts, _images(), 1.0, generator=torch.Generator().manual_seed(0), networks=(name,))
        for a, b in zip(single.networks()[name].parameters(), full.networks()[name].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_latent_loss_would_reach_the_encoder_but_does_not():
    """L_Z is connected to E through E(x_tilde); the encoder's gradient is that of beta L_KL + L_NLL only."""
    model = _model().train()
    losses = model.losses(_images(), generator=torch.Generator().manual_seed(0))
    grads = network_gradients(model, network_objectives(losses, beta=0.7, latent_weight=1.0))
    params = list(model.encoder.parameters())
    own = torch.autograd.grad(0.7 * losses.kl + losses.nll, params, retain_graph=True)
    leaked = torch.autograd.grad(0.7 * losses.kl + losses.nll + losses.latent, params, retain_graph=True)
    for g, o in zip(grads["encoder"], own, strict=True):
        torch.testing.assert_close(g, o)
    assert any(not torch.allclose(g, w) for g, w in zip(grads["encoder"], leaked, strict=True))
    # Likewise the generator's objective depends on C (through L_gen), yet C's gradient is that of L_dis only.
    c_params = list(model.discriminator.parameters())
    own_c = torch.autograd.grad(losses.discriminator, c_params, retain_graph=True)
    for g, o in zip(grads["discriminator"], own_c, strict=True):
        torch.testing.assert_close(g, o)


def test_optimiser_settings():
    model = _model()
    opts = make_optimisers(model, lr=1e-3, generator_lr=2e-4, discriminator_lr=3e-4, beta1=0.5)
    assert set(opts) == set(NETWORKS)
    rates = {name: opt.param_groups[0]["lr"] for name, opt in opts.items()}
    assert rates == {"encoder": 1e-3, "decoder": 1e-3, "generator": 2e-4, "discriminator": 3e-4}
    assert all(opt.param_groups[0]["betas"] == (0.5, 0.999) for opt in opts.values())
    with pytest.raises(KeyError, match="unknown"):
        train_step(model, opts, _images(), 1.0, networks=("critic",))
