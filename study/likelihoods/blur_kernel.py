"""Blur kernels for the blur-error likelihood: OTFs, circular blur, closed-form and learned kernel estimates.

A blur kernel ``k`` is a float (kh, kw) array (usually square and odd, ``kernel_size`` x ``kernel_size``),
non-negative and summing to 1, whose centre entry ``[kh // 2, kw // 2]`` is the zero offset. It acts on an
image x (H, W) by **circular convolution** (true convolution, not cross-correlation)::

    (k (*) x)[n] = sum_{a, b} k[a, b] x[(n - (a - kh // 2, b - kw // 2)) mod (H, W)],

which in the Fourier domain is ``fft2(k (*) x) = K * fft2(x)`` with ``K = psf2otf(k, (H, W))``: zero-pad the
kernel to the image size, circularly shift its centre to (0, 0), then ``fft2``. This is the convention of
Bredell's Wiener-deconvolution code (``gbredell/W_DIP:utils/deconv_utils.py::convert_psf2otf``)
and of MATLAB's ``psf2otf``.

Two estimators of the kernel relating a reconstruction x_hat to its input x (x_hat ~= k (*) x), used by
``study.likelihoods.blur.BlurErrorLikelihood``:

- ``least_squares_kernel`` + ``project_kernel`` (estimator ``"wiener_ls"``): the exact least-squares kernel on
  the kernel support, per image, from the normal equations assembled in the Fourier domain, then clamped
  non-negative and normalised to sum 1.
- ``KernelNetwork`` (estimator ``"network"``): k_gamma(z), an MLP from the latent code to a softmax kernel,
  trained in the alternating "kernel step" (G_gamma(z) in Bredell et al. 2023; see ``study.likelihoods.blur``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Tikhonov term of the least-squares normal equations, relative to their mean diagonal (the image energy):
#: small enough that a well-posed estimate is exact to ~1e-9 in float64, large enough that a flat or
#: all-zero image (singular normal equations) still gives a finite answer.
_LS_RIDGE = 1e-10


def _check_kernel_fits(kernel_shape: tuple[int, int], shape: tuple[int, int]) -> None:
    if kernel_shape[0] > shape[0] or kernel_shape[1] > shape[1]:
        raise ValueError(f"kernel {tuple(kernel_shape)} is larger than the image {tuple(shape)}")


def psf2otf(kernel: Tensor, shape: tuple[int, int]) -> Tensor:
    """Optical transfer function K of a blur kernel on an (H, W) periodic grid.

    Args:
        kernel: float (..., kh, kw), any real values (normally non-negative, sum 1); centre at
            ``[kh // 2, kw // 2]``.
        shape: the image size (H, W) in pixels; needs kh <= H and kw <= W.

    Returns:
        complex (..., H, W), the unnormalised ``fft2`` of the zero-padded, centre-to-origin-shifted kernel,
        so ``fft2(k (*) x) = K * fft2(x)`` for circular convolution. K[0, 0] = sum(k) (= 1 for a normalised
        kernel) and K(-omega) = conj(K(omega)) since k is real.

    Raises:
        ValueError: the kernel is larger than the image.
    """
    kh, kw = kernel.shape[-2:]
    h, w = int(shape[0]), int(shape[1])
    _check_kernel_fits((kh, kw), (h, w))
    padded = kernel.new_zeros(*kernel.shape[:-2], h, w)  # (..., H, W)
    padded[..., :kh, :kw] = kernel
    # Move the kernel centre to (0, 0) so the OTF has no linear phase (a centred delta gives K == 1).
    padded = torch.roll(padded, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
    return torch.fft.fft2(padded)  # (..., H, W) complex


def circular_blur(x: Tensor, kernel: Tensor) -> Tensor:
    """Circular convolution k (*) x of every channel of an image with its image's kernel.

    Args:
        x: float (B, C, H, W), any range (images in [0, 1] stay in [0, 1] for a normalised kernel).
        kernel: float (B, kh, kw) or (kh, kw) (shared by the batch); the same kernel for all C channels.

    Returns:
        float (B, C, H, W), same dtype as x.

    Raises:
        ValueError: the kernel is larger than the image.
    """
    otf = psf2otf(kernel.to(x.dtype), x.shape[-2:])  # (B, H, W) or (H, W)
    if otf.dim() == 3:
        otf = otf.unsqueeze(1)  # (B, 1, H, W): one kernel per image, shared by its channels
    return torch.fft.ifft2(torch.fft.fft2(x) * otf).real  # (B, C, H, W)


def delta_kernel(
    kernel_size: int, batch: int | None = None, dtype: torch.dtype | None = None, device=None
) -> Tensor:
    """The identity (no-blur) kernel: 1 at the centre, 0 elsewhere; (k, k), or (batch, k, k) if given."""
    k = torch.zeros(kernel_size, kernel_size, dtype=dtype, device=device)
    k[kernel_size // 2, kernel_size // 2] = 1.0
    return k if batch is None else k.expand(batch, kernel_size, kernel_size).clone()


def gaussian_kernel(kernel_size: int, sigma: float, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """Isotropic Gaussian blur kernel, float (k, k), centred, truncated to the support and normalised to 1.

    ``sigma`` is in pixels (> 0); ``sigma == 0`` gives ``delta_kernel``.
    """
    if sigma < 0:
        raise ValueError("sigma must be non-negative")
    if sigma == 0:
        return delta_kernel(kernel_size, dtype=dtype, device=device)
    t = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    g = torch.exp(-0.5 * (t[:, None].square() + t[None, :].square()) / sigma**2)
    return (g / g.sum()).to(dtype=dtype or torch.get_default_dtype(), device=device)


def _solve_dtype(device: torch.device) -> torch.dtype:
    # The normal equations square the image's condition number: solve in float64 wherever it exists.
    return torch.float32 if device.type == "mps" else torch.float64


def least_squares_kernel(x: Tensor, x_hat: Tensor, kernel_size: int) -> Tensor:
    """Exact least-squares blur kernel per image: argmin_k sum_c ||x_hat_c - k (*) x_c||^2 on a k x k support.

    The design matrix's columns are the circular shifts x[n - o] of the input, one per kernel offset o, so
    the normal equations G k = b are (with acf = ifft2(sum_c |X_c|^2), ccf = ifft2(sum_c conj(X_c) X_hat_c),
    both exact circular correlations)::

        G[o, o'] = sum_{c, n} x_c[n - o] x_c[n - o'] = acf[o - o'],   b[o] = sum_{c, n} x_c[n - o] x_hat_c[n] = ccf[o].

    They are solved in float64 (float32 on MPS) with a Tikhonov term of ``1e-10`` times the mean diagonal,
    which leaves a well-posed solution unchanged to ~1e-9 and keeps flat images finite. No gradient flows
    (the caller's stop-gradient).

    Args:
        x: the input images, float (B, C, H, W) in [0, 1].
        x_hat: the reconstructions, float (B, C, H, W) in [0, 1].
        kernel_size: the kernel support, odd, <= min(H, W).

    Returns:
        float (B, kernel_size, kernel_size), dtype of x, unconstrained (may be negative, need not sum to 1);
        see ``project_kernel``.

    Raises:
        ValueError: shapes differ, or the kernel does not fit the image.
    """
    if x.shape != x_hat.shape or x.dim() != 4:
        raise ValueError(f"x and x_hat must both be (B, C, H, W); got {tuple(x.shape)}, {tuple(x_hat.shape)}")
    h, w = x.shape[-2:]
    _check_kernel_fits((kernel_size, kernel_size), (h, w))
    with torch.no_grad():
        dt = _solve_dtype(x.device)
        spec_x = torch.fft.fft2(x.detach().to(dt))  # (B, C, H, W) complex
        spec_y = torch.fft.fft2(x_hat.detach().to(dt))
        acf = torch.fft.ifft2(spec_x.abs().square().sum(1)).real  # (B, H, W)
        ccf = torch.fft.ifft2((spec_x.conj() * spec_y).sum(1)).real  # (B, H, W)
        c = kernel_size // 2
        off = torch.arange(kernel_size, device=x.device) - c
        oh = off[:, None].expand(kernel_size, kernel_size).reshape(-1)  # (k^2,) row offset of entry [a, b]
        ow = off[None, :].expand(kernel_size, kernel_size).reshape(-1)  # (k^2,) column offset
        gram = acf[:, (oh[:, None] - oh[None, :]) % h, (ow[:, None] - ow[None, :]) % w]  # (B, k^2, k^2)
        rhs = ccf[:, oh % h, ow % w]  # (B, k^2)
        ridge = _LS_RIDGE * acf[:, 0, 0] + torch.finfo(dt).tiny ** 0.5  # (B,); acf[0] = mean diag of G
        eye = torch.eye(kernel_size**2, dtype=dt, device=x.device)
        sol = torch.linalg.solve(gram + ridge[:, None, None] * eye, rhs.unsqueeze(-1))  # (B, k^2, 1)
    return sol.reshape(-1, kernel_size, kernel_size).to(x.dtype)  # (B, k, k)


def project_kernel(kernel: Tensor) -> Tensor:
    """Make kernels valid blur kernels: clamp negative entries to 0, then divide by the sum.

    Clamping (not ``|k|`` as in W_DIP) is used because a negative lobe of a least-squares fit means
    "no blur there", not "blur of the opposite sign". A kernel with no positive entry becomes the delta.

    Args:
        kernel: float (B, kh, kw) or (kh, kw).

    Returns:
        same shape and dtype, entries in [0, 1], each kernel summing to 1.
    """
    k = kernel.clamp_min(0.0)
    total = k.sum(dim=(-2, -1), keepdim=True)  # (B, 1, 1)
    delta = torch.zeros_like(k)
    delta[..., k.shape[-2] // 2, k.shape[-1] // 2] = 1.0
    ok = total > torch.finfo(k.dtype).tiny
    return torch.where(ok, k / torch.where(ok, total, torch.ones_like(total)), delta)


class KernelNetwork(nn.Module):
    """k_gamma(z): predicts one blur kernel per image from its latent code (G_gamma(z), Bredell et al. 2023).

    An MLP ``latent_dim -> hidden_dim -> SiLU -> hidden_dim -> SiLU -> kernel_size^2`` followed by a softmax
    over the ``kernel_size^2`` entries, so every kernel is positive and sums to 1 by construction. An MLP (not
    the transposed-convolution net of one public re-implementation) because a 5 x 5 kernel is 25 numbers.
    The output layer starts with tiny weights (std 1e-3) and a bias equal to the log of a centred Gaussian of
    ``init_sigma`` pixels, so the initial kernel is that Gaussian for every z (a VAE's first reconstructions
    are blurry); ``init_sigma = 0`` starts near the delta (centre logit 0, others -8).

    Args:
        latent_dim: size of z (> 0).
        kernel_size: odd kernel side (>= 1).
        hidden_dim: width of the two hidden layers (> 0).
        init_sigma: standard deviation of the initial kernel in pixels (>= 0).

    Raises:
        ValueError: a non-positive size or an even kernel_size or a negative init_sigma.
    """

    def __init__(self, latent_dim: int, kernel_size: int = 5, hidden_dim: int = 128, init_sigma: float = 1.0):
        super().__init__()
        if latent_dim <= 0 or hidden_dim <= 0:
            raise ValueError("latent_dim and hidden_dim must be positive")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if init_sigma < 0:
            raise ValueError("init_sigma must be non-negative")
        self.latent_dim = int(latent_dim)
        self.kernel_size = int(kernel_size)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, kernel_size**2),
        )
        out = self.net[-1]
        with torch.no_grad():
            out.weight.normal_(0.0, 1e-3)
            if init_sigma > 0:
                logits = torch.log(gaussian_kernel(kernel_size, init_sigma, dtype=torch.float64))
            else:
                logits = torch.full((kernel_size, kernel_size), -8.0, dtype=torch.float64)
                logits[kernel_size // 2, kernel_size // 2] = 0.0
            out.bias.copy_(logits.reshape(-1).to(out.bias.dtype))

    def forward(self, z: Tensor) -> Tensor:
        """Kernels for latent codes z, float (B, latent_dim) -> float (B, k, k), entries in (0, 1), sum 1."""
        logits = self.net(z)  # (B, k^2)
        return torch.softmax(logits, dim=-1).reshape(-1, self.kernel_size, self.kernel_size)  # (B, k, k)


__all__ = [
    "KernelNetwork",
    "circular_blur",
    "delta_kernel",
    "gaussian_kernel",
    "least_squares_kernel",
    "project_kernel",
    "psf2otf",
]
