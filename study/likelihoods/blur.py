"""Blur-error (Wiener-weighted) likelihood after Bredell et al. 2023.

Source: G. Bredell, K. Flouris, K. Chaitanya, E. Erdil, E. Konukoglu, "Explicitly Minimizing the Blur Error
of Variational Autoencoders", ICLR 2023 (arXiv 2304.05939). The paper's equations could not be read; this
module is a **reconstruction after Bredell et al. 2023**, inferred from the paper's abstract, third-party
summaries and the same author's Wiener-deconvolution code (``gbredell/W_DIP``), not a checked reproduction.

Model. Per image, a blur kernel k (non-negative, sum 1) relates the reconstruction to the input,
x_hat ~= k (*) x (circular convolution, ``study.likelihoods.blur_kernel``). With K = psf2otf(k, (H, W)) and
the Wiener filter W = conj(K) / (|K|^2 + C), every frequency omega of the residual r = x - mu(z) is weighted by

    lambda(omega) = |W(omega)|^2 + eps = |K|^2 / (|K|^2 + C)^2 + eps,

and p(x | z) = N(x; mu(z), Sigma_k) per channel with the circulant precision Sigma_k^{-1} = F^H diag(lambda) F / D
(F the unnormalised 2-D DFT matrix, D = H W; real because lambda(-omega) = lambda(omega)). Hence, in nats
per image, summed over the C channels::

    log p(x | z) = sum_c [ -1/2 (1/D) sum_omega lambda |R_c|^2 + 1/2 sum_omega log lambda - D/2 log(2 pi) ],

R_c = fft2(r_c) unnormalised; the code uses ``norm="ortho"`` (R / sqrt(D)), which absorbs the 1/D.
log|Sigma_k| = -sum_omega log lambda, so the density is normalised and the ELBO comparable with the other
likelihoods. Frequencies that the blur attenuates (|K|^2 ~ C) get weight up to 1/(4C) = 10 for C = 0.025,
while unblurred ones (|K| = 1) get (1 + C)^-2 + eps: the error a blurry decoder makes is penalised most.

Every choice made in the reconstruction (check them against the paper before claiming reproduction):

1. lambda = |K|^2 / (|K|^2 + C)^2 + eps (the Wiener filter's power); C = 0.025 is W_DIP's ``wienerF_otf``
   default, eps = 1e-3 a floor that keeps Sigma_k positive definite where K -> 0. No extra global noise scale: with
   k = delta the model is an isotropic Gaussian with sigma^2 = 1 / ((1 + C)^-2 + eps) (~1.05 for the
   defaults), i.e. a scaled L2 loss (whether the paper adds a noise scale is not known; see 10).
2. One kernel per image, shared by all channels (this reconstruction's assumption); channels independent given z.
3. Boundaries are periodic (circular convolution, circulant covariance), so the FFT diagonalises Sigma_k.
4. The kernel is always a stop-gradient constant in ``log_prob`` (the alternation described for Bredell et al.
   2023: the VAE step uses sg(k)). lambda depends on k only, so the log-determinant carries no gradient to the VAE.
5. Kernel estimators (``estimator``):
   - ``"wiener_ls"`` (default): closed form, per image, from sg(mu) and x: the exact least-squares kernel on
     the kernel_size x kernel_size support (normal equations built in the Fourier domain, solved in float64
     with a 1e-10 relative Tikhonov term), then clamped at 0 and normalised to sum 1. This replaces the
     paper's kernel network by its optimum for that one image. Caveat: the kernel then depends on x, so the
     log_prob is a plug-in (profile) Gaussian density, normalised for a fixed kernel but not a density over x
     given z (minus its Hessian in x is not the precision it uses); hence ``elbo_valid`` is False for this
     estimator: its ELBO and NLL are loss values, never ranked as likelihoods. It is the default because it has
     no extra network and no extra training step.
   - ``"network"``: k = k_gamma(z) from ``KernelNetwork`` (the paper's G_gamma(z)); a proper p(x | z)
     (``elbo_valid`` True). Trained by the kernel step below; it needs z: ``log_prob_given_z`` and
     ``sample_given_z`` (the entry points the metrics use), or ``log_prob`` / ``sample`` with ``kernel=``.
6. The alternation (as described for Bredell et al. 2023), every iteration:
   (1) VAE step: minimise -ELBO with ``log_prob(x, dist_params, kernel=sg(k))``, k from ``estimate_kernel``;
   (2) kernel step (network only): minimise ``kernel_loss(x, sg(x_hat), sg(z))`` = per-image
       ||sg(x_hat) - k_gamma(sg(z)) (*) x||^2 (mean over the batch) w.r.t. the kernel network only.
7. Sampling draws from the kernel the density uses (``sample_given_z``): for ``"network"`` k_gamma(z), the
   kernel ``log_prob_given_z`` scores with. For ``"wiener_ls"`` there is no such kernel without an x: the
   plug-in kernel is fitted between x and the decoded mean, and fitted between the decoded mean and itself it
   is exactly the delta, so its draws use the delta kernel (isotropic noise of variance
   s^2 / ((1 + C)^-2 + eps)), which is not the precision its ``log_prob`` scores an x with. ``sample`` with no
   ``kernel`` does the same for ``"wiener_ls"`` and raises for ``"network"`` (it has no z). Sample grids and
   sample metrics show the mean E[x | z] (``VAE.sample_prior``), which no kernel enters.
8. Kernel network: an MLP z -> 2 x SiLU(hidden_dim) -> softmax over kernel_size^2 logits, initialised to a
   sigma = 1 px Gaussian (``KernelNetwork``); the paper's architecture is unknown.
10. An optional global noise scale s (``noise_mode``, ``noise_sigma``; added by the study):
   the precision becomes lambda / s^2, adding -C D log s to log p. With s = 1 (``fixed``, the default here)
   the model is exactly the one above; a learned s makes the learned-sigma Gaussian the nested k = delta case, so
   the weighting, not a different noise level, is what the comparison measures. ``params.yaml`` learns it.
9. Mean = sigmoid(decoder output), as in ``gaussian.py``; kernel_size = 5 by default (W_DIP's 21 px kernels
   were for 256-px deblurring). Non-negativity of the least-squares kernel by clamping, not |k|.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from study.likelihoods.base import Likelihood
from study.likelihoods.blur_kernel import (
    KernelNetwork,
    circular_blur,
    delta_kernel,
    least_squares_kernel,
    project_kernel,
    psf2otf,
)

_LOG_2PI = math.log(2.0 * math.pi)


def estimator_elbo_valid(estimator: str) -> bool:
    """Whether the blur likelihood with this kernel ``estimator`` is a normalised density of x given z.

    ``"network"``: yes, the kernel k_gamma(z) depends on z only. ``"wiener_ls"``: no, the kernel is fitted to x
    itself (module docstring, choice 5). Needs no model, so configs can be tagged before anything is built.

    Raises:
        ValueError: an unknown estimator.
    """
    if estimator not in ("wiener_ls", "network"):
        raise ValueError(f"unknown estimator {estimator!r}")
    return estimator == "network"


def wiener_weights(kernel: Tensor, shape: tuple[int, int], wiener_c: float, eps: float) -> Tensor:
    """Per-frequency precision weights lambda(omega) = |K|^2 / (|K|^2 + C)^2 + eps of a blur kernel.

    lambda(omega) are the eigenvalues of the circulant precision Sigma_k^{-1} = F^H diag(lambda) F / D, whose
    eigenvectors are the DFT modes (F the unnormalised DFT matrix, F / sqrt(D) unitary).

    Args:
        kernel: float (B, kh, kw) or (kh, kw); normally non-negative with sum 1.
        shape: image size (H, W) in pixels, kh <= H, kw <= W.
        wiener_c: the Wiener constant C (> 0), in squared OTF units (|K| <= 1 for a normalised kernel).
        eps: precision floor (> 0).

    Returns:
        float (B, H, W) (or (H, W)), dtype of the kernel, in [eps, 1 / (4C) + eps] for a normalised kernel
        with C <= 1; symmetric, lambda(-omega) = lambda(omega). Pixel-unit precision per orthonormal frequency.

    Raises:
        ValueError: wiener_c or eps not positive, or a kernel larger than the image.
    """
    if wiener_c <= 0 or eps <= 0:
        raise ValueError("wiener_c and eps must be positive")
    otf = psf2otf(kernel, shape)  # (B, H, W) complex
    power = otf.real.square() + otf.imag.square()  # |K|^2, (B, H, W)
    return power / (power + wiener_c).square() + eps


class BlurErrorLikelihood(Likelihood):
    """Blur-error (Wiener-weighted) Gaussian likelihood after Bredell et al. 2023 (reconstruction, see module).

    The decoder outputs C channels; the mean is ``sigmoid(dist_params)`` in (0, 1). The covariance is circulant per
    channel with precision spectrum ``wiener_weights(k)``, k one blur kernel per image.

    Args:
        kernel_size: side of the estimated kernel in pixels, odd and >= 1 (5: a VAE's blur at 64 px spans a
            few pixels; Bredell's 21 px kernels in W_DIP were for 256-px deblurring).
        wiener_c: Wiener constant C (> 0); 0.025 is the default of W_DIP's ``wienerF_otf``.
        eps: precision floor (> 0), in the same units as lambda.
        estimator: ``"wiener_ls"`` (closed-form least squares per image) or ``"network"`` (``KernelNetwork``
            of z, trained by ``kernel_loss``).
        latent_dim: size of z; required when ``estimator == "network"``.
        hidden_dim: width of the kernel network's hidden layers.

    Raises:
        ValueError: an even or non-positive kernel_size, a non-positive wiener_c or eps, an unknown estimator,
            or the network estimator without a positive latent_dim.
    """

    def __init__(
        self,
        kernel_size: int = 5,
        wiener_c: float = 0.025,
        eps: float = 1e-3,
        estimator: Literal["wiener_ls", "network"] = "wiener_ls",
        latent_dim: int | None = None,
        hidden_dim: int = 128,
        noise_mode: Literal["fixed", "learned_global"] = "fixed",
        noise_sigma: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        if not wiener_c > 0:
            raise ValueError(f"wiener_c must be positive, got {wiener_c!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if estimator not in ("wiener_ls", "network"):
            raise ValueError(f"unknown estimator {estimator!r}")
        self.kernel_size = kernel_size
        self.wiener_c = float(wiener_c)
        self.eps = float(eps)
        self.estimator = estimator
        self.kernel_net: KernelNetwork | None = None
        if noise_mode not in ("fixed", "learned_global"):
            raise ValueError(f"unknown noise_mode {noise_mode!r}")
        if not noise_sigma > 0:
            raise ValueError(f"noise_sigma must be positive, got {noise_sigma!r}")
        self.noise_mode = noise_mode
        log_s = torch.tensor(math.log(noise_sigma))
        if noise_mode == "learned_global":
            self.log_noise_sigma = torch.nn.Parameter(log_s)
        else:
            self.register_buffer("log_noise_sigma", log_s)
        if estimator == "network":
            if latent_dim is None or latent_dim <= 0:
                raise ValueError("estimator='network' needs a positive latent_dim")
            self.kernel_net = KernelNetwork(latent_dim, kernel_size, hidden_dim=hidden_dim)

    # ----------------------------------------------------------------------------------------------- kernels
    @property
    def elbo_valid(self) -> bool:  # type: ignore[override]
        """True only for ``"network"``: the plug-in ``"wiener_ls"`` kernel is a function of x, so its log_prob is
        not a normalised density of x given z (module docstring, choice 5)."""
        return estimator_elbo_valid(self.estimator)

    def param_channels(self, image_channels: int) -> int:
        return image_channels

    def kernel_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of the kernel step (the kernel network's); empty for ``wiener_ls``.

        Keep them out of the VAE optimiser: they get no gradient from the ELBO, but an optimiser that sees
        zero-filled grads (``zero_grad(set_to_none=False)``) would still move them by momentum/weight decay.
        """
        return [] if self.kernel_net is None else list(self.kernel_net.parameters())

    def estimate_kernel(self, x: Tensor, x_hat: Tensor, z: Tensor | None = None) -> Tensor:
        """The per-image blur kernel for the VAE step, a stop-gradient constant.

        Args:
            x: input images, float (B, C, H, W) in [0, 1].
            x_hat: reconstructions (``mean(dist_params)``), float (B, C, H, W) in [0, 1]; detached here.
            z: latent codes, float (B, latent_dim); required (and the only input used) for ``"network"``.

        Returns:
            float (B, kernel_size, kernel_size), non-negative, each summing to 1, no autograd history.

        Raises:
            ValueError: ``"network"`` without z, or a kernel larger than the image.
        """
        if self.estimator == "network":
            if z is None:
                raise ValueError("estimator='network' needs the latent codes z")
            assert self.kernel_net is not None
            with torch.no_grad():
                return self.kernel_net(z.detach()).to(x.dtype)  # (B, k, k)
        raw = least_squares_kernel(x.detach(), x_hat.detach(), self.kernel_size)  # (B, k, k)
        return project_kernel(raw)

    def kernel_loss(self, x: Tensor, x_hat: Tensor, z: Tensor) -> Tensor:
        """Loss of the kernel step: mean over the batch of ||sg(x_hat) - k_gamma(sg(z)) (*) x||^2.

        Only the kernel network receives gradients (x, x_hat and z are detached).

        Args:
            x: input images, float (B, C, H, W) in [0, 1].
            x_hat: reconstructions, float (B, C, H, W) in [0, 1].
            z: latent codes, float (B, latent_dim).

        Returns:
            float scalar >= 0, squared [0, 1] pixel units summed over C, H, W, averaged over B.

        Raises:
            ValueError: the likelihood has no kernel network (estimator ``"wiener_ls"``).
        """
        if self.kernel_net is None:
            raise ValueError("kernel_loss needs estimator='network'")
        kernel = self.kernel_net(z.detach())  # (B, k, k), carries gradient to kernel_net only
        predicted = circular_blur(x.detach(), kernel)  # (B, C, H, W)
        return (x_hat.detach() - predicted).square().flatten(1).sum(1).mean()

    def log_prob_given_z(self, x: Tensor, dist_params: Tensor, z: Tensor) -> Tensor:
        """``log_prob`` with the kernel from ``estimate_kernel(x, sg(mean), z)`` (needed by the network)."""
        kernel = self.estimate_kernel(x, self.mean(dist_params).detach(), z)
        return self.log_prob(x, dist_params, kernel=kernel)

    def auxiliary_parameters(self) -> list[torch.nn.Parameter]:
        return self.kernel_parameters()

    def auxiliary_loss(self, x: Tensor, dist_params: Tensor, z: Tensor) -> Tensor | None:
        """The kernel step of the alternation (network estimator only)."""
        if self.kernel_net is None:
            return None
        return self.kernel_loss(x, self.mean(dist_params), z)

    def precision_spectrum(self, kernel: Tensor, shape: tuple[int, int]) -> Tensor:
        """``wiener_weights`` with this likelihood's C and eps: float (B, H, W) lambda, a detached constant."""
        return wiener_weights(kernel.detach(), shape, self.wiener_c, self.eps)

    # ---------------------------------------------------------------------------------------- distribution
    def _lambda(self, kernel: Tensor, like: Tensor) -> Tensor:
        """lambda as (B or 1, 1, H, W), broadcastable over the channels of ``like`` (B, C, H, W)."""
        if kernel.dim() == 2:
            kernel = kernel.unsqueeze(0)  # (1, k, k): one kernel for the whole batch
        if kernel.dim() != 3 or kernel.shape[0] not in (1, like.shape[0]):
            raise ValueError(f"kernel must be (k, k) or (B, k, k) with B = {like.shape[0]}; got {tuple(kernel.shape)}")
        lam = self.precision_spectrum(kernel.to(dtype=like.dtype, device=like.device), like.shape[-2:])  # (B, H, W)
        # Global noise scale s (choice 10 in the module docstring): precision lambda / s^2. The kernel part stays
        # a stop-gradient constant; s is learned with the VAE when noise_mode is learned_global.
        scale = torch.exp(-2.0 * self.log_noise_sigma.to(like.dtype))
        return lam.unsqueeze(1) * scale  # (B, 1, H, W)

    def log_prob(self, x: Tensor, dist_params: Tensor, kernel: Tensor | None = None) -> Tensor:
        """log N(x; sigmoid(dist_params), Sigma_k) per image, with the circulant Wiener precision.

        Args:
            x: images, float (B, C, H, W) in [0, 1].
            dist_params: decoder output, float (B, C, H, W), unconstrained.
            kernel: float (B, k, k) or (k, k) blur kernel(s) (any odd/even size <= H, W), treated as a constant
                (detached). None: estimated with ``estimate_kernel(x, sg(mean(dist_params)))`` for ``"wiener_ls"``.

        Returns:
            float (B,), nats per image summed over C * H * W dimensions, log-determinant included.

        Raises:
            ValueError: shape mismatch, a kernel larger than the image, or ``"network"`` without a kernel.
        """
        if x.shape != dist_params.shape or x.dim() != 4:
            raise ValueError(f"x and dist_params must both be (B, C, H, W); got {tuple(x.shape)}, {tuple(dist_params.shape)}")
        # torch.fft has no bfloat16 and half only for powers of 2: work in at least float32 (AMP-safe).
        work = torch.promote_types(dist_params.dtype, torch.float32)
        x, mu = x.to(work), self.mean(dist_params.to(work))  # (B, C, H, W)
        if kernel is None:
            if self.estimator == "network":
                raise ValueError("estimator='network': pass kernel=estimate_kernel(x, mean(dist_params), z)")
            kernel = self.estimate_kernel(x, mu)  # (B, k, k), stop-gradient
        lam = self._lambda(kernel, x)  # (B, 1, H, W)
        channels, dims = x.shape[1], x.shape[-2] * x.shape[-1]
        # Orthonormal FFT: r^T Sigma^-1 r = sum lambda |R_ortho|^2 (the unnormalised version's 1/D is absorbed).
        spec = torch.fft.fft2(x - mu, norm="ortho")  # (B, C, H, W) complex
        quad = (lam * (spec.real.square() + spec.imag.square())).flatten(1).sum(1)  # (B,)
        log_det_precision = channels * lam.log().flatten(1).sum(1)  # (B or 1,), = -log|Sigma_k| over channels
        return -0.5 * quad + 0.5 * log_det_precision - 0.5 * channels * dims * _LOG_2PI  # (B,)

    def mean(self, dist_params: Tensor) -> Tensor:
        return torch.sigmoid(dist_params)

    def sample_given_z(self, dist_params: Tensor, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One draw x ~ p(x | z) with the kernel the density uses: k_gamma(z) for ``"network"`` (the kernel of
        ``log_prob_given_z``), the delta for ``"wiener_ls"`` (module docstring, choice 7).

        Args:
            dist_params: decoder output, float (B, C, H, W).
            z: the latent codes that produced ``dist_params``, float (B, latent_dim).
            generator: optional torch.Generator on ``dist_params``' device.

        Returns:
            float (B, C, H, W), not clipped to [0, 1]; see ``sample``.
        """
        kernel = None
        if self.estimator == "network":
            assert self.kernel_net is not None
            with torch.no_grad():
                kernel = self.kernel_net(z.detach())  # (B, k, k)
        return self.sample(dist_params, generator=generator, kernel=kernel)

    def sample(
        self, dist_params: Tensor, generator: torch.Generator | None = None, kernel: Tensor | None = None
    ) -> Tensor:
        """One draw x = mu + e, e ~ N(0, Sigma_k), float (B, C, H, W), not clipped to [0, 1].

        e = Re ifft2(fft2(u) / sqrt(lambda)) with u ~ N(0, I): Cov(e) = F^-1 diag(1/lambda) F = Sigma_k exactly
        (the imaginary part is rounding only, since lambda is symmetric). ``kernel`` as in ``log_prob``.
        None: for ``"wiener_ls"`` the delta kernel, i.e. isotropic noise of variance s^2 / ((1 + C)^-2 + eps)
        (module docstring, choice 7); for ``"network"`` an error, since its kernel needs z (``sample_given_z``).

        Raises:
            ValueError: ``"network"`` without a kernel.
        """
        mu = self.mean(dist_params.to(torch.promote_types(dist_params.dtype, torch.float32)))  # (B, C, H, W)
        if kernel is None:
            if self.estimator == "network":
                raise ValueError("estimator='network' samples with k_gamma(z): use sample_given_z(dist_params, z) or "
                                 "pass kernel=")
            # A 1 x 1 delta has the same OTF (K == 1) as any centred delta and fits every image size.
            kernel = delta_kernel(1, dtype=mu.dtype, device=mu.device)  # (1, 1)
        lam = self._lambda(kernel, mu)  # (B, 1, H, W)
        u = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        noise = torch.fft.ifft2(torch.fft.fft2(u) / lam.sqrt()).real  # (B, C, H, W)
        return mu + noise


__all__ = ["BlurErrorLikelihood", "KernelNetwork", "circular_blur", "estimator_elbo_valid", "psf2otf", "wiener_weights"]
