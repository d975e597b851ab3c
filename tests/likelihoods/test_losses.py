"""Non-likelihood reconstruction losses (study.likelihoods.losses): SSIM, focal frequency, LPIPS."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from study.likelihoods.losses import (
    ALEXNET_WEIGHTS_FILENAME,
    FocalFrequencyLoss,
    PerceptualLoss,
    SSIMLoss,
    focal_frequency_loss,
)
from tests.conftest import SAMPLE as REPO_SAMPLE

SAMPLE = REPO_SAMPLE / "img_align_celeba"


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-9, 1 - 1e-9)
    return torch.log(p) - torch.log1p(-p)


@pytest.fixture(scope="module")
def real_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two real 64x64 faces (float64 HWC in [0, 1]) and a blurred copy of the first (a VAE-like reconstruction)."""
    faces = []
    for name in ("000001.jpg", "000002.jpg"):
        with Image.open(SAMPLE / name) as im:
            face = im.convert("RGB").crop((15, 40, 163, 188)).resize((64, 64), Image.BICUBIC)  # Larsen's crop
            faces.append(np.asarray(face, dtype=np.float64) / 255.0)
    blurred = gaussian_filter(faces[0], sigma=(1.0, 1.0, 0.0))
    return faces[0], faces[1], blurred


def _chw(*imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


@pytest.mark.parametrize("loss", [SSIMLoss(), SSIMLoss(multiscale=True), FocalFrequencyLoss()])
def test_common_interface(loss) -> None:
    assert loss.elbo_valid is False and type(loss).elbo_valid is False
    assert loss.param_channels(3) == 3 and loss.param_channels(1) == 1
    params = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(loss.mean(params), torch.sigmoid(params))
    torch.testing.assert_close(loss.sample(params, generator=torch.Generator()), torch.sigmoid(params))
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    out = loss.log_prob(x, params)
    assert out.shape == (2,) and torch.isfinite(out).all() and (out <= 0).all()
    out.sum().backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()
    # a perfect reconstruction costs (almost) nothing
    assert loss.log_prob(x, _logit(x)).abs().max() < 1e-5


@pytest.mark.parametrize("border", ["valid", "reflect"])
def test_ssim_matches_skimage(real_pair, border: str) -> None:
    a, b, blurred = real_pair
    ref = [
        structural_similarity(a, o, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                              channel_axis=2)
        for o in (b, blurred)
    ]
    loss = SSIMLoss(weight=2.0, border=border)
    ours = loss.similarity(_chw(a, a), _chw(b, blurred))
    if border == "valid":
        # the same definition as Wang et al.'s reference code: equal to float precision
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)
    else:
        # reflect padding also scores the 5-px border band (~30% of a 64x64 image): close on a
        # reconstruction-like pair, not equal
        assert abs(ours[1].item() - ref[1]) < 0.02
    log_p = loss.log_prob(_chw(a, a), _logit(_chw(b, blurred)))
    torch.testing.assert_close(log_p, -2.0 * (1.0 - ours), atol=1e-6, rtol=0)


def test_ms_ssim_scales() -> None:
    loss = SSIMLoss(multiscale=True)
    assert loss.scales_for(64, 64) == 3 and loss.scales_for(32, 32) == 2 and loss.scales_for(256, 256) == 5
    assert loss.scales_for(12, 12) == 2
    with pytest.raises(ValueError, match="at least 12x12"):
        loss.scales_for(11, 11)
    with pytest.raises(ValueError, match="176x176"):
        SSIMLoss(multiscale=True, num_scales=5).log_prob(torch.rand(1, 3, 64, 64), torch.zeros(1, 3, 64, 64))
    # a blurrier reconstruction scores lower
    x = torch.rand(1, 1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    smoother = torch.nn.functional.avg_pool2d(x, 7, stride=1, padding=3, count_include_pad=False)
    assert loss.similarity(x, smooth) > loss.similarity(x, smoother)


def test_ssim_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        SSIMLoss(weight=0.0)
    with pytest.raises(ValueError):
        SSIMLoss(multiscale=True, border="valid")
    with pytest.raises(ValueError):
        SSIMLoss(num_scales=3)  # scales without multiscale


def _ffl_numpy(pred, target, alpha=1.0, patch_factor=1, ave_spectrum=False, log_matrix=False) -> np.ndarray:
    """Jiang et al. 2021's formula written out loop by loop, one value per image."""
    n, c, h, w = pred.shape
    ph, pw = h // patch_factor, w // patch_factor

    def spectra(x):
        out = np.empty((n, patch_factor**2, c, ph, pw), dtype=complex)
        for i in range(patch_factor):
            for j in range(patch_factor):
                for ch in range(c):
                    patch = x[:, ch, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
                    out[:, i * patch_factor + j, ch] = np.fft.fft2(patch, norm="ortho")
        return out

    fp, ft = spectra(pred), spectra(target)
    if ave_spectrum:
        fp, ft = fp.mean(0, keepdims=True), ft.mean(0, keepdims=True)
    dist = np.abs(fp - ft) ** 2
    weight = np.abs(fp - ft) ** alpha
    if log_matrix:
        weight = np.log(weight + 1.0)
    weight = weight / weight.max(axis=(-2, -1), keepdims=True)
    loss = (weight * dist).reshape(weight.shape[0], -1).mean(1)
    return np.broadcast_to(loss, (n,))


@pytest.mark.parametrize(
    "opts",
    [{}, {"alpha": 2.0}, {"patch_factor": 2}, {"ave_spectrum": True}, {"log_matrix": True, "alpha": 0.5}],
)
def test_ffl_matches_numpy(opts: dict) -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.random((3, 2, 16, 12)), rng.random((3, 2, 16, 12))
    ours = focal_frequency_loss(torch.from_numpy(pred), torch.from_numpy(target), **opts)
    np.testing.assert_allclose(ours.numpy(), _ffl_numpy(pred, target, **opts), rtol=1e-10)
    loss = FocalFrequencyLoss(weight=3.0, **opts)
    torch.testing.assert_close(loss.log_prob(torch.from_numpy(target), _logit(torch.from_numpy(pred))), -3.0 * ours,
                               rtol=1e-6, atol=0)


def test_ffl_weight_is_detached_and_identical_is_zero() -> None:
    target = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(focal_frequency_loss(target, target), torch.zeros(2, dtype=torch.float64))
    pred = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    focal_frequency_loss(pred, target).sum().backward()
    # with a detached weight w the gradient is that of mean(w * |F(pred - target)|^2): check against autograd
    # of the same expression with w held fixed
    with torch.no_grad():
        d = torch.fft.fft2(pred - target, norm="ortho")
        w = d.abs() / d.abs().amax(dim=(-2, -1), keepdim=True)
    p2 = pred.detach().clone().requires_grad_(True)
    ((w * torch.fft.fft2(p2 - target, norm="ortho").abs().square()).flatten(1).mean(1)).sum().backward()
    torch.testing.assert_close(pred.grad, p2.grad)
    with pytest.raises(ValueError):
        focal_frequency_loss(pred, target, patch_factor=3)


# ------------------------------------------------------------------------------------------------ LPIPS
@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_perceptual_missing_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    missing = tmp_path / "nowhere" / ALEXNET_WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError, match=ALEXNET_WEIGHTS_FILENAME) as err:
        PerceptualLoss(weights_path=missing)
    assert str(missing) in str(err.value)
    # None: torch.hub's cache under $TORCH_HOME, empty here
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError, match="hub/checkpoints") as err:
        PerceptualLoss(weights_path=None)
    assert ALEXNET_WEIGHTS_FILENAME in str(err.value)


@pytest.mark.parametrize("prefix", ["", "features."])
def test_perceptual_plumbing(tmp_path: Path, no_network: None, prefix: str) -> None:
    """Plumbing only: a *randomly initialised* AlexNet stands in for the ImageNet weights, so the values are
    meaningless; this checks loading (both key layouts), shapes, finiteness, gradients and modes."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features.state_dict()
    path = tmp_path / ALEXNET_WEIGHTS_FILENAME
    torch.save({prefix + k: v for k, v in features.items()}, path)

    loss = PerceptualLoss(weight=2.0, weights_path=path)
    assert loss.elbo_valid is False
    torch.testing.assert_close(getattr(loss.lpips.net.slice1, "0").weight, features["0.weight"])
    torch.testing.assert_close(getattr(loss.lpips.net.slice5, "10").bias, features["10.bias"])
    assert all(not p.requires_grad for p in loss.parameters())

    loss.train()
    assert loss.training and not loss.lpips.training

    x = torch.rand(2, 3, 64, 64)
    params = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = loss.log_prob(x, params)
    assert out.shape == (2,) and torch.isfinite(out).all() and (out <= 0).all()
    out.sum().backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()
    assert loss.log_prob(x, _logit(x)).abs().max() < 1e-4
    grey = loss.log_prob(torch.rand(2, 1, 32, 32), torch.randn(2, 1, 32, 32))
    assert grey.shape == (2,) and torch.isfinite(grey).all()


def test_perceptual_rejects_wrong_file(tmp_path: Path, no_network: None) -> None:
    path = tmp_path / "not_alexnet.pth"
    torch.save({"0.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="AlexNet"):
        PerceptualLoss(weights_path=path)
