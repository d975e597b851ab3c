"""Pixel metrics against scikit-image / SciPy / NumPy references, on real CelebA images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from study.metrics import pixel
from tests.conftest import SAMPLE

CELEBA = SAMPLE / "img_align_celeba"


@pytest.fixture(scope="module")
def real_images() -> np.ndarray:
    """Eight real CelebA images, float64 (8, 64, 64, 3) in [0, 1]."""
    paths = [CELEBA / f"{i:06d}.jpg" for i in range(1, 9)]
    imgs = [np.asarray(Image.open(p).convert("RGB").resize((64, 64), Image.BILINEAR)) for p in paths]
    return np.stack(imgs).astype(np.float64) / 255.0


@pytest.fixture(scope="module")
def blurred(real_images: np.ndarray) -> np.ndarray:
    # Blur each image spatially only (sigma 0 along the image and channel axes).
    return ndimage.gaussian_filter(real_images, sigma=(0, 1.2, 1.2, 0))


@pytest.fixture(scope="module")
def noised(real_images: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(real_images + rng.normal(0, 0.05, real_images.shape), 0, 1)


def to_torch(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).to(dtype)  # (N, H, W, C) -> (N, C, H, W)


@pytest.mark.parametrize("other", ["blurred", "noised"])
def test_mse_psnr_ssim_match_skimage(real_images, other, request):
    fake = request.getfixturevalue(other)
    x, y = to_torch(fake), to_torch(real_images)
    mse = pixel.mse(x, y)
    assert mse.shape == (8,)
    ref_mse = ((fake - real_images) ** 2).reshape(8, -1).mean(1)
    np.testing.assert_allclose(mse.numpy(), ref_mse, rtol=1e-5)
    np.testing.assert_allclose(pixel.mse_255(x, y).numpy(), ref_mse * 255**2, rtol=1e-5)
    ref_pm1 = ((2 * fake - 2 * real_images) ** 2).reshape(8, -1).mean(1)  # both mapped to [-1, 1]
    np.testing.assert_allclose(pixel.mse_pm1(x, y).numpy(), ref_pm1, rtol=1e-5)

    ref_psnr = [peak_signal_noise_ratio(r, f, data_range=1.0) for r, f in zip(real_images, fake)]
    np.testing.assert_allclose(pixel.psnr(x, y).numpy(), ref_psnr, rtol=1e-5)

    ref_ssim = [
        structural_similarity(
            r, f, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2
        )
        for r, f in zip(real_images, fake)
    ]
    np.testing.assert_allclose(pixel.ssim(x, y).numpy(), ref_ssim, atol=1e-4)


def test_identical_images():
    x = torch.rand(2, 3, 16, 16)
    assert torch.all(pixel.mse(x, x) == 0)
    assert torch.all(torch.isinf(pixel.psnr(x, x)))
    assert torch.allclose(pixel.ssim(x, x), torch.ones(2), atol=1e-6)
    with pytest.raises(ValueError):
        pixel.mse(x, x[:1])


def test_laplacian_variance_matches_scipy(real_images, blurred):
    for imgs in (real_images, blurred):
        grey = imgs @ np.array([0.299, 0.587, 0.114])  # (N, H, W)
        ref = [np.var(ndimage.laplace(g)) for g in grey]
        np.testing.assert_allclose(pixel.laplacian_variance(to_torch(imgs, torch.float64)).numpy(), ref, rtol=1e-10)
        np.testing.assert_allclose(pixel.laplacian_variance(to_torch(imgs)).numpy(), ref, rtol=1e-4)


def test_gradient_magnitude_matches_scipy_sobel(real_images):
    grey = real_images @ np.array([0.299, 0.587, 0.114])
    ref = [np.mean(np.hypot(ndimage.sobel(g, axis=1), ndimage.sobel(g, axis=0))) for g in grey]
    np.testing.assert_allclose(pixel.gradient_magnitude(to_torch(real_images, torch.float64)).numpy(), ref, rtol=1e-10)


def test_grey_input_is_used_as_is(real_images):
    x = to_torch(real_images, torch.float64)
    grey = pixel.to_grey(x)
    assert grey.shape == (8, 1, 64, 64)
    torch.testing.assert_close(pixel.laplacian_variance(grey), pixel.laplacian_variance(x))


@pytest.mark.parametrize("measure", ["laplacian_variance", "gradient_magnitude"])
def test_blur_lowers_sharpness_ratio(real_images, blurred, measure):
    x, xb = to_torch(real_images), to_torch(blurred)
    assert pixel.sharpness_ratio(x, x, measure) == pytest.approx(1.0)
    ratio = pixel.sharpness_ratio(xb, x, measure)
    assert 0 < ratio < 0.8
    # More blur, lower ratio.
    more = to_torch(ndimage.gaussian_filter(real_images, sigma=(0, 2.5, 2.5, 0)))
    assert pixel.sharpness_ratio(more, x, measure) < ratio


def test_sharpness_ratio_rejects_unknown_measure(real_images):
    x = to_torch(real_images)
    with pytest.raises(ValueError):
        pixel.sharpness_ratio(x, x, "tenengrad")


def test_variance_loss_matches_numpy_formula(real_images, blurred):
    # The formula is layout-agnostic: pass the on-disk (N, H, W, C) arrays and the library (N, C, H, W) tensors.
    ref = np.mean(np.var(real_images, axis=0)) - np.mean(np.var(blurred, axis=0))
    assert pixel.variance_loss(real_images, blurred) == pytest.approx(ref, rel=1e-12)
    assert pixel.variance_loss(to_torch(real_images), to_torch(blurred)) == pytest.approx(ref, rel=1e-5)
    # Against the mean image (a decoder that ignores z): all the real variance is lost.
    mean_img = np.broadcast_to(real_images.mean(0), real_images.shape)
    assert pixel.variance_loss(real_images, mean_img) == pytest.approx(np.mean(np.var(real_images, axis=0)))


def test_variance_loss_ratio_to_mse(real_images, blurred):
    x, xb = to_torch(real_images, torch.float64), to_torch(blurred, torch.float64)
    expected = pixel.variance_loss(x, xb) / pixel.mse(x, xb).mean().item()
    assert pixel.variance_loss_mse_ratio(x, xb) == pytest.approx(expected)


def test_variance_loss_requires_equal_sizes(real_images):
    with pytest.raises(ValueError, match="equal-size"):
        pixel.variance_loss(real_images, real_images[:7])


def test_pixel_variance_chunking(monkeypatch):
    x = np.random.default_rng(1).random((5, 3, 7, 9))
    full = pixel.pixel_variance(x)
    monkeypatch.setattr(pixel, "_VARIANCE_CHUNK_ELEMENTS", 11)  # forces 2-column chunks and a ragged tail
    assert pixel.pixel_variance(x) == pytest.approx(full, rel=1e-13)
    assert full == pytest.approx(np.mean(np.var(x, axis=0)), rel=1e-13)


@settings(max_examples=25, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 5)),
        elements=st.floats(0, 1, allow_nan=False),
    ),
    st.integers(0, 2**31 - 1),
)
def test_variance_loss_property(real, seed):
    gen = np.random.default_rng(seed).random(real.shape)
    ref = np.mean(np.var(real, axis=0)) - np.mean(np.var(gen, axis=0))
    assert pixel.variance_loss(real, gen) == pytest.approx(ref, rel=1e-9, abs=1e-12)
