"""One evaluator for every trained model: pixel, sharpness, variance-loss, likelihood and perceptual metrics.

Every model of the study (any likelihood family, and adversarial models) is scored by :func:`evaluate_model` with
the same code, the same images and the same random draws (fixed seeds per metric), so numbers differ only
because the models differ. :func:`evaluate_checkpoint` does the same for a checkpoint written by
:func:`study.train.run_trial` on a prepared split.

What is measured (SPEC, "Facts from the papers' own text", and SPEC 5.1):

- **Reconstructions.** With ``num_recon_passes = 1`` (default) the reconstruction is E[x | z = mu(x)], the
  decoder mean at the posterior mean: deterministic, and what ``study.train`` logs as ``val_mse_255``. With
  ``num_recon_passes = P > 1`` every pass draws z ~ q(z | x) instead (Dorta's VAE-GAN scripts average 25
  stochastic passes, SPEC 3.2): per-image metrics (MSE, PSNR, SSIM, LPIPS, sharpness) are averaged over the P
  passes, the variance loss is averaged over the P reconstruction sets, and the reconstruction FID uses the first
  pass only (one Inception pass over N images per set is the expensive part).
- **Pixel metrics** on [0, 1] images (``study.metrics.pixel``): MSE on the [0, 1], [0, 255] (Dorta Table 2) and
  [-1, 1] (AVAE) scales, PSNR (dB), SSIM; each per image, then mean and std over images.
- **Sharpness**: mean Laplacian variance (and mean Sobel gradient magnitude) of the reconstructions divided by
  that of the inputs; < 1 means blurrier. The same ratios for prior samples.
- **Variance loss** (Asperti 2020, SPEC 4.1): pixel variance of the N test images minus that of their N
  reconstructions, and minus that of N prior samples (equal-size sets); and its ratio to the mean MSE on [0, 1].
- **Likelihood** (Dorta Table 1), only when ``model.likelihood.elbo_valid``: the IWAE NLL bound with K =
  ``num_importance_samples`` (Burda et al. 2016; Dorta uses K = 500), in nats per image and bits per dimension
  (dims = C * H * W of the modelled images; a continuous density on [0, 1], so it can be negative), and the
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
metrics stay in the model's YCbCr space. ``color="grey"`` keeps one channel for pixel metrics and repeats it to
three channels for LPIPS and FID.

Standard deviations are over images, population (ddof = 0, ``np.std``'s default). Random draws come from
per-metric generators (:data:`SEED_OFFSETS`); they are reproducible for a given ``seed``, ``batch_size`` and
``iwae_batch_size`` on one device type. Nothing here imports Ray, MLflow or DVC.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from study.data.color import ycbcr_to_rgb
from study.metrics import likelihood as lk
from study.metrics import perceptual as pc
from study.metrics import pixel as px

Color = Literal["rgb", "ycbcr", "grey"]
_CHANNELS: dict[str, int] = {"rgb": 3, "ycbcr": 3, "grey": 1}

#: Offsets added to ``seed``: every metric draws from its own ``torch.Generator`` on the evaluation device, so
#: switching one metric off (or an invalid likelihood) never changes the draws of another, and every model sees the
#: same draws. ``reconstruction``: stochastic passes; ``iwae``: IWAE z's; ``elbo``: the single-sample ELBO;
#: ``surgery``: ELBO-surgery z's; ``samples``: prior samples (the first N, then the extra FID ones).
SEED_OFFSETS: dict[str, int] = {"reconstruction": 0, "iwae": 1, "elbo": 2, "surgery": 3, "samples": 4}

# Generic protocol: the first of these methods a model has makes its reconstructions (``reconstruct_generator`` is
# the AVAE's G([mu + sigma eps, xi]), the image AVAE's metrics use, SPEC 2.2).
_RECONSTRUCT_METHODS = ("reconstruct", "reconstruct_generator")
_SAMPLE_METHODS = ("sample_images", "sample")

# Per-image columns summarised as ``<prefix>_<name>`` (mean) and ``<prefix>_<name>_std``.
_MEAN_STD_COLUMNS = ("mse", "mse_255", "mse_pm1", "psnr", "ssim", "lpips", "nll", "elbo")


@dataclass
class EvaluationResult:
    """Everything one evaluation produced.

    Attributes:
        metrics: flat name -> float, e.g. ``test_mse_255``, ``test_mse_255_std``, ``test_psnr``, ``test_ssim``,
            ``test_sharpness_ratio``, ``test_gradient_ratio``, ``test_variance_loss_recon``,
            ``test_variance_loss_samples``, ``test_variance_loss_mse_ratio``, ``test_nll``, ``test_nll_std``,
            ``test_nll_bits_per_dim``, ``test_elbo``, ``test_avg_kl``, ``test_mutual_information``,
            ``test_marginal_kl``, ``test_max_mutual_information``, ``test_lpips``, ``test_fid_recon``,
            ``test_fid_samples`` (the prefix is the evaluated split). Units: MSE in squared pixel units of its
            scale, PSNR in dB, NLL / ELBO / KL / MI in nats per image, FID in squared feature units. A metric is
            never both here and in ``unavailable``.
        unavailable: metric name -> why it was not computed (missing weights, not a normalised density, ...).
        implementations: what produced the metrics that have several implementations (``fid``, ``lpips``, ...).
        per_image: one row per evaluated image (index ``image``, in input order) with columns such as ``mse``,
            ``mse_255``, ``mse_pm1``, ``psnr``, ``ssim``, ``laplacian_variance_input``,
            ``laplacian_variance_recon``, ``gradient_magnitude_input``, ``gradient_magnitude_recon``, ``lpips``,
            ``nll``, ``nll_bits_per_dim``, ``elbo``, ``elbo_reconstruction``, ``kl``; a column exists only when its
            metric was computed.
        settings: how the evaluation ran (number of images, K, passes, seed, colour handling, model path, ...).
    """

    metrics: dict[str, float]
    unavailable: dict[str, str]
    implementations: dict[str, str]
    per_image: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, per_image: bool = True) -> dict[str, Any]:
        """A JSON-ready dict; non-finite floats (an infinite PSNR, a NaN ratio) become ``None``."""
        out: dict[str, Any] = {
            "metrics": {k: _finite_or_none(v) for k, v in self.metrics.items()},
            "unavailable": dict(self.unavailable),
            "implementations": dict(self.implementations),
            "settings": _jsonable(self.settings),
        }
        if per_image:
            out["per_image"] = {
                col: [_finite_or_none(v) for v in self.per_image[col].tolist()] for col in self.per_image.columns
            }
        return out

    def to_json(self, per_image: bool = True, indent: int | None = 2) -> str:
        """Strict JSON (no NaN / Infinity tokens: non-finite values are ``null``) of :meth:`to_dict`."""
        return json.dumps(self.to_dict(per_image), indent=indent, allow_nan=False, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> EvaluationResult:
        """Inverse of :meth:`to_json` (``null`` values come back as NaN)."""
        raw = json.loads(text)
        per_image = pd.DataFrame(
            {k: [math.nan if v is None else v for v in vals] for k, vals in raw.get("per_image", {}).items()}
        )
        per_image.index.name = "image"
        return cls(
            metrics={k: math.nan if v is None else float(v) for k, v in raw["metrics"].items()},
            unavailable=dict(raw["unavailable"]),
            implementations=dict(raw["implementations"]),
            per_image=per_image,
            settings=dict(raw.get("settings", {})),
        )

    def to_row(self) -> dict[str, Any]:
        """One row for :mod:`study.report_tables`: every metric (NaN where unavailable) plus ``elbo_valid``."""
        row: dict[str, Any] = dict(self.metrics)
        row.update({name: math.nan for name in self.unavailable})
        row["elbo_valid"] = bool(self.settings.get("elbo_valid", False))
        return row


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return _finite_or_none(value)


@contextlib.contextmanager
def _eval_mode(model: object) -> Iterator[None]:
    """nn.Module eval mode (batch-norm running statistics, no dropout) for the duration; restored afterwards."""
    if isinstance(model, nn.Module):
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
    else:
        yield


def _model_device(model: object) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _accepts_generator(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _to_pixel_space(x: Tensor, color: str) -> Tensor:
    """Model-space images (B, C, H, W) -> the space pixel metrics use: RGB for ``ycbcr``, else unchanged; [0, 1]."""
    if color == "ycbcr":
        x = ycbcr_to_rgb(x)  # (B, 3, H, W) RGB, possibly out of gamut
    return x.clamp(0.0, 1.0)


def _three_channels(x: Tensor) -> Tensor:
    """Grey (B, 1, H, W) -> (B, 3, H, W) for LPIPS and FID networks trained on RGB; RGB passes through."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std())  # population std (ddof = 0), as np.std


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
) -> EvaluationResult:
    """Evaluate one trained model on a set of images (normally the whole test split).

    Two model protocols:

    - **VAE** (``hasattr(model, "likelihood")``, e.g. :class:`study.models.vae.VAE`): ``encode(x) -> (mu, logvar)``,
      ``decode(z) -> params``, ``likelihood.mean(params)``, ``likelihood.elbo_valid`` and
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

    Returns:
        :class:`EvaluationResult`.

    Raises:
        ValueError: bad shapes, channels that do not match ``color``, values outside [0, 1], or non-positive counts.
        TypeError: the model follows neither protocol.
    """
    # ------------------------------------------------------------------ checks
    if color not in _CHANNELS:
        raise ValueError(f"unknown color {color!r}; choose one of {sorted(_CHANNELS)}")
    if not isinstance(images, Tensor) or images.ndim != 4 or not torch.is_floating_point(images):
        raise ValueError("images must be a float tensor (N, C, H, W)")
    n_images, channels, height, width = images.shape
    if n_images < 1:
        raise ValueError("need at least one image")
    if channels != _CHANNELS[color]:
        raise ValueError(f"color {color!r} needs {_CHANNELS[color]} channels, images have {channels}")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    for name, value in (("num_importance_samples", num_importance_samples), ("batch_size", batch_size),
                        ("num_recon_passes", num_recon_passes), ("iwae_batch_size", iwae_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_fid_samples is not None and num_fid_samples < 2:
        raise ValueError(f"num_fid_samples must be >= 2, got {num_fid_samples}")

    is_vae = hasattr(model, "likelihood")
    if is_vae:
        for attr in ("encode", "decode", "sample_prior"):
            if not callable(getattr(model, attr, None)):
                raise TypeError(f"a model with a likelihood must have {attr}(); {type(model).__name__} does not")
        reconstruct_fn = None
    else:
        reconstruct_fn = next(
            (getattr(model, n) for n in _RECONSTRUCT_METHODS if callable(getattr(model, n, None))), None
        )
        if reconstruct_fn is None:
            raise TypeError(
                f"{type(model).__name__} has neither a likelihood (VAE protocol) nor reconstruct(x) / "
                "reconstruct_generator(x) (generic protocol)"
            )

    if device is not None:
        device = torch.device(device)
        if isinstance(model, nn.Module):
            model.to(device)
    else:
        device = _model_device(model)
    store = images.device
    p = f"{prefix}_"

    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    implementations: dict[str, str] = {}
    per_image: dict[str, np.ndarray] = {}
    elbo_valid = bool(getattr(model.likelihood, "elbo_valid", True)) if is_vae else False

    # Inputs in pixel space (RGB for ycbcr), kept whole: set metrics need them.
    images_px = images if color != "ycbcr" else _to_pixel_space(images, color)  # (N, C', H, W)

    lpips_model: nn.Module | pc.MetricUnavailable
    if lpips_net is not None:
        lpips_model = lpips_net
        implementations["lpips"] = type(lpips_net).__name__
    else:
        lpips_model = pc.load_lpips(lpips_weights, device)
        if not isinstance(lpips_model, pc.MetricUnavailable):
            implementations["lpips"] = pc.LPIPS_IMPLEMENTATION

    with _eval_mode(model):
        # -------------------------------------------------------------- reconstructions
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
        per_image.update({name: total / num_recon_passes for name, total in sums.items()})
        per_image["mse_255"] = per_image["mse"] * 255.0**2
        per_image["mse_pm1"] = per_image["mse"] * 4.0
        per_image["laplacian_variance_input"] = lap_in
        per_image["gradient_magnitude_input"] = grad_in
        if not ssim_ok:
            unavailable[f"{p}ssim"] = f"SSIM needs images of at least 11 x 11 pixels, got {height} x {width}"
        if isinstance(lpips_model, pc.MetricUnavailable):
            unavailable[f"{p}lpips"] = lpips_model.reason

        metrics[f"{p}sharpness_ratio"] = _ratio(per_image["laplacian_variance_recon"], lap_in)
        metrics[f"{p}gradient_ratio"] = _ratio(per_image["gradient_magnitude_recon"], grad_in)
        vl_recon = variance_loss_sum / num_recon_passes
        metrics[f"{p}variance_loss_recon"] = vl_recon
        mean_mse = float(per_image["mse"].mean())
        metrics[f"{p}variance_loss_mse_ratio"] = vl_recon / mean_mse if mean_mse > 0 else math.nan

        # -------------------------------------------------------------- prior samples
        sample_fn = _sample_function(model, is_vae)
        samples_px: Tensor | None = None
        sample_gen = torch.Generator(device).manual_seed(seed + SEED_OFFSETS["samples"])
        if sample_fn is None:
            reason = f"{type(model).__name__} has no sample_prior / sample_images / sample method"
            for name in ("variance_loss_samples", "sample_sharpness_ratio", "sample_gradient_ratio", "fid_samples"):
                unavailable[f"{p}{name}"] = reason
        else:
            samples_px = torch.cat(
                [_draw(sample_fn, b, sample_gen, color, images.shape[1:]).to(store)
                 for b in _chunks(n_images, batch_size)]
            )  # (N, C', H, W) in [0, 1]
            metrics[f"{p}variance_loss_samples"] = real_variance - px.pixel_variance(samples_px)
            metrics[f"{p}sample_sharpness_ratio"] = px.sharpness_ratio(samples_px, images_px, "laplacian_variance")
            metrics[f"{p}sample_gradient_ratio"] = px.sharpness_ratio(samples_px, images_px, "gradient_magnitude")

        # -------------------------------------------------------------- likelihood: IWAE NLL, ELBO
        num_dims = channels * height * width
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
            metrics[f"{p}nll_bits_per_dim"] = float(lk.to_bits_per_dim(float(per_image["nll"].mean()), num_dims))
        else:
            if is_vae:
                reason = (f"{type(model.likelihood).__name__} is not a normalised density (elbo_valid = False): "
                          "its NLL / ELBO would be a loss value, not comparable across models")
            else:
                reason = f"{type(model).__name__} has no likelihood p(x | z) (generic reconstruct / sample model)"
            for name in ("nll", "nll_std", "nll_bits_per_dim", "elbo", "elbo_std"):
                unavailable[f"{p}{name}"] = reason

        # -------------------------------------------------------------- ELBO surgery (encoder only)
        if is_vae:
            surgery_gen = torch.Generator(device).manual_seed(seed + SEED_OFFSETS["surgery"])
            surgery = lk.elbo_surgery(torch.cat(mus), torch.cat(logvars), 1, surgery_gen)
            for key in ("avg_kl", "mutual_information", "marginal_kl", "max_mutual_information"):
                metrics[f"{p}{key}"] = float(surgery[key])
        else:
            for key in ("avg_kl", "mutual_information", "marginal_kl", "max_mutual_information"):
                unavailable[f"{p}{key}"] = f"{type(model).__name__} has no Gaussian encoder q(z | x)"

        # -------------------------------------------------------------- FID
        features: nn.Module | pc.MetricUnavailable
        if fid_features is not None:
            features = fid_features
            implementations["fid"] = f"study.metrics.perceptual.frechet_distance on {type(fid_features).__name__}"
        else:
            features = pc.load_inception_features(inception_weights, device)
            if not isinstance(features, pc.MetricUnavailable):
                implementations["fid"] = pc.FID_IMPLEMENTATION
        fid_names = [f"{p}fid_recon"] + ([f"{p}fid_samples"] if sample_fn is not None else [])
        if isinstance(features, pc.MetricUnavailable):
            unavailable.update({name: features.reason for name in fid_names})
        elif n_images < 2:
            unavailable.update({name: "FID needs at least 2 images per set" for name in fid_names})
        else:
            assert recon_first is not None
            mu_real, sigma_real, _ = pc.feature_statistics(_three_channels(images_px), features, batch_size)
            mu_rec, sigma_rec, _ = pc.feature_statistics(_three_channels(recon_first), features, batch_size)
            metrics[f"{p}fid_recon"] = pc.frechet_distance(mu_real, sigma_real, mu_rec, sigma_rec)
            if sample_fn is not None and samples_px is not None:
                total = num_fid_samples or n_images
                batches = _fid_sample_batches(samples_px, total, sample_fn, sample_gen, color, images.shape[1:],
                                              batch_size)
                mu_s, sigma_s, _ = pc.feature_statistics(batches, features, batch_size)
                metrics[f"{p}fid_samples"] = pc.frechet_distance(mu_real, sigma_real, mu_s, sigma_s)

    # ------------------------------------------------------------------ summaries
    if not ssim_ok:
        per_image.pop("ssim", None)
    for name in _MEAN_STD_COLUMNS:
        if name in per_image:
            metrics[f"{p}{name}"], metrics[f"{p}{name}_std"] = _mean_std(per_image[name])
    if f"{p}lpips" in unavailable:
        unavailable[f"{p}lpips_std"] = unavailable[f"{p}lpips"]
    if f"{p}ssim" in unavailable:
        unavailable[f"{p}ssim_std"] = unavailable[f"{p}ssim"]

    order = ["mse", "mse_255", "mse_pm1", "psnr", "ssim", "lpips", "laplacian_variance_input",
             "laplacian_variance_recon", "gradient_magnitude_input", "gradient_magnitude_recon",
             "nll", "nll_bits_per_dim", "elbo", "elbo_reconstruction", "kl"]
    frame = pd.DataFrame({name: per_image[name] for name in order if name in per_image})
    frame.index.name = "image"

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
        "ycbcr": "RGB [0, 1] converted from YCbCr (ycbcr_to_rgb, clamped); likelihoods in YCbCr",
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
        "num_variance_loss_samples": int(n_images) if sample_fn is not None else 0,
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
    return EvaluationResult(metrics, unavailable, implementations, frame, settings)


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    denominator = float(np.mean(den))
    return float(np.mean(num)) / denominator if denominator != 0 else math.nan


def _chunks(total: int, size: int) -> Iterator[int]:
    for start in range(0, total, size):
        yield min(size, total - start)


def _sample_function(model: object, is_vae: bool) -> Callable[..., Tensor] | None:
    names = ("sample_prior",) if is_vae else _SAMPLE_METHODS
    for name in names:
        fn = getattr(model, name, None)
        if callable(fn):
            return fn
    return None


def _draw(fn: Callable[..., Tensor], n: int, generator: torch.Generator, color: str,
          image_shape: tuple[int, ...]) -> Tensor:
    """n samples in pixel space, float (n, C', H, W) in [0, 1]."""
    out = fn(n, generator=generator) if _accepts_generator(fn) else fn(n)  # (n, C, H, W) model space
    if tuple(out.shape) != (n, *image_shape):
        raise ValueError(f"samples have shape {tuple(out.shape)}, expected {(n, *tuple(image_shape))}")
    return _to_pixel_space(out.float(), color)


def _fid_sample_batches(kept: Tensor, total: int, fn: Callable[..., Tensor], generator: torch.Generator,
                        color: str, image_shape: tuple[int, ...], batch_size: int) -> Iterator[Tensor]:
    """The first ``total`` samples: the N already drawn, then fresh draws, batch by batch (never all in memory)."""
    used = min(total, kept.shape[0])
    for start in range(0, used, batch_size):
        yield _three_channels(kept[start : min(start + batch_size, used)])
    for b in _chunks(total - used, batch_size):
        yield _three_channels(_draw(fn, b, generator, color, image_shape))


def _color_from_manifest(data_dir: str | Path, channels: int) -> str:
    """The prepared data's colour (manifest ``color`` or ``params.color``), else inferred from the channel count."""
    from study.data.store import read_manifest

    try:
        manifest = read_manifest(data_dir)
    except FileNotFoundError:
        manifest = {}
    color = manifest.get("color") or (manifest.get("params") or {}).get("color")
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
        color: the images' colour space; default from the manifest (``params.color``) or the channel count.
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
    images = data.take(torch.arange(len(data), device=dev))  # (N, C, H, W) float in [0, 1]
    kwargs.setdefault("prefix", split)
    result = evaluate_model(
        model, images, device=dev, color=color or _color_from_manifest(data_dir, images.shape[1]), **kwargs
    )
    result.settings.update(
        checkpoint=str(checkpoint_dir),
        epoch=int(state.get("epoch", -1)),
        data_dir=str(data_dir),
        split=split,
        config_digest=config.digest(),
        likelihood_family=config.likelihood.family,
    )
    return result


__all__ = ["SEED_OFFSETS", "EvaluationResult", "evaluate_checkpoint", "evaluate_model"]


@torch.no_grad()
def example_images(model: object, images: Tensor, num: int = 8, seed: int = 0, color: str = "rgb") -> dict[str, np.ndarray]:
    """Inputs, reconstructions and samples for figures: the first ``num`` images of ``images``.

    Args:
        model: a VAE (reconstruction E[x | z = mu(x)], samples E[x | z], z ~ N(0, I)) or a model of the generic
            protocol (``reconstruct`` / ``reconstruct_generator``, ``sample_images`` / ``sample``).
        images: float (N, C, H, W) in [0, 1] in colour space ``color``.

    Returns:
        ``input``, ``reconstruction``, ``sample``: float (num, H, W, 3) RGB in [0, 1] (numpy, channels last).
    """
    from study.data.color import to_display_rgb

    x = images[:num]
    generator = torch.Generator(x.device).manual_seed(seed)
    if hasattr(model, "likelihood"):
        recon = model.likelihood.mean(model.decode(model.encode(x)[0]))
        samples = model.sample_prior(x.shape[0], generator=generator)
    else:
        fn = next(getattr(model, n) for n in _RECONSTRUCT_METHODS if callable(getattr(model, n, None)))
        recon = fn(x, generator=generator) if _accepts_generator(fn) else fn(x)
        sample_fn = _sample_function(model, False)
        samples = sample_fn(x.shape[0], generator=generator) if _accepts_generator(sample_fn) else sample_fn(x.shape[0])

    def rgb(t: Tensor) -> np.ndarray:
        return to_display_rgb(t.float().clamp(0, 1), color).permute(0, 2, 3, 1).cpu().numpy()

    return {"input": rgb(x), "reconstruction": rgb(recon), "sample": rgb(samples)}
