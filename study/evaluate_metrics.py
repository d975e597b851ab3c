"""The evaluator's metric groups, each one function that adds its metrics (or the reasons they are unavailable) to
one :class:`Scores` sheet: reconstructions (pixel, sharpness, LPIPS, the reconstruction variance loss), prior
samples, likelihood (IWAE NLL, ELBO), ELBO surgery, FID, and the per-image mean / std summaries.

Every group draws from its own seeded ``torch.Generator`` (:data:`SEED_OFFSETS`). :func:`study.evaluate.evaluate_model`
runs the groups in the order written here, which the metrics' random draws (and a generic model's use of the
global RNG) depend on; see its module docstring for what each metric means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from study.evaluate_protocol import _accepts_generator, _draw, _sample_function, _three_channels, _to_pixel_space
from study.metrics import likelihood as lk
from study.metrics import perceptual as pc
from study.metrics import pixel as px

#: Offsets added to ``seed``: every metric draws from its own ``torch.Generator`` on the evaluation device, so
#: switching one metric off (or an invalid likelihood) never changes the draws of another, and every model sees the
#: same draws. ``reconstruction``: stochastic passes; ``iwae``: IWAE z's; ``elbo``: the single-sample ELBO;
#: ``surgery``: ELBO-surgery z's; ``samples``: prior samples (the first N, then the extra FID ones).
SEED_OFFSETS: dict[str, int] = {"reconstruction": 0, "iwae": 1, "elbo": 2, "surgery": 3, "samples": 4}

# Per-image columns summarised as ``<prefix>_<name>`` (mean) and ``<prefix>_<name>_std``.
_MEAN_STD_COLUMNS = ("mse", "mse_255", "mse_pm1", "psnr", "ssim", "lpips", "nll", "elbo")

# The per-image table's column order.
_PER_IMAGE_ORDER = ("mse", "mse_255", "mse_pm1", "psnr", "ssim", "lpips", "laplacian_variance_input",
                    "laplacian_variance_recon", "gradient_magnitude_input", "gradient_magnitude_recon",
                    "nll", "nll_bits_per_dim", "elbo", "elbo_reconstruction", "kl")


@dataclass
class Scores:
    """What the metric groups have produced so far (the fields of :class:`study.evaluate_result.EvaluationResult`,
    with ``per_image`` still a dict of (N,) arrays). ``prefix`` is the metric name prefix with its ``_``."""

    prefix: str
    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    implementations: dict[str, str] = field(default_factory=dict)
    per_image: dict[str, np.ndarray] = field(default_factory=dict)


class Reconstructions(NamedTuple):
    """What later groups need from the reconstruction passes."""

    first: Tensor  # (N, C', H, W) in [0, 1], pixel space: the first pass (the reconstruction FID's set)
    mus: list[Tensor]  # per batch (B, d) float64 posterior means (VAE protocol; empty otherwise)
    logvars: list[Tensor]  # per batch (B, d) float64 posterior log-variances
    real_variance: float  # pixel variance of the inputs in pixel space


class Samples(NamedTuple):
    """The prior samples of the sample metrics, and the generator the extra FID samples continue from."""

    fn: Callable[..., Tensor] | None  # None: the model cannot sample
    images: Tensor | None  # (N, C', H, W) in [0, 1], pixel space
    generator: torch.Generator


def lpips_network(lpips_net: nn.Module | None, lpips_weights: str | Path | None, device: torch.device,
                  scores: Scores) -> nn.Module | pc.MetricUnavailable:
    """The injected LPIPS module, else the study's LPIPS from ``lpips_weights``; records the implementation."""
    if lpips_net is not None:
        scores.implementations["lpips"] = type(lpips_net).__name__
        return lpips_net
    lpips_model = pc.load_lpips(lpips_weights, device)
    if not isinstance(lpips_model, pc.MetricUnavailable):
        scores.implementations["lpips"] = pc.LPIPS_IMPLEMENTATION
    return lpips_model


def reconstruction_metrics(
    model: object, images: Tensor, images_px: Tensor, scores: Scores, *, is_vae: bool,
    reconstruct_fn: Callable[..., Tensor] | None, lpips_model: nn.Module | pc.MetricUnavailable, color: str,
    device: torch.device, batch_size: int, num_recon_passes: int, seed: int,
) -> Reconstructions:
    """Per-image pixel, sharpness and LPIPS metrics averaged over the passes; sharpness ratios and the
    reconstruction variance loss. ``images`` float (N, C, H, W) in [0, 1] model space, ``images_px`` pixel space."""
    n_images, _, height, width = images.shape
    store = images.device
    p = scores.prefix
    recon_gen = torch.Generator(device).manual_seed(seed + SEED_OFFSETS["reconstruction"])
    sums: dict[str, np.ndarray] = {}
    mus: list[Tensor] = []
    logvars: list[Tensor] = []
    real_variance = px.pixel_variance(images_px)
    variance_loss_sum = 0.0
    lap_in = np.empty(n_images)
    grad_in = np.empty(n_images)
    recon_first: Tensor | None = None
    ssim_ok = min(height, width) >= 11
    stochastic = num_recon_passes > 1
    for pass_index in range(num_recon_passes):
        recon_px = torch.empty(images_px.shape, dtype=images_px.dtype, device=store)  # (N, C', H, W)
        for start in range(0, n_images, batch_size):
            stop = min(start + batch_size, n_images)
            xb = images[start:stop].to(device)  # (B, C, H, W) model space
            if is_vae:
                mu, logvar = model.encode(xb)  # (B, d) each
                if pass_index == 0:
                    mus.append(mu.double())
                    logvars.append(logvar.double())
                z = mu
                if stochastic:
                    eps = torch.randn(mu.shape, generator=recon_gen, device=mu.device, dtype=mu.dtype)
                    z = mu + torch.exp(0.5 * logvar) * eps  # (B, d), z ~ q(z | x)
                rb = model.likelihood.mean(model.decode(z))  # (B, C, H, W)
            else:
                assert reconstruct_fn is not None
                rb = (reconstruct_fn(xb, generator=recon_gen) if _accepts_generator(reconstruct_fn)
                      else reconstruct_fn(xb))  # (B, C, H, W)
            if tuple(rb.shape) != tuple(xb.shape):
                raise ValueError(f"reconstructions have shape {tuple(rb.shape)}, inputs {tuple(xb.shape)}")
            rb_px = _to_pixel_space(rb.float(), color)  # (B, C', H, W) in [0, 1]
            xb_px = images_px[start:stop].to(device)
            recon_px[start:stop] = rb_px.to(store)
            batch = {
                "mse": px.mse(rb_px, xb_px),
                "psnr": px.psnr(rb_px, xb_px),
                "laplacian_variance_recon": px.laplacian_variance(rb_px),
                "gradient_magnitude_recon": px.gradient_magnitude(rb_px),
            }
            if ssim_ok:
                batch["ssim"] = px.ssim(rb_px, xb_px)
            if not isinstance(lpips_model, pc.MetricUnavailable):
                batch["lpips"] = pc.lpips_distance(_three_channels(rb_px), _three_channels(xb_px), lpips_model,
                                                   batch_size=batch_size)
            for name, values in batch.items():
                arr = values.detach().double().cpu().numpy()
                sums.setdefault(name, np.zeros(n_images))[start:stop] += arr
            if pass_index == 0:
                lap_in[start:stop] = px.laplacian_variance(xb_px).double().cpu().numpy()
                grad_in[start:stop] = px.gradient_magnitude(xb_px).double().cpu().numpy()
        variance_loss_sum += real_variance - px.pixel_variance(recon_px)
        if pass_index == 0:
            recon_first = recon_px
        del recon_px
    per_image = scores.per_image
    per_image.update({name: total / num_recon_passes for name, total in sums.items()})
    per_image["mse_255"] = per_image["mse"] * 255.0**2
    per_image["mse_pm1"] = per_image["mse"] * 4.0
    per_image["laplacian_variance_input"] = lap_in
    per_image["gradient_magnitude_input"] = grad_in
    if not ssim_ok:
        scores.unavailable[f"{p}ssim"] = f"SSIM needs images of at least 11 x 11 pixels, got {height} x {width}"
    if isinstance(lpips_model, pc.MetricUnavailable):
        scores.unavailable[f"{p}lpips"] = lpips_model.reason

    metrics = scores.metrics
    metrics[f"{p}sharpness_ratio"] = _ratio(per_image["laplacian_variance_recon"], lap_in)
    metrics[f"{p}gradient_ratio"] = _ratio(per_image["gradient_magnitude_recon"], grad_in)
    vl_recon = variance_loss_sum / num_recon_passes
    metrics[f"{p}variance_loss_recon"] = vl_recon
    mean_mse = float(per_image["mse"].mean())
    metrics[f"{p}variance_loss_mse_ratio"] = vl_recon / mean_mse if mean_mse > 0 else math.nan
    assert recon_first is not None
    return Reconstructions(recon_first, mus, logvars, real_variance)


def sample_metrics(
    model: object, images: Tensor, images_px: Tensor, real_variance: float, scores: Scores, *, is_vae: bool,
    color: str, device: torch.device, batch_size: int, seed: int,
) -> Samples:
    """N prior samples: their variance loss and sharpness ratios against the inputs (or why there are none)."""
    n_images = images.shape[0]
    p = scores.prefix
    sample_fn = _sample_function(model, is_vae)
    samples_px: Tensor | None = None
    sample_gen = torch.Generator(device).manual_seed(seed + SEED_OFFSETS["samples"])
    if sample_fn is None:
        reason = f"{type(model).__name__} has no sample_prior / sample_images / sample method"
        for name in ("variance_loss_samples", "sample_sharpness_ratio", "sample_gradient_ratio", "fid_samples"):
            scores.unavailable[f"{p}{name}"] = reason
    else:
        samples_px = torch.cat(
            [_draw(sample_fn, b, sample_gen, color, images.shape[1:]).to(images.device)
             for b in _chunks(n_images, batch_size)]
        )  # (N, C', H, W) in [0, 1]
        scores.metrics[f"{p}variance_loss_samples"] = real_variance - px.pixel_variance(samples_px)
        scores.metrics[f"{p}sample_sharpness_ratio"] = px.sharpness_ratio(samples_px, images_px, "laplacian_variance")
        scores.metrics[f"{p}sample_gradient_ratio"] = px.sharpness_ratio(samples_px, images_px, "gradient_magnitude")
    return Samples(sample_fn, samples_px, sample_gen)


def likelihood_metrics(
    model: object, images: Tensor, scores: Scores, *, is_vae: bool, elbo_valid: bool, num_dims: int,
    device: torch.device, batch_size: int, num_importance_samples: int, iwae_batch_size: int, seed: int,
) -> None:
    """Per-image IWAE NLL (nats and bits per dimension) and single-sample ELBO terms, only for a normalised
    density; otherwise the reason they are unavailable."""
    n_images = images.shape[0]
    p = scores.prefix
    per_image = scores.per_image
    if is_vae and elbo_valid:
        iwae_gen = torch.Generator(device).manual_seed(seed + SEED_OFFSETS["iwae"])
        elbo_gen = torch.Generator(device).manual_seed(seed + SEED_OFFSETS["elbo"])
        nll, elbo, rec, kl = [], [], [], []
        for start in range(0, n_images, batch_size):
            xb = images[start : start + batch_size].to(device)
            nll.append(lk.iwae_nll(model, xb, num_importance_samples, iwae_batch_size, iwae_gen))
            terms = lk.elbo_terms(model, xb, 1, elbo_gen)
            elbo.append(terms.elbo)
            rec.append(terms.reconstruction)
            kl.append(terms.kl)
        per_image["nll"] = torch.cat(nll).double().cpu().numpy()
        per_image["nll_bits_per_dim"] = per_image["nll"] / (num_dims * math.log(2.0))
        per_image["elbo"] = torch.cat(elbo).double().cpu().numpy()
        per_image["elbo_reconstruction"] = torch.cat(rec).double().cpu().numpy()
        per_image["kl"] = torch.cat(kl).double().cpu().numpy()
        scores.metrics[f"{p}nll_bits_per_dim"] = float(lk.to_bits_per_dim(float(per_image["nll"].mean()), num_dims))
    else:
        if is_vae:
            reason = (f"{type(model.likelihood).__name__} is not a normalised density (elbo_valid = False): "
                      "its NLL / ELBO would be a loss value, not comparable across models")
        else:
            reason = f"{type(model).__name__} has no likelihood p(x | z) (generic reconstruct / sample model)"
        for name in ("nll", "nll_std", "nll_bits_per_dim", "elbo", "elbo_std"):
            scores.unavailable[f"{p}{name}"] = reason


def surgery_metrics(model: object, recon: Reconstructions, scores: Scores, *, is_vae: bool, device: torch.device,
                    seed: int) -> None:
    """ELBO surgery over the whole set from the encoder's posteriors (every VAE-protocol model)."""
    p = scores.prefix
    if is_vae:
        surgery_gen = torch.Generator(device).manual_seed(seed + SEED_OFFSETS["surgery"])
        surgery = lk.elbo_surgery(torch.cat(recon.mus), torch.cat(recon.logvars), 1, surgery_gen)
        for key in ("avg_kl", "mutual_information", "marginal_kl", "max_mutual_information"):
            scores.metrics[f"{p}{key}"] = float(surgery[key])
    else:
        for key in ("avg_kl", "mutual_information", "marginal_kl", "max_mutual_information"):
            scores.unavailable[f"{p}{key}"] = f"{type(model).__name__} has no Gaussian encoder q(z | x)"


def fid_metrics(
    images: Tensor, images_px: Tensor, recon: Reconstructions, samples: Samples, scores: Scores, *,
    fid_features: nn.Module | None, inception_weights: str | Path | None, num_fid_samples: int | None, color: str,
    device: torch.device, batch_size: int,
) -> None:
    """FID of the first reconstruction pass and of ``num_fid_samples`` prior samples (default N) vs the inputs."""
    n_images = images.shape[0]
    p = scores.prefix
    features: nn.Module | pc.MetricUnavailable
    if fid_features is not None:
        features = fid_features
        scores.implementations["fid"] = f"study.metrics.perceptual.frechet_distance on {type(fid_features).__name__}"
    else:
        features = pc.load_inception_features(inception_weights, device)
        if not isinstance(features, pc.MetricUnavailable):
            scores.implementations["fid"] = pc.FID_IMPLEMENTATION
    sample_fn = samples.fn
    fid_names = [f"{p}fid_recon"] + ([f"{p}fid_samples"] if sample_fn is not None else [])
    if isinstance(features, pc.MetricUnavailable):
        scores.unavailable.update({name: features.reason for name in fid_names})
    elif n_images < 2:
        scores.unavailable.update({name: "FID needs at least 2 images per set" for name in fid_names})
    else:
        mu_real, sigma_real, _ = pc.feature_statistics(_three_channels(images_px), features, batch_size)
        mu_rec, sigma_rec, _ = pc.feature_statistics(_three_channels(recon.first), features, batch_size)
        scores.metrics[f"{p}fid_recon"] = pc.frechet_distance(mu_real, sigma_real, mu_rec, sigma_rec)
        if sample_fn is not None and samples.images is not None:
            total = num_fid_samples or n_images
            batches = _fid_sample_batches(samples.images, total, sample_fn, samples.generator, color,
                                          images.shape[1:], batch_size)
            mu_s, sigma_s, _ = pc.feature_statistics(batches, features, batch_size)
            scores.metrics[f"{p}fid_samples"] = pc.frechet_distance(mu_real, sigma_real, mu_s, sigma_s)


def summarise(scores: Scores, ssim_ok: bool) -> pd.DataFrame:
    """Mean and population std of the per-image columns as metrics; the per-image table (index ``image``)."""
    p = scores.prefix
    per_image = scores.per_image
    if not ssim_ok:
        per_image.pop("ssim", None)
    for name in _MEAN_STD_COLUMNS:
        if name in per_image:
            scores.metrics[f"{p}{name}"], scores.metrics[f"{p}{name}_std"] = _mean_std(per_image[name])
    if f"{p}lpips" in scores.unavailable:
        scores.unavailable[f"{p}lpips_std"] = scores.unavailable[f"{p}lpips"]
    if f"{p}ssim" in scores.unavailable:
        scores.unavailable[f"{p}ssim_std"] = scores.unavailable[f"{p}ssim"]

    frame = pd.DataFrame({name: per_image[name] for name in _PER_IMAGE_ORDER if name in per_image})
    frame.index.name = "image"
    return frame


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std())  # population std (ddof = 0), as np.std


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    denominator = float(np.mean(den))
    return float(np.mean(num)) / denominator if denominator != 0 else math.nan


def _chunks(total: int, size: int) -> Iterator[int]:
    for start in range(0, total, size):
        yield min(size, total - start)


def _fid_sample_batches(kept: Tensor, total: int, fn: Callable[..., Tensor], generator: torch.Generator,
                        color: str, image_shape: tuple[int, ...], batch_size: int) -> Iterator[Tensor]:
    """The first ``total`` samples: the N already drawn, then fresh draws, batch by batch (never all in memory)."""
    used = min(total, kept.shape[0])
    for start in range(0, used, batch_size):
        yield _three_channels(kept[start : min(start + batch_size, used)])
    for b in _chunks(total - used, batch_size):
        yield _three_channels(_draw(fn, b, generator, color, image_shape))
