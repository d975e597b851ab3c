"""The evaluator on real CelebA images: every metric against a direct computation from the model's own outputs.

The model is a tiny untrained VAE (its numbers mean nothing; what is checked is that the evaluator computes each
metric exactly as the metric functions / NumPy do on the reconstructions and samples recomputed here, with the
documented seeds). LPIPS and FID weights are made unavailable by pointing TORCH_HOME at an empty folder, and their
wiring is checked with small injected networks instead.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study.data.celeba import load_image, preprocess
from study.data.color import rgb_to_ycbcr, ycbcr_to_rgb
from study.evaluate import SEED_OFFSETS, EvaluationResult, evaluate_checkpoint, evaluate_model
from study.likelihoods.gaussian import GaussianLikelihood
from study.likelihoods.losses import SSIMLoss
from study.metrics import likelihood as lk
from study.metrics import perceptual as pc
from study.metrics import pixel as px
from study.models.vae import VAE
from tests.conftest import SAMPLE, tiny_trial_config

K = 16  # importance samples: enough to separate the IWAE bound from the ELBO on this model, and fast


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """The first 8 aligned CelebA images, Larsen-cropped to 32 x 32: float (8, 3, 32, 32) in [0, 1]."""
    arrays = [preprocess(load_image(SAMPLE / "img_align_celeba" / f"00000{i}.jpg"), 32) for i in range(1, 9)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def tiny_vae(likelihood=None, channels: int = 3) -> VAE:
    torch.manual_seed(0)
    return VAE(likelihood or GaussianLikelihood("fixed"), image_channels=channels, resolution=32, latent_dim=8,
               width=8).eval()


@pytest.fixture(autouse=True)
def no_pretrained_weights(tmp_path, monkeypatch):
    """An empty torch hub: LPIPS and FID must report themselves unavailable, never fall back to random nets."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))


def gen(offset: str, seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed + SEED_OFFSETS[offset])


@torch.no_grad()
def test_every_metric_matches_a_direct_computation(images):
    model = tiny_vae()
    result = evaluate_model(model, images, num_importance_samples=K, batch_size=8, seed=0)
    m = result.metrics

    mu, logvar = model.encode(images)
    recon = model.likelihood.mean(model.decode(mu)).clamp(0, 1)  # E[x | z = mu(x)]
    x, r = images.double().numpy(), recon.double().numpy()
    per_mse = ((x - r) ** 2).reshape(8, -1).mean(1)  # per image, [0, 1] scale

    assert m["test_mse"] == pytest.approx(per_mse.mean(), rel=1e-5)
    assert m["test_mse_255"] == pytest.approx(np.mean(per_mse * 255**2), rel=1e-5)
    assert m["test_mse_255_std"] == pytest.approx(np.std(per_mse * 255**2), rel=1e-4)
    assert m["test_mse_pm1"] == pytest.approx(np.mean(per_mse * 4), rel=1e-5)
    assert m["test_psnr"] == pytest.approx(np.mean(10 * np.log10(1 / per_mse)), rel=1e-5)
    assert m["test_ssim"] == pytest.approx(px.ssim(recon, images).double().mean().item(), rel=1e-5)
    assert m["test_sharpness_ratio"] == pytest.approx(px.sharpness_ratio(recon, images), rel=1e-5)
    assert m["test_gradient_ratio"] == pytest.approx(px.sharpness_ratio(recon, images, "gradient_magnitude"), rel=1e-5)

    # Asperti's variance loss, straight from Asperti 2020's NumPy formula, on equal-size sets of N = 8.
    vl_recon = np.mean(np.var(x, axis=0)) - np.mean(np.var(r, axis=0))
    assert m["test_variance_loss_recon"] == pytest.approx(vl_recon, rel=1e-6)
    assert m["test_variance_loss_mse_ratio"] == pytest.approx(vl_recon / per_mse.mean(), rel=1e-5)
    samples = model.sample_prior(8, generator=gen("samples")).clamp(0, 1).double().numpy()
    assert m["test_variance_loss_samples"] == pytest.approx(
        np.mean(np.var(x, axis=0)) - np.mean(np.var(samples, axis=0)), rel=1e-6
    )

    # Likelihood metrics, with the evaluator's documented random streams.
    nll = lk.iwae_nll(model, images, K, 1024, gen("iwae")).numpy()  # the default iwae_batch_size
    assert m["test_nll"] == pytest.approx(nll.mean(), rel=1e-9)
    assert m["test_nll_std"] == pytest.approx(nll.std(), rel=1e-9)
    assert m["test_nll_bits_per_dim"] == pytest.approx(nll.mean() / (3 * 32 * 32 * math.log(2)), rel=1e-9)
    elbo = lk.elbo_terms(model, images, 1, gen("elbo")).elbo.double().numpy()
    assert m["test_elbo"] == pytest.approx(elbo.mean(), rel=1e-6)
    # IWAE bound <= -ELBO (Burda et al.): against the reported ELBO and a low-noise 64-sample ELBO.
    elbo_64 = lk.elbo_terms(model, images, 64, torch.Generator().manual_seed(99)).elbo.double().mean().item()
    assert m["test_nll"] <= -m["test_elbo"] + 1.0
    assert m["test_nll"] <= -elbo_64 + 1.0

    surgery = lk.elbo_surgery(mu, logvar, 1, gen("surgery"))
    for key in ("avg_kl", "mutual_information", "marginal_kl"):
        assert m[f"test_{key}"] == pytest.approx(surgery[key], rel=1e-9, abs=1e-12), key
    assert m["test_max_mutual_information"] == pytest.approx(math.log(8))

    # Per-image table: one row per image, in input order.
    frame = result.per_image
    assert len(frame) == 8 and frame.index.name == "image"
    np.testing.assert_allclose(frame["mse_255"], per_mse * 255**2, rtol=1e-5)
    np.testing.assert_allclose(frame["nll"], nll, rtol=1e-9)
    assert {"psnr", "ssim", "laplacian_variance_recon", "elbo", "kl"} <= set(frame.columns)


@torch.no_grad()
def test_ssim_matches_scikit_image(images):
    """Per-image SSIM against scikit-image with the settings ``study.metrics.pixel.ssim`` documents (Wang et al.
    2004: Gaussian window sigma = 1.5, population covariances, data_range = 1, mean over channels)."""
    from skimage.metrics import structural_similarity

    model = tiny_vae()
    result = evaluate_model(model, images, num_importance_samples=2, batch_size=8)
    recon = model.likelihood.mean(model.decode(model.encode(images)[0])).clamp(0, 1)
    x = images.permute(0, 2, 3, 1).double().numpy()  # (8, 32, 32, 3)
    r = recon.permute(0, 2, 3, 1).double().numpy()
    expected = np.array([
        structural_similarity(r[i], x[i], data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, channel_axis=-1)
        for i in range(len(x))
    ])
    np.testing.assert_allclose(result.per_image["ssim"], expected, rtol=0, atol=1e-4)  # float32 maps
    assert result.metrics["test_ssim"] == pytest.approx(expected.mean(), abs=1e-4)


@torch.no_grad()
def test_iwae_bound_matches_torch_distributions(images):
    """The IWAE NLL (Burda et al. 2016, Eq. 8) recomputed with torch.distributions and logsumexp in float64.

    The evaluator draws all K x B standard normals of one chunk with ``randn((K, B, d))`` from its ``iwae``
    generator (one chunk here: K * B = 128 <= iwae_batch_size); the same draws are replayed so the two
    estimates agree to round-off, not just in expectation.
    """
    from torch.distributions import Normal

    model = tiny_vae()
    result = evaluate_model(model, images, num_importance_samples=K, batch_size=8, seed=0)
    mu, logvar = (t.double() for t in model.encode(images))  # (8, d)
    q = Normal(mu, torch.exp(0.5 * logvar))
    eps = torch.randn((K, *mu.shape), generator=gen("iwae"), dtype=torch.float32).double()  # (K, 8, d)
    z = mu + q.scale * eps  # (K, 8, d), z_k ~ q(z | x)
    params = model.decode(z.float().reshape(K * 8, -1))  # (K*8, C, H, W)
    decoded = Normal(model.likelihood.mean(params).double(), model.likelihood.sigma(params).double())
    x_rep = images.double().repeat(K, 1, 1, 1)  # row k*8 + b is image b, as z.reshape orders them
    log_px = decoded.log_prob(x_rep).sum((1, 2, 3)).view(K, 8)  # log p(x | z_k)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)  # log p(z_k)
    log_qz = q.log_prob(z).sum(-1)  # log q(z_k | x)
    log_w = log_px + log_pz - log_qz  # (K, 8)
    expected = -(torch.logsumexp(log_w, dim=0) - math.log(K))  # (8,)

    nll = torch.tensor(result.per_image["nll"].to_numpy(), dtype=torch.float64)
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-3)
    assert result.metrics["test_nll"] == pytest.approx(expected.mean().item(), rel=1e-5, abs=1e-3)
    # Jensen on the same draws: the K-sample bound is never above the K-sample negative ELBO.
    assert torch.all(nll <= -log_w.mean(0) + 1e-6)


@torch.no_grad()
def test_elbo_surgery_matches_brute_force_aggregate_posterior(images):
    """avg KL = I_q(n; z) + KL(q(z) || p(z)) (Hoffman & Johnson 2016, Eq. 3-4), with q(z) the mixture of the N
    posteriors, summed term by term in float64 over every (n, m) pair; the draws replay the evaluator's
    ``surgery`` generator (one z per image, ``randn((1, N, d))`` in float64)."""
    from torch.distributions import Normal, kl_divergence

    model = tiny_vae()
    result = evaluate_model(model, images, num_importance_samples=2, batch_size=8, seed=0)
    m = result.metrics
    mu, logvar = (t.double() for t in model.encode(images))  # (N, d)
    n_images = mu.shape[0]
    std = torch.exp(0.5 * logvar)
    eps = torch.randn((1, *mu.shape), generator=gen("surgery"), dtype=torch.float64)[0]  # (N, d)
    z = mu + std * eps  # z_n ~ q(z | x_n)

    avg_kl = sum(kl_divergence(Normal(mu[n], std[n]), Normal(0.0, 1.0)).sum().item() for n in range(n_images))
    avg_kl /= n_images
    mi = 0.0
    for n in range(n_images):
        log_components = [Normal(mu[j], std[j]).log_prob(z[n]).sum().item() for j in range(n_images)]
        log_aggregate = math.log(sum(math.exp(c) for c in log_components) / n_images)  # log q(z_n)
        mi += (log_components[n] - log_aggregate) / n_images
    assert m["test_avg_kl"] == pytest.approx(avg_kl, rel=1e-9)
    assert m["test_mutual_information"] == pytest.approx(mi, rel=1e-9, abs=1e-12)
    assert m["test_marginal_kl"] == pytest.approx(avg_kl - mi, rel=1e-9, abs=1e-12)
    assert m["test_mutual_information"] <= math.log(n_images) + 1e-12


def test_perceptual_metrics_unavailable_without_weights(images):
    result = evaluate_model(tiny_vae(), images, num_importance_samples=2, batch_size=8)
    for name, weights in (("test_lpips", pc.ALEXNET_WEIGHTS_FILE), ("test_fid_recon", pc.INCEPTION_WEIGHTS_FILE),
                          ("test_fid_samples", pc.INCEPTION_WEIGHTS_FILE)):
        assert name not in result.metrics
        assert weights in result.unavailable[name]
    assert "lpips" not in result.per_image.columns
    assert "fid" not in result.implementations
    # Strict JSON round trip; unavailable metrics stay reasons, not numbers.
    text = result.to_json()
    json.loads(text)  # strict JSON: no NaN / Infinity tokens
    back = EvaluationResult.from_json(text)
    assert back.metrics == pytest.approx(result.metrics)
    assert back.unavailable == result.unavailable
    assert back.per_image.shape == result.per_image.shape
    row = result.to_row()
    assert row["elbo_valid"] is True and math.isnan(row["test_fid_recon"])


def test_not_a_density_has_no_nll_but_keeps_the_encoder_terms(images):
    result = evaluate_model(tiny_vae(SSIMLoss(weight=100.0)), images, num_importance_samples=2, batch_size=8)
    for name in ("test_nll", "test_nll_std", "test_nll_bits_per_dim", "test_elbo"):
        assert name not in result.metrics
        assert "elbo_valid = False" in result.unavailable[name]
    assert "nll" not in result.per_image.columns
    assert result.settings["elbo_valid"] is False and result.to_row()["elbo_valid"] is False
    assert {"test_avg_kl", "test_mutual_information", "test_mse_255"} <= set(result.metrics)


@torch.no_grad()
def test_deterministic_metrics_do_not_depend_on_batching_or_model_mode(images):
    model = tiny_vae()
    whole = evaluate_model(model, images, num_importance_samples=2, batch_size=8)
    model.train()  # the evaluator must use eval mode (batch-norm running statistics) and restore the mode
    batched = evaluate_model(model, images, num_importance_samples=2, batch_size=3)
    assert model.training
    for key in ("test_mse_255", "test_psnr", "test_ssim", "test_sharpness_ratio", "test_variance_loss_recon",
                "test_avg_kl", "test_mutual_information"):
        assert batched.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-5), key


@torch.no_grad()
def test_stochastic_reconstruction_passes(images):
    model = tiny_vae()
    result = evaluate_model(model, images, num_importance_samples=2, batch_size=8, num_recon_passes=3, seed=7)
    mu, logvar = model.encode(images)
    g = gen("reconstruction", seed=7)
    per_mse, vls = [], []
    for _ in range(3):
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)  # z ~ q(z | x)
        recon = model.likelihood.mean(model.decode(z)).clamp(0, 1)
        per_mse.append(px.mse(recon, images).double().numpy())
        vls.append(px.variance_loss(images, recon))
    per_image = np.mean(per_mse, axis=0)  # averaged over passes, then over images
    assert result.metrics["test_mse_255"] == pytest.approx(per_image.mean() * 255**2, rel=1e-5)
    assert result.metrics["test_mse_255_std"] == pytest.approx(per_image.std() * 255**2, rel=1e-4)
    assert result.metrics["test_variance_loss_recon"] == pytest.approx(np.mean(vls), rel=1e-6)
    assert "3 passes" in result.settings["reconstruction"]


class MeanAbsLPIPS(nn.Module):
    """Stand-in for LPIPS: mean |x - y| of the [-1, 1] inputs; records the channel counts it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # lpips_distance reads the device from the parameters
        self.channels: list[int] = []

    def forward(self, x, y):
        self.channels.append(x.shape[1])
        return (x - y).abs().mean((1, 2, 3), keepdim=True) * self.scale  # (B, 1, 1, 1)


@torch.no_grad()
def test_grey_model_with_injected_perceptual_networks(images):
    grey = px.to_grey(images)  # (8, 1, 32, 32)
    model = tiny_vae(channels=1)
    lpips_net = MeanAbsLPIPS()
    features = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())  # (B, 3, H, W) -> (B, 12)
    result = evaluate_model(model, grey, num_importance_samples=2, batch_size=8, color="grey",
                            lpips_net=lpips_net, fid_features=features, num_fid_samples=12)
    mu, _ = model.encode(grey)
    recon = model.likelihood.mean(model.decode(mu)).clamp(0, 1)
    assert set(lpips_net.channels) == {3}  # grey repeated to RGB for LPIPS
    assert result.metrics["test_lpips"] == pytest.approx(2 * (recon - grey).abs().mean().item(), rel=1e-5)
    assert result.metrics["test_mse"] == pytest.approx(px.mse(recon, grey).double().mean().item(), rel=1e-5)

    rgb = lambda t: t.expand(-1, 3, -1, -1)  # noqa: E731
    expected = pc.fid(rgb(grey), rgb(recon), features).value
    assert result.metrics["test_fid_recon"] == pytest.approx(expected, rel=1e-6)
    g = gen("samples")
    samples = torch.cat([model.sample_prior(8, generator=g), model.sample_prior(4, generator=g)]).clamp(0, 1)
    assert result.metrics["test_fid_samples"] == pytest.approx(pc.fid(rgb(grey), rgb(samples), features).value,
                                                               rel=1e-6)
    assert "Sequential" in result.implementations["fid"] and "test_fid_recon" not in result.unavailable


@torch.no_grad()
def test_ycbcr_pixel_metrics_are_in_rgb(images):
    ycc = rgb_to_ycbcr(images)
    model = tiny_vae()
    result = evaluate_model(model, ycc, num_importance_samples=2, batch_size=8, color="ycbcr")
    mu, _ = model.encode(ycc)
    recon_rgb = ycbcr_to_rgb(model.likelihood.mean(model.decode(mu))).clamp(0, 1)
    inputs_rgb = ycbcr_to_rgb(ycc).clamp(0, 1)
    assert result.metrics["test_mse_255"] == pytest.approx(px.mse_255(recon_rgb, inputs_rgb).double().mean().item(),
                                                           rel=1e-5)
    assert result.metrics["test_variance_loss_recon"] == pytest.approx(px.variance_loss(inputs_rgb, recon_rgb),
                                                                       rel=1e-6)
    assert "RGB" in result.settings["pixel_space"]
    with pytest.raises(ValueError, match="channels"):
        evaluate_model(model, ycc, color="grey")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_model(model, ycc * 255)


class BoxBlurModel:
    """A generic (non-VAE) model: reconstruct = 3x3 box blur, samples = uniform noise."""

    def reconstruct(self, x):
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)

    def sample_images(self, n, generator=None):
        return torch.rand(n, 3, 32, 32, generator=generator)


def test_generic_model_path(images):
    result = evaluate_model(BoxBlurModel(), images, batch_size=5)
    recon = BoxBlurModel().reconstruct(images)
    assert result.metrics["test_mse_255"] == pytest.approx(px.mse_255(recon, images).double().mean().item(), rel=1e-5)
    assert result.metrics["test_sharpness_ratio"] < 1  # a blur removes high frequencies
    assert "test_variance_loss_samples" in result.metrics
    for name in ("test_nll", "test_elbo", "test_avg_kl", "test_mutual_information"):
        assert name in result.unavailable and name not in result.metrics
    assert result.settings["model_protocol"] == "generic" and result.to_row()["elbo_valid"] is False
    with pytest.raises(TypeError, match="reconstruct"):
        evaluate_model(object(), images)


def test_evaluate_checkpoint_on_the_prepared_sample(prepared_32, tmp_path):
    from study.data.store import load_split
    from study.train import load_checkpoint, run_trial

    run_trial(tiny_trial_config(prepared_32, epochs=1), workdir=tmp_path)
    checkpoint = tmp_path / "checkpoint"
    result = evaluate_checkpoint(checkpoint, prepared_32, num_importance_samples=4, batch_size=4, device="cpu")

    test = torch.from_numpy(load_split(prepared_32, "test")).permute(0, 3, 1, 2).float() / 255.0  # (4, 3, 32, 32)
    _, model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        recon = model.likelihood.mean(model.decode(model.encode(test)[0])).clamp(0, 1)
    assert len(result.per_image) == 4
    assert result.metrics["test_mse_255"] == pytest.approx(px.mse_255(recon, test).double().mean().item(), rel=1e-5)
    assert math.isfinite(result.metrics["test_nll"]) and math.isfinite(result.metrics["test_avg_kl"])
    assert result.settings["epoch"] == 1 and result.settings["split"] == "test" and result.settings["color"] == "rgb"

    val = evaluate_checkpoint(checkpoint, prepared_32, split="val", num_importance_samples=2, device="cpu")
    assert "val_mse_255" in val.metrics and not any(k.startswith("test_") for k in val.metrics)


@torch.no_grad()
def test_adversarial_model_uses_its_generator_reconstructions(images):
    avae = pytest.importorskip("study.models.avae")
    torch.manual_seed(0)
    model = avae.AVAE(image_channels=3, resolution=32, latent_dim=8, width=8).eval()
    result = evaluate_model(model, images, batch_size=8, seed=3)
    # G([mu + sigma eps, xi]) and G([z, xi]) with the evaluator's seeded generators (as in the official AVAE code).
    recon = model.reconstruct_generator(images, generator=gen("reconstruction", seed=3)).clamp(0, 1)
    samples = model.sample(8, generator=gen("samples", seed=3)).clamp(0, 1)
    assert result.metrics["test_mse_255"] == pytest.approx(px.mse_255(recon, images).double().mean().item(), rel=1e-5)
    assert result.metrics["test_variance_loss_samples"] == pytest.approx(px.variance_loss(images, samples), rel=1e-6)
    assert "test_nll" in result.unavailable and "test_avg_kl" in result.unavailable
    assert "reconstruct_generator" in result.settings["reconstruction"]
