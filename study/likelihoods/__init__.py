"""Reconstruction likelihoods p(x | z), one module per family, all implementing :class:`Likelihood`."""

from __future__ import annotations

from study.config import LikelihoodConfig
from study.likelihoods.base import Likelihood
from study.likelihoods.gaussian import GaussianLikelihood


def build_likelihood(config: LikelihoodConfig) -> Likelihood:
    """The likelihood a trial config names (``likelihood.family``) with that family's options.

    Raises:
        ValueError: an unknown family.
    """
    if config.family == "gaussian":
        g = config.gaussian
        return GaussianLikelihood(sigma_mode=g.sigma_mode, sigma=g.sigma, min_sigma=g.min_sigma)
    raise ValueError(f"unknown likelihood family {config.family!r}")


__all__ = ["GaussianLikelihood", "Likelihood", "build_likelihood"]
