"""Pixel-space metrics: MSE in three scales, PSNR, SSIM, sharpness, and Asperti's variance loss.

All functions take images as float tensors (B, C, H, W) in [0, 1] (the study's image convention) and return
one value per image unless the docstring says the metric is a property of a *set* of images.

Scales. Papers report MSE on different pixel scales, and the factor between them is fixed:
[0, 1] -> [0, 255] multiplies MSE by 255^2 (Dorta et al. 2018, Table 2) and [0, 1] -> [-1, 1] multiplies it
by 2^2 = 4 (the AVAE code; Larsen's VAE-GAN scripts in Dorta's fork report all three).

Sharpness. Two no-reference measures of high-frequency content on the grey image: the variance of the
Laplacian (Pech-Pacheco et al. 2000, "Diatom autofocusing in brightfield microscopy") and the mean Sobel
gradient magnitude (Tenengrad-style). Both are reported as a ratio reconstructions / inputs, so the units and
the pixel scale cancel; a blurry decoder gives a ratio below 1.

Variance loss (Asperti 2020, "Variance Loss in Variational Autoencoders"): the mean over pixels of
the per-pixel variance across a set of real images, minus the same for reconstructions or samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: ITU-R BT.601 luma weights (R, G, B), the usual RGB -> grey conversion (PIL ``convert('L')``, OpenCV).
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

#: The 4-neighbour 3x3 Laplacian, identical to ``scipy.ndimage.laplace`` and OpenCV ``Laplacian(ksize=1)``.
LAPLACIAN_KERNEL: tuple[tuple[float, ...], ...] = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))

#: Unnormalised 3x3 Sobel kernel for d/dx (columns), identical to ``scipy.ndimage.sobel(axis=-1)``;
#: its transpose is d/dy.
SOBEL_X_KERNEL: tuple[tuple[float, ...], ...] = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------------
# MSE, PSNR, SSIM
# ---------------------------------------------------------------------------------------------------------


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Per-image mean squared error on the [0, 1] scale.

    Args:
        x, y: images, float (B, C, H, W) in [0, 1].

    Returns:
        float (B,), >= 0, mean over channels and pixels of (x - y)^2, in [0, 1]^2 units.

    Raises:
        ValueError: shapes differ or are not 4-d.
    """
    _check_pair(x, y)
    return (x - y).square().flatten(1).mean(1)  # (B,)


def mse_255(x: Tensor, y: Tensor) -> Tensor:
    """Per-image MSE on the [0, 255] scale (Dorta et al. 2018, Table 2): ``mse(x, y) * 255**2``.

    Args / raises as :func:`mse`; inputs are still in [0, 1]. Returns float (B,) in [0, 255]^2 units.
    """
    return mse(x, y) * 255.0**2


def mse_pm1(x: Tensor, y: Tensor) -> Tensor:
    """Per-image MSE on the [-1, 1] scale (AVAE's reported MSE, Plumerault et al. 2020): ``mse(x, y) * 4``.

    Args / raises as :func:`mse`; inputs are still in [0, 1]. Returns float (B,) in [-1, 1]^2 units.
    """
    return mse(x, y) * 4.0


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image peak signal-to-noise ratio, 10 log10(data_range^2 / MSE), in dB.

    Matches ``skimage.metrics.peak_signal_noise_ratio(x_i, y_i, data_range=1)`` image by image.

    Args:
        x, y: images, float (B, C, H, W) in [0, 1].
        data_range: peak-to-peak range of the pixel values (1 for [0, 1] images).

    Returns:
        float (B,) in dB; ``inf`` for identical images.

    Raises:
        ValueError: shapes differ or are not 4-d.
    """
    return 10.0 * torch.log10(data_range**2 / mse(x, y))


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image structural similarity (Wang et al. 2004), Gaussian window sigma = 1.5, 11 x 11.

    The SSIM map comes from ``torchmetrics.functional.structural_similarity_index_measure`` (K1 = 0.01,
    K2 = 0.03). Its own per-image mean also averages the 5-pixel border computed on reflect padding; here the
    map is averaged over channels and over the window positions that lie inside the image only, as Wang et
    al.'s reference MATLAB code (``filter2(..., 'valid')``) and scikit-image do. So the result equals
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1, channel_axis=...)`` up to float32 round-off.

    Args:
        x: images (e.g. reconstructions), float (B, C, H, W) in [0, 1]; H, W >= 11.
        y: reference images, same shape and range.
        data_range: peak-to-peak range of the pixel values.

    Returns:
        float (B,) in [-1, 1], 1 for identical images.

    Raises:
        ValueError: shapes differ, are not 4-d, or H or W < 11.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11 x 11 pixels, got {tuple(x.shape[-2:])}")
    # Imported here: torchmetrics (with scipy) is most of this module's import time, and training imports the
    # module for laplacian_variance only.
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(
        x,
        y,
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        reduction="none",
        data_range=data_range,
        return_full_image=True,
    )  # full: (B, C, H, W), border rows / columns computed on reflect padding
    pad = 5  # (11 - 1) // 2
    return full[..., pad:-pad, pad:-pad].flatten(1).mean(1)  # (B,)


# ---------------------------------------------------------------------------------------------------------
# Sharpness
# ---------------------------------------------------------------------------------------------------------


def to_grey(x: Tensor) -> Tensor:
    """Grey image with ITU-R BT.601 luma weights 0.299 R + 0.587 G + 0.114 B.

    Args:
        x: images, float (B, C, H, W) with C = 3 (RGB) or C = 1 (returned unchanged), any range.

    Returns:
        float (B, 1, H, W), same range as the input.

    Raises:
        ValueError: C is neither 1 nor 3.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1 or 3, H, W) images, got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        return x
    w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)  # (B, 1, H, W)


def _filter3x3(grey: Tensor, kernel: tuple[tuple[float, ...], ...]) -> Tensor:
    """Correlate (B, 1, H, W) with a 3x3 kernel; edges padded by repeating the border pixel.

    For a one-pixel border, ``replicate`` padding equals scipy.ndimage's default ``mode='reflect'``
    (d c b a | a b c d), so these filters reproduce ``scipy.ndimage.laplace`` / ``sobel`` exactly.
    """
    k = torch.tensor(kernel, dtype=grey.dtype, device=grey.device).view(1, 1, 3, 3)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")  # (B, 1, H + 2, W + 2)
    return F.conv2d(padded, k)  # (B, 1, H, W); conv2d is a correlation, as in scipy.ndimage.correlate


def laplacian_variance(x: Tensor) -> Tensor:
    """Per-image variance of the Laplacian of the grey image (a no-reference sharpness measure).

    grey = 0.299 R + 0.587 G + 0.114 B (:func:`to_grey`); Laplacian = 3x3 kernel [[0, 1, 0], [1, -4, 1],
    [0, 1, 0]] with border-replicate padding (= ``scipy.ndimage.laplace`` with its default mode); variance
    over all H x W responses, population (ddof = 0). Higher means more high-frequency detail.

    Args:
        x: images, float (B, 3 or 1, H, W) in [0, 1].

    Returns:
        float (B,), >= 0, in [0, 1]^2 units (multiply by 255^2 for the OpenCV-on-uint8 convention).

    Raises:
        ValueError: C is neither 1 nor 3.
    """
    lap = _filter3x3(to_grey(x), LAPLACIAN_KERNEL)  # (B, 1, H, W)
    return lap.flatten(1).var(1, unbiased=False)  # (B,)


def gradient_magnitude(x: Tensor) -> Tensor:
    """Per-image mean Sobel gradient magnitude of the grey image (a no-reference sharpness measure).

    grey as in :func:`laplacian_variance`; gx, gy = unnormalised 3x3 Sobel responses (kernel
    [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] and its transpose; = ``scipy.ndimage.sobel`` along the column /
    row axis, border-replicate padding); result = mean over pixels of sqrt(gx^2 + gy^2).

    Args:
        x: images, float (B, 3 or 1, H, W) in [0, 1].

    Returns:
        float (B,), >= 0, in [0, 1] units per pixel step (the Sobel kernel's gain of 8 is not divided out).

    Raises:
        ValueError: C is neither 1 nor 3.
    """
    grey = to_grey(x)
    gx = _filter3x3(grey, SOBEL_X_KERNEL)  # (B, 1, H, W)
    gy = _filter3x3(grey, tuple(zip(*SOBEL_X_KERNEL)))  # transpose: d/dy
    return torch.sqrt(gx.square() + gy.square()).flatten(1).mean(1)  # (B,)


_SHARPNESS = {"laplacian_variance": laplacian_variance, "gradient_magnitude": gradient_magnitude}


def sharpness_ratio(recon: Tensor, inputs: Tensor, measure: str = "laplacian_variance") -> float:
    """Mean sharpness of reconstructions divided by mean sharpness of the inputs (< 1: blurrier).

    Args:
        recon: reconstructions (or samples), float (B, 3 or 1, H, W) in [0, 1].
        inputs: the real images, float (B', same C, H', W') in [0, 1]; B' may differ from B.
        measure: ``laplacian_variance`` or ``gradient_magnitude``.

    Returns:
        float, >= 0, dimensionless.

    Raises:
        ValueError: an unknown ``measure``, or the inputs have zero sharpness (constant images).
    """
    if measure not in _SHARPNESS:
        raise ValueError(f"unknown sharpness measure {measure!r}; choose one of {sorted(_SHARPNESS)}")
    fn = _SHARPNESS[measure]
    denom = fn(inputs).double().mean().item()
    if denom == 0.0:
        raise ValueError("inputs have zero sharpness (constant images); the ratio is undefined")
    return fn(recon).double().mean().item() / denom


# ---------------------------------------------------------------------------------------------------------
# Asperti's variance loss
# ---------------------------------------------------------------------------------------------------------

# Elements per float64 chunk in pixel_variance: 2^24 doubles = 128 MiB, so 10k CelebA images fit easily.
_VARIANCE_CHUNK_ELEMENTS = 1 << 24


def pixel_variance(x: Tensor | np.ndarray) -> float:
    """Mean over pixels of the variance across a set: ``np.mean(np.var(X, axis=0))`` (Asperti 2020).

    The variance is the population one (ddof = 0, NumPy's default), accumulated in float64 in chunks of
    pixels so large sets neither lose precision nor double their memory at once.

    Args:
        x: a set of N images (tensor or NumPy array, e.g. a memmap), axis 0 indexing images; any layout of the
            remaining axes ((N, C, H, W) in the library, (N, H, W, C) as on disk), float in [0, 1] (or any
            scale, e.g. uint8 on disk: the result is in its square).

    Returns:
        float, >= 0, in squared pixel units ([0, 1]^2 for library images).

    Raises:
        ValueError: fewer than one image.
    """
    if not isinstance(x, (Tensor, np.ndarray)):
        x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError("pixel_variance needs at least one image")
    flat = x.reshape(x.shape[0], -1)  # (N, D); a view for contiguous tensors and arrays
    n, d = flat.shape
    cols = max(1, _VARIANCE_CHUNK_ELEMENTS // n)
    total = 0.0
    for start in range(0, d, cols):
        chunk = flat[:, start : start + cols]  # (N, <=cols)
        # NumPy input (possibly a read-only memmap of the prepared uint8 data) is copied chunk by chunk.
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.array(chunk, dtype=np.float64))
        else:
            chunk = chunk.double()
        total += chunk.var(0, unbiased=False).sum().item()
    return total / d


def variance_loss(real: Tensor | np.ndarray, generated: Tensor | np.ndarray) -> float:
    """Asperti's variance loss: ``pixel_variance(real) - pixel_variance(generated)`` (Asperti 2020).

    Positive when the generated set (reconstructions or samples) has less per-pixel spread than the real
    set, the signature of a decoder that outputs E[x | z] (law of total variance). Asperti observes that
    for reconstructions it is approximately the MSE; see :func:`variance_loss_mse_ratio`.

    Args:
        real: N real images, float, axis 0 indexing images, in [0, 1].
        generated: N reconstructions or samples, same shape and scale as ``real``.

    Returns:
        float in [0, 1]^2 units (same units as :func:`mse`); may be negative.

    Raises:
        ValueError: the sets differ in size or image shape (the metric is defined on equal-size sets).
    """
    if real.shape[0] != generated.shape[0]:
        raise ValueError(
            f"variance loss needs equal-size sets, got {real.shape[0]} real and {generated.shape[0]} generated"
        )
    if tuple(real.shape) != tuple(generated.shape):
        raise ValueError(f"image shapes differ: {tuple(real.shape)} vs {tuple(generated.shape)}")
    return pixel_variance(real) - pixel_variance(generated)


def variance_loss_mse_ratio(real: Tensor, recon: Tensor) -> float:
    """Variance loss of reconstructions divided by their mean MSE on [0, 1] (Asperti: close to 1).

    Asperti's BalancingVAE code (``computed_gamma.py``) renormalises when this ratio exceeds 0.25.

    Args:
        real: N real images, float (N, C, H, W) in [0, 1].
        recon: their N reconstructions, same shape, paired image by image.

    Returns:
        float, dimensionless; ``nan`` if the reconstructions are perfect (MSE = 0).

    Raises:
        ValueError: shapes differ.
    """
    vl = variance_loss(real, recon)
    err = mse(torch.as_tensor(real), torch.as_tensor(recon)).double().mean().item()
    return vl / err if err > 0 else math.nan
