"""Reconstruction likelihoods p(x | z), one module per family, all implementing :class:`Likelihood`."""

from __future__ import annotations

from study.config import LikelihoodConfig, TrialConfig
from study.likelihoods.base import Likelihood
from study.likelihoods.blur import BlurErrorLikelihood, estimator_elbo_valid
from study.likelihoods.gaussian import GaussianLikelihood
from study.likelihoods.laplace import LaplaceLikelihood
from study.likelihoods.losses import FocalFrequencyLoss, PerceptualLoss, SSIMLoss
from study.likelihoods.structured import StructuredGaussianLikelihood
from study.likelihoods.ycbcr import YCbCrProductLikelihood


def _gaussian(config: LikelihoodConfig) -> GaussianLikelihood:
    g = config.gaussian
    return GaussianLikelihood(sigma_mode=g.sigma_mode, sigma=g.sigma, min_sigma=g.min_sigma)


def build_family(config: LikelihoodConfig, latent_dim: int | None = None) -> Likelihood:
    """The likelihood of ``config.family`` with that family's options, for one colour space's channels.

    Raises:
        ValueError: an unknown family.
        FileNotFoundError: ``lpips`` without local backbone weights (the message says which file where).
    """
    family = config.family
    if family == "gaussian":
        return _gaussian(config)
    if family == "structured":
        s = config.structured
        return StructuredGaussianLikelihood(s.neighbourhood_size, num_basis=s.num_basis, dilations=s.dilations)
    if family == "blur":
        b = config.blur
        return BlurErrorLikelihood(
            kernel_size=b.kernel_size, wiener_c=b.wiener_c, eps=b.eps, estimator=b.estimator,
            latent_dim=latent_dim, noise_mode=b.noise_mode, noise_sigma=b.noise_sigma,
        )
    if family == "laplace":
        lp = config.laplace
        return LaplaceLikelihood(scale_mode=lp.scale_mode, scale=lp.scale, min_scale=lp.min_scale)
    if family == "ssim":
        return SSIMLoss(weight=config.ssim.weight, multiscale=config.ssim.multiscale)
    if family == "ffl":
        return FocalFrequencyLoss(weight=config.ffl.weight, alpha=config.ffl.alpha)
    if family == "lpips":
        return PerceptualLoss(weight=config.lpips.weight, weights_path=config.lpips.weights_path)
    raise ValueError(f"unknown likelihood family {family!r}")


FAMILY_CLASSES: dict[str, type[Likelihood]] = {
    "gaussian": GaussianLikelihood,
    "structured": StructuredGaussianLikelihood,
    "blur": BlurErrorLikelihood,
    "laplace": LaplaceLikelihood,
    "ssim": SSIMLoss,
    "ffl": FocalFrequencyLoss,
    "lpips": PerceptualLoss,
}


def family_elbo_valid(family: str, likelihood: LikelihoodConfig | None = None) -> bool:
    """Whether a family's ``log_prob`` is a normalised density of x given z (so ELBO and NLL mean something).

    It can depend on the family's options: the blur family is a density only with ``estimator: network`` (the
    plug-in ``wiener_ls`` kernel is fitted to x itself). ``likelihood`` gives those options; without it the
    family's defaults (``LikelihoodConfig()``) are assumed, so pass the trial's config wherever options are
    searched. ``avae`` (a training scheme whose reconstructions come from a generator) has none. Agrees with
    ``build_likelihood(likelihood).elbo_valid`` without building anything (``lpips`` needs weights to build).

    Raises:
        KeyError: an unknown family.
    """
    if family == "avae":
        return False
    if family == "blur":
        return estimator_elbo_valid((likelihood or LikelihoodConfig()).blur.estimator)
    return bool(FAMILY_CLASSES[family].elbo_valid)


def trial_elbo_valid(config: TrialConfig) -> bool:
    """``family_elbo_valid`` of one resolved trial config: its family (``avae`` for the adversarial model) and
    its likelihood options, e.g. the blur estimator a sweep sampled for that trial."""
    return family_elbo_valid(config.family, config.likelihood)


def build_likelihood(
    config: LikelihoodConfig, color: str = "rgb", chroma_factor: int = 4, latent_dim: int | None = None
) -> Likelihood:
    """The likelihood a trial uses for data in ``color`` (``rgb``, ``grey`` or ``ycbcr``).

    For ``ycbcr`` the family models Y and a diagonal Gaussian (the ``gaussian`` options) models the
    downsampled chroma (Dorta et al. 2018, Eq. 8-12).
    """
    family = build_family(config, latent_dim)
    if color == "ycbcr":
        return YCbCrProductLikelihood(family, _gaussian(config), factor=chroma_factor)
    return family


__all__ = [
    "BlurErrorLikelihood", "FocalFrequencyLoss", "GaussianLikelihood", "LaplaceLikelihood", "Likelihood",
    "PerceptualLoss", "SSIMLoss", "StructuredGaussianLikelihood", "YCbCrProductLikelihood", "build_family",
    "build_likelihood", "family_elbo_valid", "trial_elbo_valid",
]
