"""What the evaluator accepts and how it talks to a model: the input checks, the two model protocols (VAE and
generic reconstruct / sample), calls that pass a seeded generator where the model takes one, eval mode, and the
pixel space metrics see (RGB for ``ycbcr``, clamped to [0, 1]; grey repeated to three channels for LPIPS / FID).

Used by :func:`study.evaluate.evaluate_model`, its metric groups (:mod:`study.evaluate_metrics`) and
:func:`study.evaluate_examples.example_images`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from study.data.color import ycbcr_to_rgb

Color = Literal["rgb", "ycbcr", "grey"]
_CHANNELS: dict[str, int] = {"rgb": 3, "ycbcr": 3, "grey": 1}

# Generic protocol: the first of these methods a model has makes its reconstructions (``reconstruct_generator`` is
# the AVAE's G([mu + sigma eps, xi]), the image the official AVAE code's metrics use).
_RECONSTRUCT_METHODS = ("reconstruct", "reconstruct_generator")
_SAMPLE_METHODS = ("sample_images", "sample")


def check_inputs(
    images: Tensor,
    color: str,
    *,
    num_importance_samples: int,
    batch_size: int,
    num_recon_passes: int,
    iwae_batch_size: int,
    num_fid_samples: int | None,
) -> None:
    """Raise ValueError for an unknown colour, images that are not float (N, C, H, W) in [0, 1] with the colour's
    channel count and N >= 1, or a non-positive count (see :func:`study.evaluate.evaluate_model`)."""
    if color not in _CHANNELS:
        raise ValueError(f"unknown color {color!r}; choose one of {sorted(_CHANNELS)}")
    if not isinstance(images, Tensor) or images.ndim != 4 or not torch.is_floating_point(images):
        raise ValueError("images must be a float tensor (N, C, H, W)")
    n_images, channels, _, _ = images.shape
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


def model_protocol(model: object) -> tuple[bool, Callable[..., Tensor] | None]:
    """(is_vae, reconstruct_fn): a model with a ``likelihood`` follows the VAE protocol (reconstruct_fn None),
    else the generic one (its first ``reconstruct`` / ``reconstruct_generator`` method).

    Raises:
        TypeError: the model follows neither protocol.
    """
    is_vae = hasattr(model, "likelihood")
    if is_vae:
        for attr in ("encode", "decode", "sample_prior"):
            if not callable(getattr(model, attr, None)):
                raise TypeError(f"a model with a likelihood must have {attr}(); {type(model).__name__} does not")
        return True, None
    reconstruct_fn = next(
        (getattr(model, n) for n in _RECONSTRUCT_METHODS if callable(getattr(model, n, None))), None
    )
    if reconstruct_fn is None:
        raise TypeError(
            f"{type(model).__name__} has neither a likelihood (VAE protocol) nor reconstruct(x) / "
            "reconstruct_generator(x) (generic protocol)"
        )
    return False, reconstruct_fn


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
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _to_pixel_space(x: Tensor, color: str) -> Tensor:
    """Model-space images (B, C, H, W) -> the space pixel metrics use: RGB for ``ycbcr``, else unchanged; [0, 1]."""
    if color == "ycbcr":
        x = ycbcr_to_rgb(x)  # (B, 3, H, W) RGB, possibly out of gamut
    return x.clamp(0.0, 1.0)


def _three_channels(x: Tensor) -> Tensor:
    """Grey (B, 1, H, W) -> (B, 3, H, W) for LPIPS and FID networks trained on RGB; RGB passes through."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


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
