"""One evaluator for every trained model: pixel, sharpness, variance-loss, likelihood and perceptual metrics.

Every model of the study (any likelihood family, and adversarial models) is scored by :func:`evaluate_model` with
the same code, the same images and the same random draws (fixed seeds per metric), so numbers differ only
because the models differ. :func:`evaluate_checkpoint` does the same for a checkpoint written by
:func:`study.train.run_trial` on a prepared split.

What is measured (the metrics of Dorta et al. 2018, Plumerault et al. 2020 and Asperti 2020, on one evaluator):

- **Reconstructions.** With ``num_recon_passes = 1`` (default) the reconstruction is E[x | z = mu(x)], the
  decoder mean at the posterior mean: deterministic, and what ``study.train`` logs as ``val_mse_255``. With
  ``num_recon_passes = P > 1`` every pass draws z ~ q(z | x) instead (Dorta's VAE-GAN scripts average 25
  stochastic passes): per-image metrics (MSE, PSNR, SSIM, LPIPS, sharpness) are averaged over the P
  passes, the variance loss is averaged over the P reconstruction sets, and the reconstruction FID uses the first
  pass only (one Inception pass over N images per set is the expensive part).
- **Pixel metrics** on [0, 1] images (``study.metrics.pixel``): MSE on the [0, 1], [0, 255] (Dorta Table 2) and
  [-1, 1] (AVAE) scales, PSNR (dB), SSIM; each per image, then mean and std over images.
- **Sharpness**: mean Laplacian variance (and mean Sobel gradient magnitude) of the reconstructions divided by
  that of the inputs; < 1 means blurrier. The same ratios for prior samples.
- **Variance loss** (Asperti 2020): pixel variance of the N test images minus that of their N
  reconstructions, and minus that of N prior samples (equal-size sets); and its ratio to the mean MSE on [0, 1].
- **Likelihood** (Dorta Table 1), only when ``model.likelihood.elbo_valid``: the IWAE NLL bound with K =
  ``num_importance_samples`` (Burda et al. 2016; Dorta uses K = 500), in nats per image and bits per dimension
  (D = the dimensions the likelihood models, ``likelihood.num_dims``: C H W, or H W + 2 (H / f)(W / f) for
  YCbCr with chroma downsampled by f; a continuous density on [0, 1], so it can be negative), and the
  single-sample ELBO at beta = 1. Otherwise they are recorded as unavailable with the reason.
- **ELBO surgery** (Hoffman & Johnson 2016, as in Dorta Table 1): avg KL, mutual information, marginal KL, and the
  maximum MI log N, over the whole evaluated set (S = N). These depend only on the encoder q(z | x), so they are
  computed for every VAE-protocol model, also when its likelihood is not a normalised density.
- **Perceptual** (``study.metrics.perceptual``): LPIPS-Alex v0.1 between inputs and reconstructions; FID of
  reconstructions vs inputs and of prior samples vs inputs, with the study's single FID implementation (named in
  ``implementations``). Missing weights give a reason in ``unavailable``, never a number.

Pixel space. Reconstructions and samples are clamped to [0, 1] before any pixel or perceptual metric (a value
outside [0, 1] is not a displayable image; sigmoid means are unaffected). ``color="ycbcr"`` models full-resolution
(Y, Cb, Cr) images: inputs, reconstructions and samples are converted to RGB with
:func:`study.data.color.ycbcr_to_rgb` and clamped to [0, 1] before pixel and perceptual metrics, while likelihood
metrics stay in the model's YCbCr space. The inputs they are compared with are the split's RGB *before* the
conversion to YCbCr (``pixel_reference``; Dorta et al. 2018 measure MSE that way), so the chroma downsampling
error counts against YCbCr models as it would in a comparison with RGB models; its size on the split is
``<prefix>_chroma_floor_mse_255``. ``color="grey"`` keeps one channel for pixel metrics and repeats it to
three channels for LPIPS and FID.

Standard deviations are over images, population (ddof = 0, ``np.std``'s default). Random draws come from
per-metric generators (:data:`SEED_OFFSETS`); they are reproducible for a given ``seed``, ``batch_size`` and
``iwae_batch_size`` on one device type. Nothing here imports Ray, MLflow or DVC.

This module runs an evaluation; the pieces live next to it: :mod:`study.evaluate_protocol` (input checks, the two
model protocols, pixel space), :mod:`study.evaluate_metrics` (one function per metric group, in the order above),
:mod:`study.evaluate_result` (:class:`EvaluationResult` and its JSON form) and :mod:`study.evaluate_examples`
(inputs, reconstructions and samples for figures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from study.evaluate_metrics import (
    SEED_OFFSETS,
    Scores,
    fid_metrics,
    likelihood_metrics,
    lpips_network,
    reconstruction_metrics,
    sample_metrics,
    summarise,
    surgery_metrics,
)
from study.evaluate_protocol import (
    _CHANNELS,
    Color,
    _eval_mode,
    _model_device,
    _to_pixel_space,
    check_inputs,
    model_protocol,
)
from study.evaluate_result import EvaluationResult

__all__ = ["SEED_OFFSETS", "EvaluationResult", "evaluate_checkpoint", "evaluate_model"]


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    images: Tensor,
    *,
    num_importance_samples: int = 500,
    batch_size: int = 64,
    seed: int = 0,
    color: Color = "rgb",
    lpips_weights: str | Path | None = None,
    inception_weights: str | Path | None = None,
    num_fid_samples: int | None = None,
    device: torch.device | str | None = None,
    num_recon_passes: int = 1,
    iwae_batch_size: int = 1024,
    prefix: str = "test",
    lpips_net: nn.Module | None = None,
    fid_features: nn.Module | None = None,
    pixel_reference: Tensor | None = None,
) -> EvaluationResult:
    """Evaluate one trained model on a set of images (normally the whole test split).

    Two model protocols:

    - **VAE** (``hasattr(model, "likelihood")``, e.g. :class:`study.models.vae.VAE`): ``encode(x) -> (mu, logvar)``,
      ``decode(z) -> dist_params``, ``likelihood.mean(dist_params)``, ``likelihood.elbo_valid`` and
      ``sample_prior(n, generator=...)``. All metrics are attempted.
    - **generic** (no ``likelihood``, e.g. :class:`study.models.avae.AVAE`): ``reconstruct(x)`` (or else
      ``reconstruct_generator(x)``) and, for sample metrics, ``sample_images(n)`` (or else ``sample(n)``); each is
      given ``generator=`` (the metric's seeded generator) when its signature accepts it. All images float
      (B, C, H, W) in [0, 1] in model space. Likelihood and ELBO-surgery metrics are unavailable (an ``encode`` is
      not used: its second output need not be a log-variance).

    The model is put in eval mode for the call (its mode is restored) and moved to ``device`` if one is given.

    Args:
        model: the trained model (see the protocols above).
        images: float (N, C, H, W) in [0, 1], N >= 1, in the model's colour space (C = 3 for ``rgb`` and ``ycbcr``,
            1 for ``grey``); on any device (reconstructions are stored next to them).
        num_importance_samples: K of the IWAE bound (Dorta et al. 2018 use 500), >= 1.
        batch_size: images per forward pass, >= 1.
        seed: base seed; each metric draws from its own ``torch.Generator`` seeded ``seed + SEED_OFFSETS[...]``.
        color: ``rgb``, ``ycbcr`` (full-resolution Y, Cb, Cr; converted to RGB for pixel / perceptual metrics) or
            ``grey``.
        lpips_weights: torchvision ``alexnet-owt-7be5be79.pth`` or its folder (default:
            ``$TORCH_HOME/hub/checkpoints``).
        inception_weights: torchvision ``inception_v3_google-0cc3c7bd.pth`` or its folder (same default).
        num_fid_samples: prior samples for the sample FID (default N); the sample variance loss always uses N.
        device: where the model runs (default: where its parameters are).
        num_recon_passes: 1 = reconstruct from z = mu(x); P > 1 = P passes with z ~ q(z | x) (see the module
            docstring). For generic models every pass calls ``reconstruct`` again.
        iwae_batch_size: the most latent codes decoded in one call inside the IWAE bound (images x importance
            samples; :func:`study.metrics.likelihood.iwae_nll`'s ``batch_size``); it sets memory and speed, and the
            grouping of the random draws.
        prefix: metric name prefix (the split's name).
        lpips_net: an already loaded LPIPS module (overrides ``lpips_weights``); any module mapping two [-1, 1]
            batches to per-image distances, named by class in ``implementations``.
        fid_features: a feature extractor for FID instead of the study's Inception (overrides ``inception_weights``;
            its class name is recorded as the implementation, so such values are never mistaken for the standard).
        pixel_reference: for ``color = ycbcr``, the images' RGB before the conversion to YCbCr, float (N, 3, H, W)
            in [0, 1] (``<split>_rgb.npy`` of the prepared data): pixel, sharpness, variance-loss and perceptual
            metrics compare with it, as Dorta et al. 2018 measure MSE "using the RGB before the conversion to
            YCbCr", and ``<prefix>_chroma_floor_mse_255`` records the MSE on [0, 255] of the stored YCbCr itself
            (Y with 16 x 16 chroma, converted back) against it: about the least a YCbCr model can reach. Without it
            the reference is RGB rebuilt from ``images`` (the floor is then hidden), as ``settings`` says.

    Returns:
        :class:`EvaluationResult`.

    Raises:
        ValueError: bad shapes, channels that do not match ``color``, values outside [0, 1], non-positive counts,
            or a ``pixel_reference`` that is not (N, 3, H, W) or is given for a colour other than ``ycbcr``.
        TypeError: the model follows neither protocol.
    """
    check_inputs(images, color, num_importance_samples=num_importance_samples, batch_size=batch_size,
                 num_recon_passes=num_recon_passes, iwae_batch_size=iwae_batch_size, num_fid_samples=num_fid_samples)
    n_images, channels, height, width = images.shape
    is_vae, reconstruct_fn = model_protocol(model)

    if device is not None:
        device = torch.device(device)
        if isinstance(model, nn.Module):
            model.to(device)
    else:
        device = _model_device(model)
    scores = Scores(prefix=f"{prefix}_")
    elbo_valid = bool(getattr(model.likelihood, "elbo_valid", True)) if is_vae else False

    # Inputs in pixel space (RGB for ycbcr), kept whole: set metrics need them.
    images_px = images if color != "ycbcr" else _to_pixel_space(images, color)  # (N, C', H, W)
    if pixel_reference is not None:
        if color != "ycbcr":
            raise ValueError(f"pixel_reference is the RGB of YCbCr data; got it with color={color!r}")
        if tuple(pixel_reference.shape) != (n_images, 3, height, width):
            raise ValueError(f"pixel_reference has shape {tuple(pixel_reference.shape)}, expected "
                             f"{(n_images, 3, height, width)}")
        reference = pixel_reference.to(images.device, torch.float32)
        floor = (images_px - reference).square().flatten(1).mean(1) * 255.0**2  # (N,) per-image MSE on [0, 255]
        scores.metrics[f"{prefix}_chroma_floor_mse_255"] = float(floor.double().mean())
        images_px = reference  # (N, 3, H, W)
    lpips_model = lpips_network(lpips_net, lpips_weights, device, scores)
    ssim_ok = min(height, width) >= 11
    stochastic = num_recon_passes > 1
    # D of bits/dim: the dimensions the likelihood models (H W + 2 (H / f)(W / f) for YCbCr), the same function
    # the training loop's val_bits_per_dim uses.
    num_dims = model.likelihood.num_dims((channels, height, width)) if is_vae else channels * height * width

    # The groups' order is part of the result: see study.evaluate_metrics.
    with _eval_mode(model):
        recon = reconstruction_metrics(
            model, images, images_px, scores, is_vae=is_vae, reconstruct_fn=reconstruct_fn, lpips_model=lpips_model,
            color=color, device=device, batch_size=batch_size, num_recon_passes=num_recon_passes, seed=seed,
        )
        samples = sample_metrics(model, images, images_px, recon.real_variance, scores, is_vae=is_vae, color=color,
                                 device=device, batch_size=batch_size, seed=seed)
        likelihood_metrics(
            model, images, scores, is_vae=is_vae, elbo_valid=elbo_valid, num_dims=num_dims, device=device,
            batch_size=batch_size, num_importance_samples=num_importance_samples, iwae_batch_size=iwae_batch_size,
            seed=seed,
        )
        surgery_metrics(model, recon, scores, is_vae=is_vae, device=device, seed=seed)
        fid_metrics(images, images_px, recon, samples, scores, fid_features=fid_features,
                    inception_weights=inception_weights, num_fid_samples=num_fid_samples, color=color, device=device,
                    batch_size=batch_size)
    frame = summarise(scores, ssim_ok)

    implementations = scores.implementations
    implementations["variance_loss"] = "study.metrics.pixel.pixel_variance (Asperti 2020), float64, ddof = 0"
    implementations["sharpness"] = "study.metrics.pixel: Laplacian variance / Sobel magnitude of BT.601 grey"
    if is_vae and elbo_valid:
        implementations["nll"] = f"study.metrics.likelihood.iwae_nll, K = {num_importance_samples}"
    if not is_vae:
        reconstruction = f"model.{reconstruct_fn.__name__}(x), {num_recon_passes} pass(es) averaged; FID on pass 1"
    elif stochastic:
        reconstruction = f"E[x | z], mean over {num_recon_passes} passes with z ~ q(z | x); FID on the first pass"
    else:
        reconstruction = "E[x | z = mu(x)] (decoder mean at the posterior mean)"
    pixel_space = {
        "rgb": "RGB [0, 1]",
        "grey": "grey [0, 1] (repeated to 3 channels for LPIPS / FID)",
        "ycbcr": "RGB [0, 1]: reconstructions converted from YCbCr (ycbcr_to_rgb, clamped), compared with "
                 + ("the RGB before the conversion to YCbCr" if pixel_reference is not None else
                    "RGB rebuilt from the stored YCbCr (no full-resolution RGB given: the chroma floor is hidden)")
                 + "; likelihoods in YCbCr",
    }[color]
    settings: dict[str, Any] = {
        "num_images": int(n_images),
        "image_shape": [int(channels), int(height), int(width)],
        "num_dims": int(num_dims),
        "color": color,
        "pixel_space": pixel_space,
        "reconstruction": reconstruction,
        "clamped_to_unit_interval": True,
        "num_recon_passes": int(num_recon_passes),
        "num_importance_samples": int(num_importance_samples),
        "num_variance_loss_samples": int(n_images) if samples.fn is not None else 0,
        "num_fid_samples": int(num_fid_samples or n_images),
        "seed": int(seed),
        "batch_size": int(batch_size),  # with seed and iwae_batch_size, fixes every random draw
        "iwae_batch_size": int(iwae_batch_size),
        "std": "population (ddof = 0) over images",
        "model_protocol": "vae" if is_vae else "generic",
        "elbo_valid": elbo_valid,
        "likelihood": type(model.likelihood).__name__ if is_vae else None,
        "prefix": prefix,
    }
    return EvaluationResult(scores.metrics, scores.unavailable, implementations, frame, settings)


def _color_from_manifest(data_dir: str | Path, channels: int) -> str:
    """The prepared data's colour (manifest ``color`` or ``dist_params.color``), else inferred from the channel count."""
    from study.data.store import read_manifest

    try:
        manifest = read_manifest(data_dir)
    except FileNotFoundError:
        manifest = {}
    color = manifest.get("color") or (manifest.get("dist_params") or {}).get("color")
    if color in _CHANNELS and _CHANNELS[color] == channels:
        return color
    return "grey" if channels == 1 else "rgb"


def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    *,
    device: torch.device | str | None = None,
    color: Color | None = None,
    **kwargs: Any,
) -> EvaluationResult:
    """Evaluate a checkpoint written by :func:`study.train.run_trial` on a whole prepared split.

    Args:
        checkpoint_dir: the checkpoint directory (``config.yaml`` + ``state.pt``).
        data_dir: a prepared directory (``manifest.json`` + ``<split>.npy``), hash-checked on load.
        split: ``test`` (default), ``val`` or ``train``; also the metric prefix unless ``prefix`` is given.
        device: where to run (default: CUDA when available, else CPU).
        color: the images' colour space; default from the manifest (``dist_params.color``) or the channel count.
        **kwargs: passed to :func:`evaluate_model` (``num_importance_samples``, ``batch_size``, ``seed``, ...).

    Returns:
        :class:`EvaluationResult`; ``settings`` also holds the checkpoint path, its epoch, the split, the data
        directory and the trial config's digest and likelihood family.

    Raises:
        FileNotFoundError, KeyError, DataIntegrityError: missing checkpoint or prepared data, unknown split, or data
            whose sha256 no longer matches its manifest.
    """
    from study.data.loader import DeviceSplit
    from study.train import load_checkpoint, select_device

    dev = torch.device(device) if device is not None else select_device("auto")
    config, model, state = load_checkpoint(checkpoint_dir, dev)
    data = DeviceSplit(data_dir, split, dev)
    index = torch.arange(len(data), device=dev)
    images = data.take(index)  # (N, C, H, W) float in [0, 1]
    kwargs.setdefault("prefix", split)
    color = color or _color_from_manifest(data_dir, images.shape[1])
    if color == "ycbcr" and data.rgb_reference is not None:
        kwargs.setdefault("pixel_reference", data.take_pixel_reference(index))  # (N, 3, H, W) original RGB
    result = evaluate_model(model, images, device=dev, color=color, **kwargs)
    result.settings.update(
        checkpoint=str(checkpoint_dir),
        epoch=int(state.get("epoch", -1)),
        data_dir=str(data_dir),
        split=split,
        config_digest=config.digest(),
        likelihood_family=config.likelihood.family,
    )
    return result
