"""Example images for figures: the first few inputs of a set with the model's reconstructions and samples, as
displayable RGB arrays (``pipelines/evaluate.py`` stores them for the report's comparison grid).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from study.evaluate_protocol import _RECONSTRUCT_METHODS, _accepts_generator, _sample_function


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
