"""Every likelihood family and estimator through the evaluator's full metric set, on real CelebA pixels.

Each case builds the tiny VAE a trial config describes (``study.train.build_model``, the code the sweep and the
evaluate stage use) on two real sample images resized to 16 x 16 and runs :func:`study.evaluate.evaluate_model`
with every metric group. Checked: the run completes, every reported metric is finite, exactly the metrics that
cannot exist here are listed as unavailable (LPIPS / FID without weights; NLL / ELBO for configurations that are
not normalised densities), and the IWAE bound and ELBO equal a computation written here from the same z draws.
For the blur family's ``network`` estimator that computation is independent of the library's likelihood code: the
kernel's OTF is a dense DFT sum and log p(x | z) is ``torch.distributions.MultivariateNormal`` with the dense
float64 circulant precision F^H diag(lambda) F / D (Bredell et al. 2023 as reconstructed in
``study/likelihoods/blur.py``), and the bound is Burda et al. 2016, Eq. 8 with ``torch.logsumexp``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from study.config import TrialConfig
from study.data.celeba import load_image, preprocess
from study.data.color import downsample_chroma, rgb_to_ycbcr, upsample_chroma
from study.evaluate import SEED_OFFSETS, evaluate_model
from study.likelihoods import build_likelihood
from study.train import build_model
from tests.conftest import SAMPLE

SIZE = 16  # pixels per side: the smallest the VAE and SSIM (11 px window) both accept
N = 2  # images
K = 8  # importance samples (one chunk: K * N <= iwae_batch_size, so the draws are randn((K, N, d)))
FACTOR = 4  # chroma downsampling of the YCbCr cases

#: Metrics that cannot be computed in a test: no LPIPS / Inception weights (TORCH_HOME is empty).
WEIGHTLESS = {"test_lpips", "test_lpips_std", "test_fid_recon", "test_fid_samples"}
DENSITY_METRICS = {"test_nll", "test_nll_std", "test_nll_bits_per_dim", "test_elbo", "test_elbo_std"}

# (case id, likelihood config, colour, normalised density of x given z?)
CASES = [
    ("gaussian-fixed", {"family": "gaussian", "gaussian": {"sigma_mode": "fixed", "sigma": 0.2}}, "rgb", True),
    ("gaussian-learned_global", {"family": "gaussian", "gaussian": {"sigma_mode": "learned_global"}}, "rgb", True),
    ("gaussian-per_pixel", {"family": "gaussian", "gaussian": {"sigma_mode": "per_pixel"}}, "rgb", True),
    ("structured-nf3", {"family": "structured", "structured": {"neighbourhood_size": 3}}, "rgb", True),
    ("structured-nf5", {"family": "structured", "structured": {"neighbourhood_size": 5}}, "rgb", True),
    ("structured-basis", {"family": "structured", "structured": {"num_basis": 3}}, "rgb", True),
    ("structured-dilations", {"family": "structured", "structured": {"dilations": [1, 2]}}, "rgb", True),
    ("structured-dilations-basis",
     {"family": "structured", "structured": {"dilations": [1, 2], "num_basis": 2}}, "rgb", True),
    ("structured-ycbcr", {"family": "structured", "structured": {"neighbourhood_size": 3}}, "ycbcr", True),
    # wiener_ls estimates each image's kernel from x itself: log_prob is not a density in x (plug-in)
    ("blur-wiener_ls", {"family": "blur", "blur": {"estimator": "wiener_ls", "kernel_size": 3}}, "rgb", False),
    ("blur-network", {"family": "blur", "blur": {"estimator": "network", "kernel_size": 3}}, "rgb", True),
    ("blur-network-fixed-noise",
     {"family": "blur", "blur": {"estimator": "network", "kernel_size": 5, "noise_mode": "fixed",
                                 "noise_sigma": 0.2}}, "rgb", True),
    ("blur-network-ycbcr", {"family": "blur", "blur": {"estimator": "network", "kernel_size": 3}}, "ycbcr", True),
    ("laplace-learned_global", {"family": "laplace", "laplace": {"scale_mode": "learned_global"}}, "rgb", True),
    ("laplace-per_pixel", {"family": "laplace", "laplace": {"scale_mode": "per_pixel"}}, "rgb", True),
    ("ssim", {"family": "ssim", "ssim": {"weight": 100.0}}, "rgb", False),
    ("ffl", {"family": "ffl", "ffl": {"weight": 100.0}}, "rgb", False),
]


@pytest.fixture(autouse=True)
def no_pretrained_weights(tmp_path, monkeypatch):
    """An empty torch hub: LPIPS and FID must report themselves unavailable, never fall back to random nets."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))


@pytest.fixture(scope="module")
def rgb_images() -> torch.Tensor:
    """Two aligned CelebA sample images, Larsen-cropped and resized to 16 x 16: float (2, 3, 16, 16) in [0, 1]."""
    arrays = [preprocess(load_image(SAMPLE / "img_align_celeba" / f"00000{i}.jpg"), SIZE) for i in (1, 2)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _model_space(rgb: torch.Tensor, color: str) -> torch.Tensor:
    """The library's YCbCr layout (Y, then the 4 x 4 area-averaged chroma repeated over each block) or RGB."""
    if color == "rgb":
        return rgb
    ycc = rgb_to_ycbcr(rgb)  # (N, 3, H, W)
    chroma = upsample_chroma(downsample_chroma(ycc[:, 1:], FACTOR), FACTOR)  # (N, 2, H, W)
    return torch.cat([ycc[:, :1], chroma], dim=1).clamp(0.0, 1.0)


def _build(likelihood: dict, color: str) -> torch.nn.Module:
    config = TrialConfig.model_validate({"model": {"latent_dim": 4, "width": 4}, "likelihood": likelihood})
    torch.manual_seed(0)
    model = build_model(config, (3, SIZE, SIZE), color=color, chroma_factor=FACTOR)
    blur = getattr(model.likelihood, "luma", model.likelihood)
    if getattr(blur, "kernel_net", None) is not None:
        # The initial kernel network ignores z (output weights ~1e-3): make the kernel depend on z, so the
        # check below tells k_gamma(z) from a kernel of any other z (or the delta).
        with torch.no_grad():
            blur.kernel_net.net[-1].weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(SEED_OFFSETS[name])  # evaluate_model(seed=0)


@torch.no_grad()
def _replayed_bound(model, x: torch.Tensor, log_px) -> tuple[torch.Tensor, torch.Tensor]:
    """(IWAE NLL (N,), single-sample ELBO (N,)) in float64 from the evaluator's own draws, with log p(x | z)
    given by ``log_px(x_rep (M, C, H, W), z (M, d)) -> (M,)``."""
    mu, logvar = model.encode(x)  # (N, d)
    q = Normal(mu.double(), torch.exp(0.5 * logvar).double())
    eps = torch.randn((K, *mu.shape), generator=_generator("iwae"))  # (K, N, d), as the evaluator draws them
    z = mu + torch.exp(0.5 * logvar) * eps  # (K, N, d)
    x_rep = x.repeat(K, 1, 1, 1)  # row k * N + n is image n
    log_w = (log_px(x_rep, z.reshape(K * N, -1)).view(K, N) + Normal(0.0, 1.0).log_prob(z.double()).sum(-1)
             - q.log_prob(z.double()).sum(-1))  # (K, N)
    nll = -(torch.logsumexp(log_w, dim=0) - math.log(K))
    eps1 = torch.randn(mu.shape, generator=_generator("elbo"))  # (N, d)
    z1 = mu + torch.exp(0.5 * logvar) * eps1
    kl = 0.5 * (mu.double().square() + logvar.double().exp() - 1.0 - logvar.double()).sum(-1)
    return nll, log_px(x, z1) - kl


def _dense_blur_log_prob(lik, x: torch.Tensor, params: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """log N(x; sigmoid(params), P^-1) per image, float64, with the dense circulant precision of each kernel:
    P = Re(F^H diag(lambda) F) / D, lambda = (|K|^2 / (|K|^2 + C)^2 + eps) / s^2 (per channel, channels
    independent), K the OTF as an explicit DFT sum of the centred kernel."""
    b, c, h, w = x.shape
    d = h * w
    k = kernel.double()  # (B, k, k)
    half = k.shape[-1] // 2
    taps = torch.arange(k.shape[-1], dtype=torch.float64) - half
    e_h = torch.exp(-2j * math.pi * torch.outer(torch.arange(h, dtype=torch.float64), taps) / h)  # (H, k)
    e_w = torch.exp(-2j * math.pi * torch.outer(torch.arange(w, dtype=torch.float64), taps) / w)  # (W, k)
    otf = torch.einsum("nab,ua,vb->nuv", k.to(torch.complex128), e_h, e_w)  # (B, H, W)
    power = otf.abs().square()
    lam = (power / (power + lik.wiener_c).square() + lik.eps) * math.exp(-2.0 * float(lik.log_noise_sigma))
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # pixel n = i * W + j
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    phase = torch.outer(rows, rows) / h + torch.outer(cols, cols) / w  # frequency (u, v) x pixel (i, j)
    dft = torch.exp(-2j * math.pi * phase)  # (D, D), F[omega, n]
    precision = torch.einsum("wm,bw,wn->bmn", dft.conj(), lam.reshape(b, d).to(torch.complex128), dft).real / d
    precision = 0.5 * (precision + precision.transpose(1, 2))  # (B, D, D), symmetric to round-off
    mean = torch.sigmoid(params.double()).reshape(b, c, d)
    dist = MultivariateNormal(mean, precision_matrix=precision.unsqueeze(1).expand(b, c, d, d))
    return dist.log_prob(x.double().reshape(b, c, d)).sum(1)  # (B,)


@pytest.mark.parametrize(("likelihood", "color", "density"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_family_goes_through_the_full_metric_set(rgb_images, likelihood, color, density):
    images = _model_space(rgb_images, color)
    model = _build(likelihood, color)
    result = evaluate_model(model, images, num_importance_samples=K, batch_size=N, seed=0, color=color)

    assert result.settings["elbo_valid"] is density
    expected_missing = WEIGHTLESS | (set() if density else DENSITY_METRICS)
    assert set(result.unavailable) == expected_missing, result.unavailable
    assert not set(result.metrics) & set(result.unavailable)
    for name in ("test_mse_255", "test_psnr", "test_ssim", "test_sharpness_ratio", "test_variance_loss_recon",
                 "test_variance_loss_samples", "test_sample_sharpness_ratio", "test_avg_kl",
                 "test_mutual_information", "test_marginal_kl"):
        assert name in result.metrics, name
    bad = {k: v for k, v in result.metrics.items() if not math.isfinite(v)}
    assert not bad, bad
    assert np.isfinite(result.per_image.to_numpy(dtype=np.float64)).all()
    if not density:
        return

    # The bound and the ELBO from the same draws, through the likelihood's z-aware entry point.
    lik = model.likelihood
    nll, elbo = _replayed_bound(
        model, images, lambda x, z: lik.log_prob_given_z(x, model.decode(z), z).double()
    )
    np.testing.assert_allclose(result.per_image["nll"], nll.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(result.per_image["elbo"], elbo.numpy(), rtol=1e-6, atol=1e-4)
    dims = lik.num_dims((3, SIZE, SIZE))
    assert result.metrics["test_nll_bits_per_dim"] == pytest.approx(nll.mean().item() / (dims * math.log(2)),
                                                                      rel=1e-6)


@pytest.mark.parametrize("kernel_size", [3, 5])
@torch.no_grad()
def test_network_kernel_bound_matches_dense_gaussian_maths(rgb_images, kernel_size):
    """IWAE NLL and ELBO of the network-kernel blur likelihood against dense float64 Gaussian maths: the kernel is
    k_gamma(z) of each draw, log p(x | z) a MultivariateNormal with the dense circulant precision."""
    likelihood = {"family": "blur", "blur": {"estimator": "network", "kernel_size": kernel_size}}
    model = _build(likelihood, "rgb")
    lik = model.likelihood
    result = evaluate_model(model, rgb_images, num_importance_samples=K, batch_size=N, seed=0)

    def dense(x, z):
        return _dense_blur_log_prob(lik, x, model.decode(z), lik.kernel_net(z))

    nll, elbo = _replayed_bound(model, rgb_images, dense)
    np.testing.assert_allclose(result.per_image["nll"], nll.numpy(), rtol=2e-5, atol=1e-2)
    np.testing.assert_allclose(result.per_image["elbo"], elbo.numpy(), rtol=2e-5, atol=1e-2)
    assert result.metrics["test_nll"] == pytest.approx(nll.mean().item(), rel=2e-5)

    # The same maths with the delta kernel (what a z-blind likelihood would use) is far off: the check has teeth.
    def delta(x, z):
        return _dense_blur_log_prob(lik, x, model.decode(z), torch.ones(z.shape[0], 1, 1))

    nll_delta, _ = _replayed_bound(model, rgb_images, delta)
    assert (nll_delta - nll).abs().min() > 100 * 2e-5 * nll.abs().max()


def test_lpips_family_without_weights_is_reported_unavailable():
    """The LPIPS family needs local AlexNet weights; without them building it fails naming the file, rather than
    training or evaluating with a random network."""
    config = TrialConfig.model_validate({"likelihood": {"family": "lpips"}})
    with pytest.raises(FileNotFoundError, match="alexnet-owt"):
        build_likelihood(config.likelihood)
