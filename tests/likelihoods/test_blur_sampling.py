"""Blur-likelihood draws come from the density that scores them (Bredell et al. 2023, as reconstructed in
``study/likelihoods/blur.py``, choice 7).

For the ``network`` estimator, p(x | z) = N(mu(z), Sigma_k) with k = k_gamma(z); ``sample_given_z`` must draw from
exactly that Gaussian. The reference is dense float64 maths written here: the kernel's OTF as an explicit DFT sum,
lambda = (|K|^2 / (|K|^2 + C)^2 + eps) / s^2, and the circulant precision P = Re(F^H diag(lambda) F) / D with the
dense DFT matrix F. With P = L L^T, the whitened sample covariance L^T S L of M draws must have every eigenvalue
within the Marchenko-Pastur range (1 +- sqrt(D / M))^2 of the identity (plus slack); the delta kernel's covariance
(the pre-fix behaviour) lies orders of magnitude outside it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from study.data.celeba import load_image, preprocess
from study.likelihoods.blur import BlurErrorLikelihood
from study.likelihoods.gaussian import GaussianLikelihood
from study.likelihoods.ycbcr import YCbCrProductLikelihood
from tests.conftest import SAMPLE

SIZE = 8  # pixels per side: D = 64 dimensions per channel
M = 20_000  # draws
LATENT = 4


@pytest.fixture(scope="module")
def grey_mean_params() -> torch.Tensor:
    """Decoder output whose mean is a real face: logit of the BT.601 grey of a CelebA sample at 8 x 8, (1, 1, 8, 8)."""
    rgb = preprocess(load_image(SAMPLE / "img_align_celeba" / "000003.jpg"), SIZE).astype(np.float64) / 255.0
    grey = (rgb @ np.array([0.299, 0.587, 0.114])).clip(0.02, 0.98)
    return torch.logit(torch.from_numpy(grey)).float().view(1, 1, SIZE, SIZE)


def _network_likelihood(kernel_size: int = 3) -> BlurErrorLikelihood:
    torch.manual_seed(0)
    lik = BlurErrorLikelihood(kernel_size=kernel_size, estimator="network", latent_dim=LATENT, noise_mode="fixed",
                              noise_sigma=0.1, wiener_c=0.025, eps=1e-3)
    with torch.no_grad():  # a kernel that depends on z (the initial network ignores it)
        lik.kernel_net.net[-1].weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return lik


def dense_precision(kernel: np.ndarray, h: int, w: int, wiener_c: float, eps: float, noise_sigma: float) -> np.ndarray:
    """Dense float64 circulant precision (D, D), D = h w, raster order, of one kernel (k, k) centred at k // 2."""
    k = kernel.shape[-1]
    taps = np.arange(k) - k // 2
    e_h = np.exp(-2j * np.pi * np.outer(np.arange(h), taps) / h)  # (h, k)
    e_w = np.exp(-2j * np.pi * np.outer(np.arange(w), taps) / w)  # (w, k)
    otf = e_h @ kernel @ e_w.T  # (h, w): K[u, v] = sum_ab k[a, b] e^{-2 pi i (u a / h + v b / w)}
    power = np.abs(otf) ** 2
    lam = (power / (power + wiener_c) ** 2 + eps) / noise_sigma**2  # (h, w)
    rows, cols = np.divmod(np.arange(h * w), w)
    dft = np.exp(-2j * np.pi * (np.outer(rows, rows) / h + np.outer(cols, cols) / w))  # (D, D)
    precision = (dft.conj().T @ np.diag(lam.reshape(-1)) @ dft).real / (h * w)
    return 0.5 * (precision + precision.T)


def whitened_eigenvalues(draws: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Eigenvalues of L^T S L, S the sample covariance of ``draws`` (M, D) about the known ``mean`` (D,), P = L L^T:
    all 1 for draws from N(mean, P^-1), up to sampling noise."""
    chol = np.linalg.cholesky(precision)
    white = (draws - mean) @ chol  # (M, D): rows L^T e
    return np.linalg.eigvalsh(white.T @ white / draws.shape[0])


def _bounds(d: int) -> tuple[float, float]:
    # Marchenko-Pastur edges for D / M, widened by 0.05 for finite-size fluctuations of the extreme eigenvalues.
    r = math.sqrt(d / M)
    return (1 - r) ** 2 - 0.05, (1 + r) ** 2 + 0.05


@torch.no_grad()
def test_network_draws_have_the_covariance_of_the_kernel_from_z(grey_mean_params):
    lik = _network_likelihood()
    z = torch.randn(1, LATENT, generator=torch.Generator().manual_seed(2))
    kernel = lik.kernel_net(z)[0].double().numpy()  # (3, 3): the kernel log_prob_given_z scores with
    assert kernel[1, 1] < 0.9  # really a blur, not the delta

    gen = torch.Generator().manual_seed(3)
    draws = lik.sample_given_z(grey_mean_params.expand(M, -1, -1, -1), z.expand(M, -1), generator=gen)
    mean = torch.sigmoid(grey_mean_params).double().reshape(-1).numpy()
    precision = dense_precision(kernel, SIZE, SIZE, lik.wiener_c, lik.eps, 0.1)
    eig = whitened_eigenvalues(draws.double().reshape(M, -1).numpy(), mean, precision)
    lo, hi = _bounds(SIZE * SIZE)
    assert lo < eig.min() and eig.max() < hi, (eig.min(), eig.max())

    # The delta kernel's precision, what sample() drew before, is far from these draws: the check discriminates.
    eig_delta = whitened_eigenvalues(draws.double().reshape(M, -1).numpy(), mean,
                                     dense_precision(np.ones((1, 1)), SIZE, SIZE, lik.wiener_c, lik.eps, 0.1))
    assert eig_delta.max() > 2 * hi


@torch.no_grad()
def test_network_draws_match_log_prob_given_z_per_image(grey_mean_params):
    """Two images with different z in one batch: each image's draws follow the precision of its own kernel, the
    one ``log_prob_given_z`` uses (checked via the density itself: its Hessian-free quadratic form)."""
    lik = _network_likelihood(kernel_size=5)
    z = torch.randn(2, LATENT, generator=torch.Generator().manual_seed(4)) * 3.0
    kernels = lik.kernel_net(z).double().numpy()  # (2, 5, 5)
    assert np.abs(kernels[0] - kernels[1]).max() > 0.05  # the two images really have different kernels
    params = grey_mean_params.expand(2, -1, -1, -1)
    gen = torch.Generator().manual_seed(5)
    draws = lik.sample_given_z(params.repeat(M // 2, 1, 1, 1), z.repeat(M // 2, 1), generator=gen)
    draws = draws.double().reshape(M // 2, 2, -1).numpy()  # (M/2, image, D)
    mean = torch.sigmoid(grey_mean_params).double().reshape(-1).numpy()
    m = M // 2
    r = math.sqrt(SIZE * SIZE / m)
    lo, hi = (1 - r) ** 2 - 0.05, (1 + r) ** 2 + 0.05
    for i in range(2):
        precision = dense_precision(kernels[i], SIZE, SIZE, lik.wiener_c, lik.eps, 0.1)
        eig = whitened_eigenvalues(draws[:, i], mean, precision)
        assert lo < eig.min() and eig.max() < hi, (i, eig.min(), eig.max())
        # log_prob_given_z is the Gaussian with that same precision (normaliser included), on these draws.
        x = torch.from_numpy(draws[:3, i]).float().view(3, 1, SIZE, SIZE)
        ours = lik.log_prob_given_z(x, params[:1].expand(3, -1, -1, -1), z[i : i + 1].expand(3, -1)).double()
        res = draws[:3, i] - mean
        _, logdet = np.linalg.slogdet(precision)
        ref = -0.5 * np.einsum("bi,ij,bj->b", res, precision, res) + 0.5 * logdet - 0.5 * res.shape[1] * math.log(
            2 * math.pi)
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4)


def test_network_sample_without_z_or_kernel_raises(grey_mean_params):
    """Without z the network's kernel is unknown: no silent fallback to the delta kernel."""
    with pytest.raises(ValueError, match="sample_given_z"):
        _network_likelihood().sample(grey_mean_params)


@torch.no_grad()
def test_wiener_ls_draws_use_the_delta_kernel_as_documented(grey_mean_params):
    """The plug-in estimator has no kernel without an x: its draws are the delta-kernel Gaussian, isotropic with
    variance s^2 / ((1 + C)^-2 + eps) (choice 7 of the module docstring)."""
    lik = BlurErrorLikelihood(kernel_size=3, estimator="wiener_ls", noise_mode="fixed", noise_sigma=0.1)
    z = torch.zeros(M, LATENT)
    draws = lik.sample_given_z(grey_mean_params.expand(M, -1, -1, -1), z, generator=torch.Generator().manual_seed(6))
    mean = torch.sigmoid(grey_mean_params).double().reshape(-1).numpy()
    precision = dense_precision(np.ones((1, 1)), SIZE, SIZE, lik.wiener_c, lik.eps, 0.1)
    np.testing.assert_allclose(np.diag(precision), ((1 + lik.wiener_c) ** -2 + lik.eps) / 0.01, rtol=1e-12)
    eig = whitened_eigenvalues(draws.double().reshape(M, -1).numpy(), mean, precision)
    lo, hi = _bounds(SIZE * SIZE)
    assert lo < eig.min() and eig.max() < hi, (eig.min(), eig.max())


@torch.no_grad()
def test_ycbcr_product_draws_luma_with_the_kernel_from_z(grey_mean_params):
    """In the YCbCr product (Dorta et al. 2018, Eq. 8-12) the luma draw uses the luma family's z-aware sampler."""
    blur = _network_likelihood()
    lik = YCbCrProductLikelihood(blur, GaussianLikelihood("fixed", sigma=0.05), factor=2)
    z = torch.randn(1, LATENT, generator=torch.Generator().manual_seed(7))
    chroma = torch.zeros(1, 2, SIZE, SIZE)
    params = torch.cat([grey_mean_params, chroma], dim=1)  # (1, 3, 8, 8): Y params, then Cb, Cr params
    draws = lik.sample_given_z(params.expand(M, -1, -1, -1), z.expand(M, -1), generator=torch.Generator().manual_seed(8))
    assert draws.shape == (M, 3, SIZE, SIZE)
    kernel = blur.kernel_net(z)[0].double().numpy()
    precision = dense_precision(kernel, SIZE, SIZE, blur.wiener_c, blur.eps, 0.1)
    mean = torch.sigmoid(grey_mean_params).double().reshape(-1).numpy()
    eig = whitened_eigenvalues(draws[:, 0].double().reshape(M, -1).numpy(), mean, precision)
    lo, hi = _bounds(SIZE * SIZE)
    assert lo < eig.min() and eig.max() < hi, (eig.min(), eig.max())
