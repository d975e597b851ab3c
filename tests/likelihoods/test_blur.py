"""Tests of the blur-error (Wiener-weighted) likelihood and its kernel estimators.

References are built independently of the module: numpy OTFs and explicit DFT matrices, spatial circular
convolution by ``np.roll``, ``np.linalg.lstsq`` on an explicit design matrix, and ``torch.distributions``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from study.likelihoods.blur import BlurErrorLikelihood, circular_blur, psf2otf, wiener_weights
from study.likelihoods.blur_kernel import (
    KernelNetwork,
    gaussian_kernel,
    least_squares_kernel,
    project_kernel,
)
from tests.conftest import SAMPLE

CELEBA = SAMPLE / "img_align_celeba" / "000001.jpg"
DT = torch.float64


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-7, atol: float = 1e-10) -> None:
    """numpy's allclose check (torch.testing.assert_close costs seconds of one-off imports on first use)."""
    np.testing.assert_allclose(actual.detach().numpy(), expected.detach().numpy(), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------ independent references
def np_otf(kernel: np.ndarray, h: int, w: int) -> np.ndarray:
    """psf2otf in numpy: zero-pad, put the kernel centre at (0, 0), unnormalised fft2."""
    kh, kw = kernel.shape
    pad = np.zeros((h, w))
    pad[:kh, :kw] = kernel
    return np.fft.fft2(np.roll(pad, (-(kh // 2), -(kw // 2)), axis=(0, 1)))


def np_lambda(kernel: np.ndarray, h: int, w: int, c: float, eps: float) -> np.ndarray:
    p = np.abs(np_otf(kernel, h, w)) ** 2
    return p / (p + c) ** 2 + eps


def np_circular_blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Spatial circular convolution of an (..., H, W) image: sum_ab k[a, b] x[n - (a - c, b - c)]."""
    kh, kw = kernel.shape
    out = np.zeros_like(img)
    for a in range(kh):
        for b in range(kw):
            out += kernel[a, b] * np.roll(img, (a - kh // 2, b - kw // 2), axis=(-2, -1))
    return out


def dense_precision(lam: np.ndarray) -> np.ndarray:
    """P = Re(F^H diag(lambda) F) / D with F the explicit unnormalised 2-D DFT matrix (row-major pixels)."""
    h, w = lam.shape

    def dft(n: int) -> np.ndarray:
        j = np.arange(n)
        return np.exp(-2j * np.pi * np.outer(j, j) / n)

    f = np.kron(dft(h), dft(w))  # (D, D)
    p = f.conj().T @ np.diag(lam.reshape(-1)) @ f / (h * w)
    assert np.abs(p.imag).max() < 1e-9  # lambda is symmetric, so P is real
    return p.real


def random_kernel(size: int, gen: torch.Generator) -> torch.Tensor:
    k = torch.rand(size, size, generator=gen, dtype=DT) ** 2
    return k / k.sum()


def load_celeba(size: int, grey: bool) -> torch.Tensor:
    """The real photograph 000001.jpg, resized to size x size, float64 (1, C, size, size) in [0, 1]."""
    from PIL import Image

    img = Image.open(CELEBA).convert("L" if grey else "RGB").resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float64) / 255.0
    arr = arr[None] if grey else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy()).unsqueeze(0)


# --------------------------------------------------------------------------------------------- OTF and blur
@pytest.mark.parametrize("shape,ksize", [((6, 7), 3), ((8, 8), 5), ((9, 6), 5)])
def test_psf2otf_and_circular_blur_match_spatial_convolution(shape, ksize):
    gen = torch.Generator().manual_seed(0)
    k = random_kernel(ksize, gen)
    x = torch.rand(2, 3, *shape, generator=gen, dtype=DT)
    np.testing.assert_allclose(psf2otf(k, shape).numpy(), np_otf(k.numpy(), *shape), atol=1e-12)
    expected = np_circular_blur(x.numpy(), k.numpy())
    np.testing.assert_allclose(circular_blur(x, k.expand(2, ksize, ksize)).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(circular_blur(x, k).numpy(), expected, atol=1e-12)


def test_wiener_weights_values():
    gen = torch.Generator().manual_seed(1)
    k = torch.stack([random_kernel(5, gen), random_kernel(5, gen)])  # (2, 5, 5)
    lam = wiener_weights(k, (7, 8), 0.025, 1e-3)
    assert lam.shape == (2, 7, 8)
    for b in range(2):
        np.testing.assert_allclose(lam[b].numpy(), np_lambda(k[b].numpy(), 7, 8, 0.025, 1e-3), rtol=1e-12)
    # DC: K(0) = sum k = 1 -> (1 + C)^-2 + eps; range [eps, 1 / (4C) + eps].
    assert lam[:, 0, 0].sub(1.025**-2 + 1e-3).abs().max() < 1e-12
    assert lam.min() >= 1e-3 and lam.max() <= 10.0 + 1e-3 + 1e-12


# ----------------------------------------------------------------------------------------------- log_prob
def test_delta_kernel_gives_isotropic_gaussian():
    # k = delta -> K == 1 -> lambda0 = (1 + C)^-2 + eps everywhere, i.e. N(mu, sigma^2 = 1 / lambda0) per pixel;
    # for C = 0.025, eps = 1e-3: lambda0 = 0.9528144..., sigma = 1.0244620...
    c, eps = 0.025, 1e-3
    lam0 = (1 + c) ** -2 + eps
    assert lam0 == pytest.approx(0.9528144, abs=1e-7)
    lik = BlurErrorLikelihood(kernel_size=5, wiener_c=c, eps=eps)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 2, 8, 7, generator=gen, dtype=DT)
    params = torch.randn(3, 2, 8, 7, generator=gen, dtype=DT)
    delta = torch.zeros(5, 5, dtype=DT)
    delta[2, 2] = 1.0
    ref = Normal(torch.sigmoid(params), lam0**-0.5).log_prob(x).flatten(1).sum(1)
    assert_close(lik.log_prob(x, params, kernel=delta), ref, rtol=1e-12, atol=1e-9)
    # x_hat == x (a perfect reconstruction) makes the closed-form estimate the delta as well.
    mu = torch.sigmoid(params)
    assert (lik.estimate_kernel(mu, mu) - delta).abs().max() < 1e-8  # exact up to the 1e-10 ridge
    assert_close(lik.log_prob(mu, params), lik.log_prob(mu, params, kernel=delta), rtol=1e-8, atol=0)


@pytest.mark.parametrize("shape,ksize", [((6, 6), 3), ((7, 8), 5), ((8, 6), 5)])
def test_log_prob_matches_dense_multivariate_normal(shape, ksize):
    c, eps = 0.05, 2e-3
    lik = BlurErrorLikelihood(kernel_size=ksize, wiener_c=c, eps=eps)
    gen = torch.Generator().manual_seed(3)
    b, ch = 2, 3
    x = torch.rand(b, ch, *shape, generator=gen, dtype=DT)
    params = torch.randn(b, ch, *shape, generator=gen, dtype=DT)
    kernels = torch.stack([random_kernel(ksize, gen) for _ in range(b)])  # (B, k, k), not deltas
    got = lik.log_prob(x, params, kernel=kernels)
    mu = torch.sigmoid(params)
    for i in range(b):
        prec = dense_precision(np_lambda(kernels[i].numpy(), *shape, c, eps))  # (D, D)
        assert np.linalg.eigvalsh(prec).min() > 0  # checked here: torch's own check costs seconds of imports
        mvn = MultivariateNormal(mu[i].reshape(ch, -1), precision_matrix=torch.from_numpy(prec), validate_args=False)
        ref = mvn.log_prob(x[i].reshape(ch, -1)).sum()
        assert_close(got[i], ref, rtol=1e-10, atol=1e-8)


def test_log_prob_gradients_reach_params_not_kernel():
    lik = BlurErrorLikelihood(kernel_size=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 8, 8, generator=gen, dtype=DT)
    params = torch.randn(2, 1, 8, 8, generator=gen, dtype=DT, requires_grad=True)
    kernel = random_kernel(3, gen).expand(2, 3, 3).clone().requires_grad_(True)
    lik.log_prob(x, params, kernel=kernel).sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0
    assert kernel.grad is None  # the kernel is a stop-gradient constant
    # The closed-form path: finite gradient, and the estimate is a valid kernel with no history.
    params.grad = None
    out = lik.log_prob(x, params)
    assert out.shape == (2,) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(params.grad).all()
    k = lik.estimate_kernel(x, torch.sigmoid(params))
    assert k.shape == (2, 3, 3) and not k.requires_grad
    assert (k >= 0).all() and torch.allclose(k.sum((1, 2)), torch.ones(2, dtype=DT))
    # float32 inputs give float32 output close to the float64 value (the kernel solve runs in float64).
    lp32 = lik.log_prob(x.float(), params.detach().float())
    assert lp32.dtype == torch.float32
    np.testing.assert_allclose(lp32.numpy(), out.detach().numpy(), rtol=1e-5)


# -------------------------------------------------------------------------------------- kernel estimation
def test_least_squares_kernel_matches_numpy_lstsq():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 2, 8, 9, generator=gen, dtype=DT)
    y = torch.rand(2, 2, 8, 9, generator=gen, dtype=DT)  # arbitrary target: tests the LS itself
    got = least_squares_kernel(x, y, 3)
    for b in range(2):
        cols = [np.roll(x[b].numpy(), (a - 1, d - 1), axis=(-2, -1)).reshape(-1) for a in range(3) for d in range(3)]
        sol, *_ = np.linalg.lstsq(np.stack(cols, 1), y[b].numpy().reshape(-1), rcond=None)
        np.testing.assert_allclose(got[b].numpy().reshape(-1), sol, atol=1e-8)


@pytest.mark.parametrize("size,grey", [(64, True), (32, False)])
def test_closed_form_recovers_gaussian_blur_on_real_photo(size, grey):
    x = load_celeba(size, grey)  # (1, C, size, size) in [0, 1]
    k_true = gaussian_kernel(5, 1.0, dtype=DT)
    x_hat = torch.from_numpy(np_circular_blur(x.numpy(), k_true.numpy()))  # independent spatial blur
    lik = BlurErrorLikelihood(kernel_size=5)
    k_est = lik.estimate_kernel(x, x_hat)[0]
    # Noise-free: the least-squares problem is consistent, so the estimate is exact up to the 1e-10 ridge.
    assert (k_est - k_true).abs().max() < 1e-6
    # With N(0, 0.005^2) pixel noise on the reconstruction the estimate is still within 0.01 of the kernel.
    gen = torch.Generator().manual_seed(6)
    noisy = x_hat + 0.005 * torch.randn(x_hat.shape, generator=gen, dtype=DT)
    assert (lik.estimate_kernel(x, noisy)[0] - k_true).abs().max() < 1e-2


def test_project_kernel():
    k = torch.tensor([[[-1.0, 2.0, 0.0], [1.0, 1.0, -3.0], [0.0, 0.0, 0.0]], [[-1.0] * 3] * 3], dtype=DT)
    p = project_kernel(k)
    assert_close(p[0], torch.tensor([[0, 0.5, 0], [0.25, 0.25, 0], [0, 0, 0]], dtype=DT))
    assert_close(p[1], torch.tensor([[0, 0, 0], [0, 1.0, 0], [0, 0, 0]], dtype=DT))  # delta


# ---------------------------------------------------------------------------------------------- sampling
def test_sample_has_the_precision_spectrum():
    c, eps, shape = 0.025, 1e-3, (8, 7)
    d = shape[0] * shape[1]
    lik = BlurErrorLikelihood(kernel_size=5, wiener_c=c, eps=eps)
    k = gaussian_kernel(5, 1.0, dtype=DT)
    n = 6000
    params = torch.zeros(n, 1, *shape, dtype=DT)  # mu = 0.5
    gen = torch.Generator().manual_seed(7)
    s = lik.sample(params, generator=gen, kernel=k)
    noise = s - 0.5
    power = torch.fft.fft2(noise).abs().square().mean(0)[0]  # unnormalised FFT: E|fft2(e)|^2 = D / lambda
    expected = d / torch.from_numpy(np_lambda(k.numpy(), *shape, c, eps))
    # Each |fft2(e)|^2 / (D / lambda) is exponential (or chi2_1) with variance <= 2: the mean of 6000 has
    # sd <= 0.018, so 0.1 is > 5 sd for each of the 56 frequencies.
    assert ((power / expected) - 1).abs().max() < 0.1
    assert noise.mean().abs() < 0.05
    # Reproducible with a seeded generator; the default (delta) kernel gives isotropic variance 1 / lambda0.
    again = lik.sample(params, generator=torch.Generator().manual_seed(7), kernel=k)
    assert_close(s, again)
    iso = lik.sample(params, generator=gen) - 0.5
    assert iso.var().item() == pytest.approx(1 / ((1 + c) ** -2 + eps), rel=0.03)


# ---------------------------------------------------------------------------------------- kernel network
def test_kernel_network_outputs_valid_kernels_near_init():
    net = KernelNetwork(latent_dim=4, kernel_size=5, hidden_dim=16).double()
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(8), dtype=DT)
    k = net(z)
    assert k.shape == (6, 5, 5) and (k >= 0).all()
    assert_close(k.sum((1, 2)), torch.ones(6, dtype=DT))
    assert (k - gaussian_kernel(5, 1.0, dtype=DT)).abs().max() < 1e-2  # starts at the sigma = 1 Gaussian
    near_delta = KernelNetwork(latent_dim=4, kernel_size=3, hidden_dim=16, init_sigma=0.0).double()(z)
    assert (near_delta[:, 1, 1] > 0.99).all()


def test_kernel_step_learns_and_only_touches_the_kernel_network():
    torch.manual_seed(9)
    lik = BlurErrorLikelihood(kernel_size=3, estimator="network", latent_dim=4, hidden_dim=32).double()
    encoder = torch.nn.Linear(2, 4).double()  # stands in for the VAE
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(8, 1, 8, 8, generator=gen, dtype=DT)
    z = encoder(torch.randn(8, 2, generator=gen, dtype=DT))
    k_true = torch.tensor([[0, 0, 0], [0, 0.2, 0.8], [0, 0, 0]], dtype=DT)  # far from the initial Gaussian
    x_hat = circular_blur(x, k_true)

    # Kernel step: gradient only on kernel_net, and the loss falls.
    loss0 = lik.kernel_loss(x, x_hat, z)
    loss0.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lik.kernel_parameters())
    # Plain gradient descent by hand: constructing a torch.optim optimiser costs seconds of one-off imports.
    for _ in range(40):
        lik.zero_grad(set_to_none=True)
        lik.kernel_loss(x, x_hat, z).backward()
        with torch.no_grad():
            for p in lik.kernel_parameters():
                p -= 0.5 * p.grad
    assert lik.kernel_loss(x, x_hat, z).item() < 0.05 * loss0.item()

    # VAE step: the detached kernel passes no gradient to the kernel network, only to the decoder output.
    lik.zero_grad(set_to_none=True)
    params = torch.randn(8, 1, 8, 8, generator=gen, dtype=DT, requires_grad=True)
    kernel = lik.estimate_kernel(x, torch.sigmoid(params), z)
    assert kernel.shape == (8, 3, 3) and not kernel.requires_grad
    lik.log_prob(x, params, kernel=kernel).sum().backward()
    assert params.grad is not None
    assert all(p.grad is None for p in lik.kernel_parameters())
    assert all(p.grad is None for p in encoder.parameters())


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 4},
        {"kernel_size": 0},
        {"kernel_size": -3},
        {"wiener_c": 0.0},
        {"wiener_c": -1.0},
        {"eps": 0.0},
        {"estimator": "oracle"},
        {"estimator": "network"},
        {"estimator": "network", "latent_dim": 0},
    ],
)
def test_bad_constructor_args_raise(kwargs):
    with pytest.raises(ValueError):
        BlurErrorLikelihood(**kwargs)


def test_bad_call_args_raise():
    x = torch.rand(2, 1, 4, 4, dtype=DT)
    with pytest.raises(ValueError):
        BlurErrorLikelihood(kernel_size=5).log_prob(x, x)  # kernel larger than the image
    with pytest.raises(ValueError):
        BlurErrorLikelihood(kernel_size=3).log_prob(x, x[:, :, :3])  # shape mismatch
    with pytest.raises(ValueError):
        BlurErrorLikelihood(kernel_size=3).log_prob(x, x, kernel=torch.ones(3, 3, 3, dtype=DT) / 9)  # batch 3 != 2
    net_lik = BlurErrorLikelihood(kernel_size=3, estimator="network", latent_dim=2)
    with pytest.raises(ValueError):
        net_lik.log_prob(x, x)  # the network estimator needs the kernel from estimate_kernel(x, x_hat, z)
    with pytest.raises(ValueError):
        net_lik.estimate_kernel(x, x)  # ... which needs z
    with pytest.raises(ValueError):
        BlurErrorLikelihood().kernel_loss(x, x, torch.zeros(2, 2))
    with pytest.raises(ValueError):
        wiener_weights(torch.ones(1, 1), (4, 4), 0.0, 1e-3)
    with pytest.raises(ValueError):
        KernelNetwork(latent_dim=2, kernel_size=2)
    assert BlurErrorLikelihood().param_channels(3) == 3
    assert math.isfinite(BlurErrorLikelihood(kernel_size=3).log_prob(x, x).sum().item())


def test_global_noise_scale_nests_the_learned_sigma_gaussian():
    """With k = delta and scale s, the blur likelihood is N(mu, s^2 / lambda0) per dimension, and s learns."""
    import math as _math

    from torch.distributions import Normal

    from study.likelihoods.blur import BlurErrorLikelihood

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lik = BlurErrorLikelihood(kernel_size=3, noise_mode="learned_global", noise_sigma=0.05)
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64, generator=gen)
    params = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=gen)
    delta = torch.zeros(3, 3, dtype=torch.float64)
    delta[1, 1] = 1.0
    lam0 = (1.0 + lik.wiener_c) ** -2 + lik.eps
    expected = Normal(torch.sigmoid(params), 0.05 / _math.sqrt(lam0)).log_prob(x).sum(dim=(1, 2, 3))
    got = lik.log_prob(x, params, kernel=delta)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-8)
    got.sum().backward()
    assert lik.log_noise_sigma.grad is not None and torch.isfinite(lik.log_noise_sigma.grad)
