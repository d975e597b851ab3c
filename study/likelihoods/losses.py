"""Comparison reconstruction losses that are NOT normalised likelihoods: SSIM / MS-SSIM, focal frequency, LPIPS.

Bredell et al. 2023 compare their blur-error likelihood against "recently proposed reconstruction losses"; these are
the usual ones. Each is wrapped as a :class:`~study.likelihoods.base.Likelihood` so a VAE can train with it in place
of log p(x | z), but none is a density over images:

- ``elbo_valid = False``: ``log_prob`` returns **minus a loss times ``weight``** (per image, (B,)), not a
  log-density. An "ELBO" built from it is not a bound on log p(x), and reports must never rank these models by
  NLL or ELBO (rank them by PSNR / SSIM / LPIPS / FID instead). ``weight`` sets the trade-off against the KL term,
  which is in nats per image: a per-image loss of order 1 needs a weight of the order of the number of pixels to
  act like a pixel likelihood.
- ``param_channels(C) = C`` and ``mean = sigmoid(raw)``, so reconstructions are in (0, 1).
- ``sample`` returns the mean: there is no noise model, so the only honest "draw" is deterministic.

Images are float (B, C, H, W) in [0, 1] throughout.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from study.likelihoods.base import Likelihood

__all__ = [
    "ALEXNET_WEIGHTS_FILENAME",
    "FocalFrequencyLoss",
    "PerceptualLoss",
    "SSIMLoss",
    "focal_frequency_loss",
    "load_lpips_alex",
]


class _DeterministicLoss(Likelihood):
    """Shared plumbing of the non-likelihood losses: sigmoid mean, no noise, ``elbo_valid = False``."""

    elbo_valid = False

    def __init__(self, weight: float) -> None:
        super().__init__()
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        self.weight = float(weight)

    def param_channels(self, image_channels: int) -> int:
        return image_channels

    def mean(self, dist_params: Tensor) -> Tensor:
        return torch.sigmoid(dist_params)

    def sample(self, dist_params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The mean: a loss has no noise model to draw from."""
        return self.mean(dist_params)

    @staticmethod
    def _check_shapes(x: Tensor, dist_params: Tensor) -> None:
        if x.dim() != 4 or x.shape != dist_params.shape:
            raise ValueError(f"expected x and dist_params of equal shape (B, C, H, W), got {tuple(x.shape)} and "
                             f"{tuple(dist_params.shape)}")


# -------------------------------------------------------------------------------------------------- SSIM
# The standard five-scale exponents of Wang, Simoncelli & Bovik 2003, "Multi-scale structural similarity for image
# quality assessment" (also torchmetrics' defaults); they sum to 1.0001.
_MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


class SSIMLoss(_DeterministicLoss):
    """log_prob = -weight * (1 - SSIM(mu(z), x)) per image; SSIM of Wang et al. 2004, MS-SSIM of Wang et al. 2003.

    SSIM uses the standard 11x11 Gaussian window (sigma = 1.5, K1 = 0.01, K2 = 0.03) via
    ``torchmetrics.functional.image``, averaged over channels and positions to one value per image.

    ``border`` (single scale only) chooses which positions are averaged:

    - ``reflect`` (default): every pixel, with the image reflect-padded (torchmetrics' convention). Every pixel of
      the reconstruction is then constrained equally, which a training loss needs.
    - ``valid``: only windows that lie inside the image, as in Wang et al.'s reference code and
      ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``;
      the value then equals the usual reported SSIM, but pixels near the border barely enter the loss.
      On 64x64 face crops against a blurred copy the two differ by ~0.01 (the border band is ~30% of the image).

    MS-SSIM with all five scales needs images of at least 176 px with an 11-px window, far above this study's 32
    and 64 px. With ``num_scales=None`` the loss uses the largest number of scales the image allows (3 at 64x64,
    2 at 32x32; torchmetrics' size rule) and the first that many of Wang et al.'s betas, renormalised to sum to 1
    (all five unchanged when five fit). Negative contrast terms are clipped at 0 (torchmetrics ``normalize='relu'``)
    so fractional powers stay real. An explicit ``num_scales`` that does not fit raises ``ValueError`` naming the
    resolution it needs. Pick an explicit value when comparing runs across resolutions.

    Args:
        weight: multiplier of (1 - SSIM) (> 0).
        multiscale: use MS-SSIM instead of SSIM.
        data_range: dynamic range of the images (1.0 for [0, 1]).
        sigma: Gaussian window width in pixels; the window is 2 * int(3.5 sigma + 0.5) + 1 wide.
        border: ``reflect`` or ``valid`` (single-scale SSIM only).
        num_scales: MS-SSIM scales (1..5) or None for as many as fit.

    Raises:
        ValueError: bad options at construction; in ``log_prob``, images too small for the window / scales.
    """

    def __init__(
        self,
        weight: float = 1.0,
        multiscale: bool = False,
        data_range: float = 1.0,
        sigma: float = 1.5,
        border: Literal["reflect", "valid"] = "reflect",
        num_scales: int | None = None,
    ) -> None:
        super().__init__(weight)
        if data_range <= 0 or sigma <= 0:
            raise ValueError("data_range and sigma must be positive")
        if border not in ("reflect", "valid"):
            raise ValueError(f"unknown border {border!r}; choose 'reflect' or 'valid'")
        if multiscale and border != "reflect":
            raise ValueError("border='valid' is only available for single-scale SSIM")
        if num_scales is not None and (not multiscale or not 1 <= num_scales <= len(_MS_SSIM_BETAS)):
            raise ValueError(f"num_scales must be None or 1..{len(_MS_SSIM_BETAS)}, and only with multiscale=True")
        self.multiscale = multiscale
        self.data_range = float(data_range)
        self.sigma = float(sigma)
        self.border = border
        self.num_scales = num_scales
        self._pad = int(3.5 * sigma + 0.5)  # torchmetrics' and skimage's Gaussian window radius
        self.kernel_size = 2 * self._pad + 1

    def _fits(self, n: int, size: int) -> bool:
        """Whether ``n`` MS-SSIM scales fit a side of ``size`` px (torchmetrics' check + reflect-pad limit)."""
        return (
            size >= 2**n
            and size // max(1, n - 1) ** 2 > self.kernel_size - 1
            and size // 2 ** (n - 1) > self._pad
        )

    def _min_size(self, n: int) -> int:
        return next(s for s in range(1, 10_000) if self._fits(n, s))

    def scales_for(self, height: int, width: int) -> int:
        """MS-SSIM scales used for images of this size; raises ``ValueError`` when none (or not the set one) fit."""
        size = min(height, width)
        if self.num_scales is not None:
            if not self._fits(self.num_scales, size):
                raise ValueError(
                    f"MS-SSIM with {self.num_scales} scales and a {self.kernel_size}-px window needs images of at "
                    f"least {self._min_size(self.num_scales)}x{self._min_size(self.num_scales)}, got {height}x{width}"
                )
            return self.num_scales
        fitting = [n for n in range(len(_MS_SSIM_BETAS), 0, -1) if self._fits(n, size)]
        if not fitting or fitting[0] < 2:
            raise ValueError(
                f"MS-SSIM needs at least 2 scales, i.e. images of at least {self._min_size(2)}x{self._min_size(2)} "
                f"with a {self.kernel_size}-px window, got {height}x{width}; use single-scale SSIM"
            )
        return fitting[0]

    def similarity(self, x: Tensor, mean: Tensor) -> Tensor:
        """(MS-)SSIM per image.

        Args:
            x: target images, float (B, C, H, W) in [0, ``data_range``].
            mean: reconstructions, same shape and dtype.

        Returns:
            float (B,), at most 1 (1 = identical), averaged over channels and positions.

        Raises:
            ValueError: images too small for the window or for the MS-SSIM scales.
        """
        from torchmetrics.functional.image import (
            multiscale_structural_similarity_index_measure,
            structural_similarity_index_measure,
        )

        h, w = x.shape[-2:]
        if self.multiscale:
            n = self.scales_for(h, w)
            betas = _MS_SSIM_BETAS if n == len(_MS_SSIM_BETAS) else tuple(
                b / sum(_MS_SSIM_BETAS[:n]) for b in _MS_SSIM_BETAS[:n]
            )
            return multiscale_structural_similarity_index_measure(
                mean, x, sigma=self.sigma, kernel_size=self.kernel_size, data_range=self.data_range,
                reduction="none", betas=betas, normalize="relu",
            )
        if min(h, w) <= 2 * self._pad:
            raise ValueError(f"SSIM with a {self.kernel_size}-px window needs images larger than that, got {h}x{w}")
        if self.border == "reflect":
            return structural_similarity_index_measure(
                mean, x, sigma=self.sigma, data_range=self.data_range, reduction="none"
            )
        _, full = structural_similarity_index_measure(
            mean, x, sigma=self.sigma, data_range=self.data_range, reduction="none", return_full_image=True
        )  # full: (B, C, H, W)
        p = self._pad
        return full[..., p:-p, p:-p].flatten(1).mean(1)  # (B,)

    def log_prob(self, x: Tensor, dist_params: Tensor) -> Tensor:
        """-weight * (1 - SSIM(mean, x)), float (B,); not a log-density (``elbo_valid = False``)."""
        self._check_shapes(x, dist_params)
        return -self.weight * (1.0 - self.similarity(x, self.mean(dist_params)))


# ------------------------------------------------------------------------------------- focal frequency
def focal_frequency_loss(
    pred: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    patch_factor: int = 1,
    ave_spectrum: bool = False,
    log_matrix: bool = False,
) -> Tensor:
    """Focal frequency loss per image (Jiang et al. 2021, ICCV, Eq. 2-5; options as in the official code).

    With F the orthonormal 2-D DFT of each image patch and channel, d = |F_pred - F_target|^2 and the spectrum weight
    w = |F_pred - F_target|^alpha (optionally log(1 + .)) divided by its maximum over frequencies, clipped to [0, 1]
    and detached, the loss is mean(w * d) over patches, channels and frequencies.

    Args:
        pred, target: float (B, C, H, W), images in [0, 1].
        alpha: focusing exponent of the weight (> 0).
        patch_factor: split each image into patch_factor x patch_factor patches first (H, W divisible by it).
        ave_spectrum: compare the batch-mean spectra instead of each image's; every image then gets the batch
            value, so the batch mean equals the paper's loss.
        log_matrix: use log(1 + w) before normalising.

    Returns:
        float (B,), >= 0. The batch mean equals the official implementation's value.

    Raises:
        ValueError: shape mismatch or H, W not divisible by ``patch_factor``.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"expected pred and target of equal shape (B, C, H, W), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    b, c, h, w = pred.shape
    if patch_factor < 1 or h % patch_factor or w % patch_factor:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_factor {patch_factor}")
    ph, pw = h // patch_factor, w // patch_factor

    def spectrum(x: Tensor) -> Tensor:
        patches = x.reshape(b, c, patch_factor, ph, patch_factor, pw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, patch_factor**2, c, ph, pw)  # (B, P, C, h, w)
        return torch.fft.fft2(patches, norm="ortho")  # complex (B, P, C, h, w)

    f_pred, f_target = spectrum(pred), spectrum(target)
    if ave_spectrum:
        f_pred, f_target = f_pred.mean(0, keepdim=True), f_target.mean(0, keepdim=True)  # (1, P, C, h, w)
    diff = f_pred - f_target
    distance = diff.real.square() + diff.imag.square()  # |F_pred - F_target|^2, (B or 1, P, C, h, w)

    with torch.no_grad():
        # The weight only focuses the loss on hard frequencies; gradients flow through ``distance`` alone.
        weight = distance.sqrt().pow(alpha)
        if log_matrix:
            weight = torch.log1p(weight)
        peak = weight.amax(dim=(-2, -1), keepdim=True)
        # identical spectra (peak 0) get weight 0, as the official code's nan -> 0
        weight = torch.where(peak > 0, weight / peak.clamp_min(torch.finfo(weight.dtype).tiny), 0.0)
        weight = weight.clamp(0.0, 1.0)

    per_image = (weight * distance).flatten(1).mean(1)  # (B,) or (1,)
    return per_image.expand(b)


class FocalFrequencyLoss(_DeterministicLoss):
    """log_prob = -weight * FFL(mu(z), x) per image (Jiang et al. 2021, "Focal Frequency Loss for Image
    Reconstruction and Synthesis", ICCV); see :func:`focal_frequency_loss`.

    The loss is a *mean* over frequencies (as in the paper), so it is small; choose ``weight`` accordingly
    (the paper adds it with weight 1 to a pixel loss). Computed on [0, 1] images.

    Args:
        weight: multiplier (> 0).
        alpha: spectrum-weight exponent (> 0); 1 in the paper.
        patch_factor: patch-based FFL, 1 = whole image.
        ave_spectrum: use the minibatch-average spectrum.
        log_matrix: log(1 + w) spectrum weight.

    Raises:
        ValueError: non-positive ``weight`` / ``alpha`` or ``patch_factor`` < 1.
    """

    def __init__(
        self,
        weight: float = 1.0,
        alpha: float = 1.0,
        patch_factor: int = 1,
        ave_spectrum: bool = False,
        log_matrix: bool = False,
    ) -> None:
        super().__init__(weight)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if patch_factor < 1:
            raise ValueError(f"patch_factor must be >= 1, got {patch_factor}")
        self.alpha = float(alpha)
        self.patch_factor = int(patch_factor)
        self.ave_spectrum = bool(ave_spectrum)
        self.log_matrix = bool(log_matrix)

    def log_prob(self, x: Tensor, dist_params: Tensor) -> Tensor:
        """-weight * FFL(mean, x), float (B,); not a log-density (``elbo_valid = False``)."""
        self._check_shapes(x, dist_params)
        loss = focal_frequency_loss(
            self.mean(dist_params), x, self.alpha, self.patch_factor, self.ave_spectrum, self.log_matrix
        )
        return -self.weight * loss


# -------------------------------------------------------------------------------------------------- LPIPS
#: torchvision's ImageNet AlexNet state dict (https://download.pytorch.org/models/alexnet-owt-7be5be79.pth).
ALEXNET_WEIGHTS_FILENAME = "alexnet-owt-7be5be79.pth"


def _default_alexnet_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS_FILENAME


def load_lpips_alex(weights_path: str | Path | None = None, lin_weights_path: str | Path | None = None) -> nn.Module:
    """LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018), built entirely from local files.

    ``lpips.LPIPS`` would download the backbone through torchvision; here it is built with a random backbone
    (``pnet_rand=True``, no network access) that is then overwritten from ``weights_path``, and the linear
    calibration layers come from the ``lpips`` package's bundled ``weights/v0.1/alex.pth``. The returned network is
    frozen and in eval mode; call it as ``net(a, b)`` with images in [-1, 1], giving (B, 1, 1, 1).

    Args:
        weights_path: torchvision AlexNet state dict (keys ``features.N.weight``/``bias``, as in
            ``alexnet-owt-7be5be79.pth``) or just its ``features`` (keys ``N.weight``). None: look for
            ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`` (torch.hub's cache, where torchvision puts it).
        lin_weights_path: LPIPS linear layers; None: the ``lpips`` package's bundled v0.1 AlexNet file.

    Raises:
        FileNotFoundError: the backbone or linear-layer file is missing; the message says which file goes where.
        ValueError: the backbone file is not an AlexNet state dict.
    """
    import lpips

    path = Path(weights_path) if weights_path is not None else _default_alexnet_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs the ImageNet AlexNet backbone weights and will not download them: put torchvision's "
            f"AlexNet state dict '{ALEXNET_WEIGHTS_FILENAME}' (https://download.pytorch.org/models/"
            f"{ALEXNET_WEIGHTS_FILENAME}) at {path}"
            + ("" if weights_path is not None else
               " (torch.hub's cache, $TORCH_HOME/hub/checkpoints/), or pass its location as weights_path")
        )
    lin_path = (Path(lin_weights_path) if lin_weights_path is not None
                else Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth")
    if not lin_path.is_file():
        raise FileNotFoundError(f"LPIPS linear-layer weights not found at {lin_path} (lpips package file "
                                "weights/v0.1/alex.pth)")

    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated ``alexnet(pretrained=False)``; harmless here.
        warnings.simplefilter("ignore", UserWarning)
        # use_dropout=True only so the bundled keys ``linK.model.1.weight`` line up; the net stays in eval mode.
        net = lpips.LPIPS(pretrained=False, net="alex", version="0.1", pnet_rand=True, use_dropout=True,
                          verbose=False)

    lin_state = torch.load(lin_path, map_location="cpu", weights_only=True)
    # lpips registers each linear layer twice (``linK`` and ``lins.K``); the file names the first.
    wanted = {f"lin{k}.model.1.weight" for k in range(5)}
    _, unexpected = net.load_state_dict(lin_state, strict=False)
    if unexpected or not wanted <= set(lin_state):
        raise ValueError(f"{lin_path} does not hold the LPIPS-Alex v0.1 linear layers {sorted(wanted)}")

    backbone = torch.load(path, map_location="cpu", weights_only=True)
    mapped: dict[str, Tensor] = {}
    # lpips splits torchvision's ``features`` into slice1..5 but keeps the original layer indices as names.
    for slice_name, block in net.net.named_children():
        for index, layer in block.named_children():
            for pname, _ in layer.named_parameters(recurse=False):
                key = f"{index}.{pname}"
                value = backbone.get(f"features.{key}", backbone.get(key))
                if value is None:
                    raise ValueError(f"{path} is not a torchvision AlexNet state dict: no 'features.{key}'")
                mapped[f"{slice_name}.{key}"] = value
    try:
        net.net.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a torchvision AlexNet state dict: {err}") from err

    net.requires_grad_(False)
    return net.eval()


class PerceptualLoss(_DeterministicLoss):
    """log_prob = -weight * LPIPS(mu(z), x) per image (LPIPS v0.1, AlexNet; Zhang et al. 2018, CVPR).

    Images in [0, 1] are mapped to [-1, 1], the range LPIPS expects. One-channel (grey) images are repeated to three
    channels. The LPIPS network is a frozen, registered submodule (it follows ``.to(device)`` and appears in
    ``state_dict``) and stays in eval mode even when the VAE is put in train mode, so its dropout never fires.
    No value is ever computed from a random backbone: without the weights file the constructor fails.

    Args:
        weight: multiplier (> 0).
        weights_path: AlexNet backbone state dict, see :func:`load_lpips_alex` (None: torch.hub's cache).
        lin_weights_path: LPIPS linear layers (None: bundled with the ``lpips`` package).

    Raises:
        FileNotFoundError: the AlexNet weights are missing (the message names the file and where to put it).
        ValueError: non-positive weight or a file that is not AlexNet.
    """

    def __init__(
        self,
        weight: float = 1.0,
        weights_path: str | Path | None = None,
        lin_weights_path: str | Path | None = None,
    ) -> None:
        super().__init__(weight)
        self.lpips = load_lpips_alex(weights_path, lin_weights_path)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.lpips.eval()  # a frozen metric network: dropout and batch statistics stay off
        return self

    def log_prob(self, x: Tensor, dist_params: Tensor) -> Tensor:
        """-weight * LPIPS(mean, x), float (B,); not a log-density (``elbo_valid = False``)."""
        self._check_shapes(x, dist_params)
        channels = x.shape[1]
        if channels not in (1, 3):
            raise ValueError(f"LPIPS needs 1- or 3-channel images, got {channels}")
        mean = self.mean(dist_params)
        if channels == 1:
            x, mean = x.expand(-1, 3, -1, -1), mean.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        dtype = next(self.lpips.parameters()).dtype
        dist = self.lpips(2.0 * mean.to(dtype) - 1.0, 2.0 * x.to(dtype) - 1.0)  # (B, 1, 1, 1)
        return -self.weight * dist.reshape(-1).to(x.dtype)  # (B,)
