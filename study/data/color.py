"""YCbCr colour space and chroma resampling, as used by Dorta et al. 2018 ("Training VAEs Under Structured
Residuals", Sec. 5: 64x64 images, luminance Y at full size, Cb and Cr downsampled to 16x16).

The transform is ITU-R BT.601 in its *full-range* form, as in JPEG (JFIF 1.02, Sec. 7) and PIL's
``Image.convert('YCbCr')``, written for values in [0, 1] instead of [0, 255]:

    Y  =       0.299    R + 0.587    G + 0.114    B
    Cb = 0.5 - 0.168736 R - 0.331264 G + 0.5      B
    Cr = 0.5 + 0.5      R - 0.418688 G - 0.081312 B

Every RGB colour in [0, 1]^3 maps into [0, 1]^3. The inverse is the exact matrix inverse (computed once in float64),
not JFIF's rounded 1.402 / 0.344136 / 0.714136 / 1.772, so ``ycbcr_to_rgb(rgb_to_ycbcr(x)) == x`` up to float
rounding. The map is affine with det ~= 0.23628 per pixel (:data:`LOG_ABS_DET` ~= -1.4427 nats), which a likelihood
over full-resolution YCbCr needs if its NLL is ever compared with one over RGB; with downsampled chroma the map is
not invertible and no such correction exists (the density lives on (Y, Cb down, Cr down)).

Chroma is downsampled by area averaging (a ``factor`` x ``factor`` block mean), the usual JPEG 4:2:0-style
choice, so the modelled Cb, Cr are the block means of the full-resolution chroma.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Rows: Y, Cb, Cr; columns: R, G, B (JFIF / BT.601 full range).
_RGB_TO_YCBCR = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ],
    dtype=np.float64,
)
_OFFSET = np.array([0.0, 0.5, 0.5], dtype=np.float64)
# Exact inverse, so round trips are exact to float precision (JFIF's printed inverse is rounded to 6 digits).
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)

#: log |det| of the RGB -> YCbCr map per pixel (nats, ~= -1.4427): log p_RGB(x) = log p_YCbCr(T x) + H W LOG_ABS_DET
#: for full-resolution chroma (change of variables).
LOG_ABS_DET: float = float(math.log(abs(np.linalg.det(_RGB_TO_YCBCR))))


def _affine(x: Tensor, matrix: np.ndarray, offset_in: np.ndarray, offset_out: np.ndarray) -> Tensor:
    """out = matrix @ (x - offset_in) + offset_out over the channel axis -3 of a float (..., 3, H, W) tensor."""
    if not torch.is_floating_point(x):
        raise TypeError(f"expected a floating point tensor, got {x.dtype}")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected shape (..., 3, H, W), got {tuple(x.shape)}")
    m = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
    b_in = torch.as_tensor(offset_in, dtype=x.dtype, device=x.device)[:, None, None]
    b_out = torch.as_tensor(offset_out, dtype=x.dtype, device=x.device)[:, None, None]
    return torch.einsum("ij,...jhw->...ihw", m, x - b_in) + b_out


def rgb_to_ycbcr(x: Tensor) -> Tensor:
    """RGB -> YCbCr (BT.601 full range, JFIF).

    Args:
        x: float (..., 3, H, W), RGB in [0, 1].

    Returns:
        float (..., 3, H, W), channels (Y, Cb, Cr), each in [0, 1] when ``x`` is (Cb = Cr = 0.5 for greys).

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: axis -3 is not of size 3.
    """
    return _affine(x, _RGB_TO_YCBCR, np.zeros(3), _OFFSET)


def ycbcr_to_rgb(y: Tensor) -> Tensor:
    """YCbCr -> RGB, the exact inverse of :func:`rgb_to_ycbcr`.

    Args:
        y: float (..., 3, H, W), channels (Y, Cb, Cr) in [0, 1].

    Returns:
        float (..., 3, H, W), RGB. Not clipped: a YCbCr triple outside the RGB gamut (a model sample, say) maps
        outside [0, 1]; :func:`merge_for_display` clamps.

    Raises:
        TypeError: ``y`` is not floating point.
        ValueError: axis -3 is not of size 3.
    """
    return _affine(y, _YCBCR_TO_RGB, _OFFSET, np.zeros(3))


def rgb_to_ycbcr_uint8(images: np.ndarray) -> np.ndarray:
    """RGB -> YCbCr on the on-disk layout, rounding to the nearest integer like JPEG encoders.

    Args:
        images: uint8 (..., 3), channels last (e.g. (N, H, W, 3)), RGB in [0, 255].

    Returns:
        uint8 of the same shape, channels (Y, Cb, Cr) in [0, 255]. Matches PIL's ``convert('YCbCr')`` within
        one grey level (PIL uses fixed-point arithmetic).

    Raises:
        ValueError: not uint8 or the last axis is not of size 3.
    """
    _check_uint8(images)
    out = images.astype(np.float64) @ _RGB_TO_YCBCR.T + 255.0 * _OFFSET
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def ycbcr_to_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """YCbCr -> RGB on the on-disk layout, rounded and clipped to [0, 255].

    Args:
        images: uint8 (..., 3), channels last, (Y, Cb, Cr) in [0, 255].

    Returns:
        uint8 of the same shape, RGB in [0, 255].

    Raises:
        ValueError: not uint8 or the last axis is not of size 3.
    """
    _check_uint8(images)
    out = (images.astype(np.float64) - 255.0 * _OFFSET) @ _YCBCR_TO_RGB.T
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_uint8(images: np.ndarray) -> None:
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim < 1 or images.shape[-1] != 3:
        raise ValueError(f"expected channels-last shape (..., 3), got {images.shape}")


def downsample_chroma(c: Tensor, factor: int = 4) -> Tensor:
    """Area (block-mean) downsampling of chroma planes.

    Args:
        c: float (B, C, H, W), normally the (Cb, Cr) planes (C = 2) in [0, 1].
        factor: block size in pixels (>= 1); Dorta et al. use 4 (64x64 -> 16x16).

    Returns:
        float (B, C, H / factor, W / factor): the mean of each ``factor`` x ``factor`` block.

    Raises:
        ValueError: ``factor`` < 1, ``c`` is not 4-D, or H or W is not divisible by ``factor``.
    """
    _check_factor(c, factor)
    if factor == 1:
        return c
    return F.avg_pool2d(c, kernel_size=factor)  # (B, C, H/f, W/f)


def upsample_chroma(c: Tensor, factor: int = 4, mode: Literal["nearest", "bilinear"] = "nearest") -> Tensor:
    """Upsample downsampled chroma back to full resolution, for display only.

    ``nearest`` (default) repeats each value over its block. It is the exact right inverse of
    :func:`downsample_chroma` (``downsample_chroma(upsample_chroma(c)) == c``), so a displayed image shows exactly
    the chroma the model produced. ``bilinear`` (``align_corners=False``, edge values replicated) is smoother, closer
    to what JPEG decoders show, but its block means differ slightly from ``c`` near edges and strong gradients.

    Args:
        c: float (B, C, h, w) in [0, 1].
        factor: integer scale (>= 1).
        mode: ``nearest`` or ``bilinear``.

    Returns:
        float (B, C, h * factor, w * factor).

    Raises:
        ValueError: ``factor`` < 1, ``c`` is not 4-D, or an unknown ``mode``.
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"unknown mode {mode!r}; choose 'nearest' or 'bilinear'")
    if c.dim() != 4:
        raise ValueError(f"expected (B, C, h, w), got {tuple(c.shape)}")
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if factor == 1:
        return c
    if mode == "nearest":
        return c.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return F.interpolate(c, scale_factor=factor, mode="bilinear", align_corners=False)


def split_ycbcr(x: Tensor, factor: int = 4) -> tuple[Tensor, Tensor]:
    """RGB images -> (luminance at full size, chroma downsampled by ``factor``), Dorta et al.'s model space.

    Args:
        x: float (B, 3, H, W), RGB in [0, 1].
        factor: chroma block size (>= 1); H and W must be divisible by it.

    Returns:
        ``(y, cbcr)``: y float (B, 1, H, W) and cbcr float (B, 2, H / factor, W / factor), all in [0, 1].

    Raises:
        ValueError: ``x`` is not (B, 3, H, W), or H, W not divisible by ``factor``.
    """
    if x.dim() != 4:
        raise ValueError(f"expected (B, 3, H, W), got {tuple(x.shape)}")
    ycc = rgb_to_ycbcr(x)  # (B, 3, H, W)
    return ycc[:, :1], downsample_chroma(ycc[:, 1:], factor)  # (B, 1, H, W), (B, 2, H/f, W/f)


def merge_for_display(
    y: Tensor, cbcr: Tensor, mode: Literal["nearest", "bilinear"] = "nearest"
) -> Tensor:
    """(Y, downsampled CbCr) -> RGB for viewing; the inverse of :func:`split_ycbcr` up to the chroma blur.

    The chroma factor is inferred from the shapes. The result is clamped to [0, 1] because out-of-gamut YCbCr
    triples (model samples) have no RGB image; do not use it where exact values matter.

    Args:
        y: float (B, 1, H, W), luminance in [0, 1].
        cbcr: float (B, 2, H / f, W / f), chroma in [0, 1].
        mode: chroma upsampling, see :func:`upsample_chroma`.

    Returns:
        float (B, 3, H, W), RGB clamped to [0, 1].

    Raises:
        ValueError: wrong channel counts, batch mismatch, or a non-integer / anisotropic size ratio.
    """
    if y.dim() != 4 or y.shape[1] != 1:
        raise ValueError(f"expected y of shape (B, 1, H, W), got {tuple(y.shape)}")
    if cbcr.dim() != 4 or cbcr.shape[1] != 2 or cbcr.shape[0] != y.shape[0]:
        raise ValueError(f"expected cbcr of shape ({y.shape[0]}, 2, h, w), got {tuple(cbcr.shape)}")
    (h, w), (ch, cw) = y.shape[-2:], cbcr.shape[-2:]
    if h % ch or w % cw or h // ch != w // cw:
        raise ValueError(f"luminance {h}x{w} is not an integer, isotropic multiple of chroma {ch}x{cw}")
    chroma = upsample_chroma(cbcr, h // ch, mode)  # (B, 2, H, W)
    return ycbcr_to_rgb(torch.cat([y, chroma], dim=1)).clamp(0.0, 1.0)  # (B, 3, H, W)


def _check_factor(c: Tensor, factor: int) -> None:
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if c.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(c.shape)}")
    h, w = c.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the chroma factor {factor}")


# ------------------------------------------------------------------------------------ on-disk colour layouts
def to_storage(images: np.ndarray, color: str, factor: int = 4) -> dict[str, np.ndarray]:
    """Convert prepared RGB images to the arrays the ``prepare`` stage stores for ``color``.

    Args:
        images: uint8 (N, H, W, 3) RGB.
        color: ``rgb`` -> {"": (N, H, W, 3)}; ``grey`` -> {"": Y (N, H, W, 1)}; ``ycbcr`` -> {"": Y (N, H, W, 1),
            "_chroma": Cb, Cr (N, H / f, W / f, 2)}, chroma area-averaged (mean of each f x f block) in float
            before rounding, as Dorta et al. 2018 store 16 x 16 chroma for 64 x 64 images.
        factor: chroma downsampling factor f.

    Returns:
        array-name suffix -> uint8 array (the split name is prepended by the caller).

    Raises:
        ValueError: unknown colour, or H, W not divisible by f.
    """
    _check_uint8(images)
    if color == "rgb":
        return {"": images}
    ycc = images.astype(np.float64) @ _RGB_TO_YCBCR.T + 255.0 * _OFFSET  # (N, H, W, 3) in [0, 255]
    luma = np.clip(np.rint(ycc[..., :1]), 0, 255).astype(np.uint8)  # (N, H, W, 1)
    if color == "grey":
        return {"": luma}
    if color != "ycbcr":
        raise ValueError(f"unknown colour {color!r}; expected rgb, grey or ycbcr")
    n, height, width, _ = images.shape
    if height % factor or width % factor:
        raise ValueError(f"image size {height} x {width} is not divisible by the chroma factor {factor}")
    blocks = ycc[..., 1:].reshape(n, height // factor, factor, width // factor, factor, 2)
    chroma = blocks.mean(axis=(2, 4))  # (N, H / f, W / f, 2)
    return {"": luma, "_chroma": np.clip(np.rint(chroma), 0, 255).astype(np.uint8)}


#: Splits whose full-resolution RGB is kept beside their YCbCr arrays (``<split>_rgb.npy``): Dorta et al. 2018
#: measure MSE "using the RGB before the conversion to YCbCr", so pixel metrics of YCbCr models need the
#: original RGB, not RGB rebuilt from the downsampled chroma (which hides the chroma downsampling error).
RGB_REFERENCE_SPLITS: tuple[str, ...] = ("val", "test")


def storage_arrays(splits: dict[str, np.ndarray], color: str, factor: int = 4) -> dict[str, np.ndarray]:
    """Every array the ``prepare`` stage stores, by file stem: :func:`to_storage` of each split, and for
    ``color = ycbcr`` the untouched RGB of the :data:`RGB_REFERENCE_SPLITS` as ``<split>_rgb``.

    Args:
        splits: split name -> uint8 (N, H, W, 3) RGB (the cropped and resized images).
        color: ``rgb``, ``grey`` or ``ycbcr``.
        factor: chroma downsampling factor f.

    Returns:
        file stem (``train``, ``val_chroma``, ``test_rgb``, ...) -> uint8 (N, H', W', C') array.

    Raises:
        ValueError: from :func:`to_storage`.
    """
    stored: dict[str, np.ndarray] = {}
    for split, rgb in splits.items():
        for suffix, array in to_storage(rgb, color, factor).items():
            stored[f"{split}{suffix}"] = array
        if color == "ycbcr" and split in RGB_REFERENCE_SPLITS:
            stored[f"{split}_rgb"] = rgb
    return stored


def to_display_rgb(x: Tensor, color: str) -> Tensor:
    """Library images (B, C, H, W) in [0, 1] of ``color`` as RGB (B, 3, H, W) in [0, 1] for figures and for
    RGB metrics: YCbCr is converted (chroma already at full resolution), grey is repeated."""
    if color == "ycbcr":
        return ycbcr_to_rgb(x).clamp(0.0, 1.0)
    if color == "grey":
        return x.expand(-1, 3, -1, -1)
    return x
