"""Perceptual metrics from local weights: LPIPS (AlexNet, v0.1) and a Frechet distance (FID).

Nothing here downloads. Pretrained backbones are read from a local file, looked up in this order: the path
given by the caller (a file, or a folder holding the file under its standard name), then
``torch.hub.get_dir()/checkpoints/`` (= ``$TORCH_HOME/hub/checkpoints/``, by default
``~/.cache/torch/hub/checkpoints/``). When the file is missing the functions return :class:`MetricUnavailable`
naming the file and the place to put it, never a number from a randomly initialised network.

LPIPS (Zhang et al. 2018) uses the ``lpips`` package: AlexNet trunk, the v0.1 linear heads that ship inside
the ``lpips`` wheel, inputs mapped from [0, 1] to [-1, 1] (the official AVAE code's setting). The trunk is
torchvision's ImageNet AlexNet, ``alexnet-owt-7be5be79.pth``.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to features of the real and the
generated set. The study has ONE implementation, named in every result (:data:`FID_IMPLEMENTATION`):
:func:`frechet_distance` (float64, eigendecomposition, below) on the 2048-d average-pool features of
torchvision's Inception-v3 loaded from ``inception_v3_google-0cc3c7bd.pth``, inputs resized bilinearly to
299 x 299. That network is Google's Inception-v3 ported to PyTorch, NOT the TF graph
``pt_inception-2015-12-05`` used by TTUR / pytorch-fid / torch-fidelity; its features differ, so values are
comparable within this study only, not with published FIDs (the four papers' codes already use
three different Inceptions). ``torch-fidelity`` (which torchmetrics' FID needs for the TF weights) is not a
dependency.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: torchvision's ImageNet AlexNet state dict, the LPIPS trunk.
ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
#: torchvision's port of Google's Inception-v3 (aux_logits=True state dict), the FID feature network.
INCEPTION_WEIGHTS_FILE = "inception_v3_google-0cc3c7bd.pth"
#: The name logged with every FID computed by the default feature extractor.
FID_IMPLEMENTATION = (
    "study.metrics.perceptual.frechet_distance (float64, eigh) on torchvision Inception-v3 "
    f"({INCEPTION_WEIGHTS_FILE}) avgpool 2048-d, bilinear resize to 299, inputs 2x-1; "
    "not the TF FID Inception pt_inception-2015-12-05, not comparable with published FID"
)
#: The name logged with every LPIPS value.
LPIPS_IMPLEMENTATION = f"lpips package, net=alex, v0.1 linear heads, trunk {ALEXNET_WEIGHTS_FILE}, inputs 2x-1"

_PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class MetricUnavailable:
    """A metric that could not be computed here, with why: log it instead of a number.

    Attributes:
        name: the metric (``"lpips"``, ``"fid"``).
        reason: what is missing and how to provide it (which file to put where).
    """

    name: str
    reason: str


@dataclass(frozen=True)
class FIDResult:
    """A Frechet distance and the implementation that produced it (FID differs between implementations).

    Attributes:
        value: the distance, float >= 0, in squared feature units.
        implementation: the feature network and estimator, to be logged next to the value.
        num_real, num_fake: images in each set (FID is biased upwards for small sets).
    """

    value: float
    implementation: str
    num_real: int
    num_fake: int


def find_weights(filename: str, path: _PathLike | None = None) -> Path | None:
    """Locate a local weights file; never downloads.

    Args:
        filename: the standard file name (e.g. :data:`ALEXNET_WEIGHTS_FILE`).
        path: a file, or a folder containing ``filename``. When given, only this place is searched.

    Returns:
        the path of an existing file, or None.
    """
    if path is not None:
        p = Path(path)
        candidates = [p / filename] if p.is_dir() else [p]
    else:
        candidates = [Path(torch.hub.get_dir()) / "checkpoints" / filename]
    return next((c for c in candidates if c.is_file()), None)


def _missing(name: str, filename: str, path: _PathLike | None) -> MetricUnavailable:
    if path is not None:
        where = f"not found at {path}; put torchvision's {filename} there (or pass the folder holding it)"
    else:
        where = (
            f"not found in {Path(torch.hub.get_dir()) / 'checkpoints'} ($TORCH_HOME/hub/checkpoints/); "
            f"put torchvision's {filename} there, or pass its path"
        )
    return MetricUnavailable(
        name=name,
        reason=f"weights file {filename} {where} (torchvision's URL: https://download.pytorch.org/models/{filename})",
    )


# ---------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------

# torchvision AlexNet ``features.<i>`` conv layers -> the lpips trunk slice that holds them.
_ALEX_CONV_SLICE = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


def load_lpips(
    alexnet_weights: _PathLike | None = None, device: torch.device | str | None = None
) -> nn.Module | MetricUnavailable:
    """Build LPIPS-Alex v0.1 from local files only.

    The ``lpips.LPIPS`` module is constructed with ``pnet_rand=True, pretrained=False`` so it touches
    neither the network nor the package files; then the trunk is loaded from torchvision's AlexNet state
    dict (``features.{0,3,6,8,10}`` -> ``net.slice{1..5}``) and the linear heads from the wheel's
    ``weights/v0.1/alex.pth``, checking that every parameter was loaded.

    Args:
        alexnet_weights: path to ``alexnet-owt-7be5be79.pth`` or its folder; default: the torch hub
            checkpoints folder.
        device: where to put the network (default CPU).

    Returns:
        the LPIPS module in eval mode, or :class:`MetricUnavailable` when the AlexNet file is missing.

    Raises:
        ValueError: the file exists but is not a torchvision AlexNet state dict.
    """
    found = find_weights(ALEXNET_WEIGHTS_FILE, alexnet_weights)
    if found is None:
        return _missing("lpips", ALEXNET_WEIGHTS_FILE, alexnet_weights)
    import lpips  # heavy import (prints nothing with verbose=False); only when weights exist

    with warnings.catch_warnings():
        # lpips passes the deprecated ``pretrained=False`` to torchvision; harmless, and not ours to fix.
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
    trunk = torch.load(found, map_location="cpu", weights_only=True)
    state: dict[str, Tensor] = {}
    for idx, sl in _ALEX_CONV_SLICE.items():
        for kind in ("weight", "bias"):
            key = f"features.{idx}.{kind}"
            if key not in trunk:
                raise ValueError(f"{found} is not a torchvision AlexNet state dict (missing {key})")
            state[f"net.slice{sl}.{idx}.{kind}"] = trunk[key]
    heads_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    state.update(torch.load(heads_path, map_location="cpu", weights_only=True))  # lin{0..4}.model.1.weight
    result = net.load_state_dict(state, strict=False)
    # Allowed to stay as constructed: the fixed input scaling buffers and `lins.*` (aliases of `lin*`).
    really_missing = [k for k in result.missing_keys if not k.startswith(("scaling_layer.", "lins."))]
    if really_missing or result.unexpected_keys:
        raise ValueError(f"LPIPS weights did not match: missing {really_missing}, unexpected {result.unexpected_keys}")
    return net.to(device or "cpu").eval()


@torch.no_grad()
def lpips_distance(
    x: Tensor,
    y: Tensor,
    net: nn.Module | MetricUnavailable | None = None,
    *,
    alexnet_weights: _PathLike | None = None,
    batch_size: int = 64,
) -> Tensor | MetricUnavailable:
    """Per-image LPIPS-Alex v0.1 distance (Zhang et al. 2018) at native resolution.

    Args:
        x, y: images, float (B, 3, H, W) in [0, 1] (mapped to [-1, 1] here, as LPIPS expects).
        net: a module from :func:`load_lpips` (reuse it across calls); if None it is loaded from
            ``alexnet_weights``; a :class:`MetricUnavailable` is passed through.
        alexnet_weights: see :func:`load_lpips`; used only when ``net`` is None.
        batch_size: images per forward pass.

    Returns:
        float (B,) on ``x``'s device, >= 0 (0 for identical images; lower is more similar), or
        :class:`MetricUnavailable` when the AlexNet weights are missing.

    Raises:
        ValueError: shapes differ.
    """
    if x.shape != y.shape:
        raise ValueError(f"images must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if net is None:
        net = load_lpips(alexnet_weights)
    if isinstance(net, MetricUnavailable):
        return net
    dev = next(net.parameters()).device
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(dev) * 2 - 1  # [0, 1] -> [-1, 1]
        yb = y[start : start + batch_size].to(dev) * 2 - 1
        out.append(net(xb, yb).flatten())  # (b, 1, 1, 1) -> (b,)
    return torch.cat(out).to(x.device)


# ---------------------------------------------------------------------------------------------------------
# Frechet distance and FID
# ---------------------------------------------------------------------------------------------------------


def _sqrt_psd(mat: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    w, v = torch.linalg.eigh(mat)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(
    mu1: Tensor | np.ndarray, sigma1: Tensor | np.ndarray, mu2: Tensor | np.ndarray, sigma2: Tensor | np.ndarray
) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982).

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}).

    The trace term is computed in float64 without a non-symmetric ``sqrtm``: sigma1 sigma2 is similar to the
    symmetric PSD matrix A = sigma1^{1/2} sigma2 sigma1^{1/2}, so tr((sigma1 sigma2)^{1/2}) = sum_i sqrt(lambda_i(A))
    from two ``eigh`` calls. This agrees with pytorch-fid's ``scipy.linalg.sqrtm`` formula where that is
    well conditioned, and stays real and finite for singular covariances (fewer samples than dimensions).

    Args:
        mu1, mu2: float (d,) means.
        sigma1, sigma2: float (d, d) symmetric PSD covariances.

    Returns:
        float, >= 0 up to round-off, in squared feature units.

    Raises:
        ValueError: shapes do not match.
    """
    m1, m2 = (torch.as_tensor(m, dtype=torch.float64).flatten() for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {m1.shape}, {m2.shape}; sigma {s1.shape}, {s2.shape}")
    s2 = s2.to(s1.device)
    s1_half = _sqrt_psd((s1 + s1.T) / 2)  # symmetrise: covariances from data are symmetric only to round-off
    a = s1_half @ ((s2 + s2.T) / 2) @ s1_half  # (d, d), symmetric PSD
    tr_covmean = torch.linalg.eigvalsh((a + a.T) / 2).clamp_min(0).sqrt().sum()
    diff = (m1 - m2.to(m1.device)).square().sum()
    return (diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean).item()


class _RunningMoments:
    """Streaming float64 mean and covariance (unbiased, N - 1) of feature rows, memory O(d^2).

    Rows are shifted by the first batch's mean before accumulating sums of products, which keeps the
    one-pass formula accurate when features have a large common offset.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: Tensor | None = None
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def update(self, feats: Tensor) -> None:
        f = feats.detach().double().cpu().flatten(1)  # (b, d)
        if self.shift is None:
            self.shift = f.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        c = f - self.shift  # (b, d)
        self.sum += c.sum(0)
        self.outer += c.T @ c
        self.n += f.shape[0]

    def finalize(self) -> tuple[Tensor, Tensor]:
        if self.n < 2 or self.shift is None:
            raise ValueError("need at least 2 images to estimate a covariance")
        mean_c = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean_c, mean_c)) / (self.n - 1)
        return self.shift + mean_c, cov


def feature_statistics(
    images: Tensor | Iterable[Tensor], feature_extractor: nn.Module, batch_size: int = 50
) -> tuple[Tensor, Tensor, int]:
    """Mean and covariance of features over a set of images.

    Args:
        images: float (N, C, H, W) in [0, 1], or an iterable of such batches (e.g. a data loader), so that
            50k images need not sit in memory at once.
        feature_extractor: module mapping a batch (b, C, H, W) in [0, 1] to features (b, d) (or (b, d, 1, 1)).
            It is called under ``torch.no_grad`` on the device of its parameters (CPU if it has none).
        batch_size: images per forward pass when ``images`` is a tensor.

    Returns:
        (mu float64 (d,), sigma float64 (d, d) with the unbiased N - 1 normalisation as in pytorch-fid's
        ``np.cov``, N).

    Raises:
        ValueError: fewer than 2 images.
    """
    weights = list(feature_extractor.parameters())
    dev = weights[0].device if weights else torch.device("cpu")
    if isinstance(images, Tensor):
        batches: Iterable[Tensor] = images.split(batch_size)  # views, (<=batch_size, C, H, W) each
    else:
        batches = images
    moments = _RunningMoments()
    with torch.no_grad():
        for batch in batches:
            moments.update(feature_extractor(batch.to(dev)))
    mu, sigma = moments.finalize()
    return mu, sigma, moments.n


class InceptionPoolFeatures(nn.Module):
    """torchvision Inception-v3 as an FID feature extractor: [0, 1] images -> 2048-d average-pool features.

    Grey images (C = 1) are repeated to 3 channels; images are resized to 299 x 299 bilinearly
    (``align_corners=False``, no antialiasing, like TF's ``resize_bilinear``) and mapped to [-1, 1], the
    input of Google's weights (torchvision's ``transform_input=True`` does the same from ImageNet
    normalisation, so it is off here). ``fc`` is replaced by the identity, so the output is the pooled
    2048-d vector after the (inactive in eval) dropout.
    """

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        inception.fc = nn.Identity()
        self.inception = inception.eval()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        return self.inception(x * 2 - 1)  # (B, 2048)

    def train(self, mode: bool = True) -> InceptionPoolFeatures:
        # Always eval: batch-norm statistics and dropout must stay those of the pretrained network.
        return super().train(False)


def load_inception_features(
    inception_weights: _PathLike | None = None, device: torch.device | str | None = None
) -> nn.Module | MetricUnavailable:
    """Build :class:`InceptionPoolFeatures` from ``inception_v3_google-0cc3c7bd.pth``, without downloading.

    Args:
        inception_weights: path to the file or its folder; default: the torch hub checkpoints folder.
        device: where to put the network (default CPU).

    Returns:
        the feature extractor in eval mode, or :class:`MetricUnavailable` when the file is missing.

    Raises:
        ValueError: the file is not a torchvision Inception-v3 (aux_logits=True) state dict.
    """
    found = find_weights(INCEPTION_WEIGHTS_FILE, inception_weights)
    if found is None:
        return _missing("fid", INCEPTION_WEIGHTS_FILE, inception_weights)
    from torchvision.models import inception_v3

    # weights=None: never download; init_weights=False: skip the slow truncated-normal init we overwrite.
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    try:
        model.load_state_dict(torch.load(found, map_location="cpu", weights_only=True), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{found} is not a torchvision Inception-v3 state dict: {err}") from err
    return InceptionPoolFeatures(model).to(device or "cpu")


def fid(
    real: Tensor | Iterable[Tensor],
    fake: Tensor | Iterable[Tensor],
    feature_extractor: nn.Module | MetricUnavailable | None = None,
    *,
    inception_weights: _PathLike | None = None,
    implementation: str | None = None,
    batch_size: int = 50,
) -> FIDResult | MetricUnavailable:
    """Frechet distance between feature Gaussians of a real and a generated set.

    Args:
        real, fake: float (N, C, H, W) in [0, 1], or iterables of such batches; the sizes may differ.
        feature_extractor: a module mapping [0, 1] images to (b, d) features. If None, the study's FID
            network is loaded with :func:`load_inception_features` (weights from ``inception_weights``); a
            :class:`MetricUnavailable` is passed through.
        inception_weights: see :func:`load_inception_features`; used only when ``feature_extractor`` is None.
        implementation: the name stored in the result; defaults to :data:`FID_IMPLEMENTATION` for the
            Inception network and to the injected module's class name otherwise.
        batch_size: images per forward pass for tensor inputs.

    Returns:
        :class:`FIDResult`, or :class:`MetricUnavailable` when the Inception weights are missing.

    Raises:
        ValueError: a set has fewer than 2 images, or feature sizes differ.
    """
    if feature_extractor is None:
        feature_extractor = load_inception_features(inception_weights)
        if implementation is None and not isinstance(feature_extractor, MetricUnavailable):
            implementation = FID_IMPLEMENTATION
    if isinstance(feature_extractor, MetricUnavailable):
        return feature_extractor
    if implementation is None:
        implementation = f"study.metrics.perceptual.frechet_distance on {type(feature_extractor).__name__} features"
    mu1, s1, n1 = feature_statistics(real, feature_extractor, batch_size)
    mu2, s2, n2 = feature_statistics(fake, feature_extractor, batch_size)
    value = frechet_distance(mu1, s1, mu2, s2)
    return FIDResult(value=value, implementation=implementation, num_real=n1, num_fake=n2)
