"""Priors on the parameters of a likelihood p(x | z): the Gamma prior of Dorta et al. 2018, Eq. 13.

Dorta et al. ("Training VAEs Under Structured Residuals", Sec. 4, Eq. 13) put an independent Gamma prior on every
diagonal entry lambda_ii of the predicted precision matrix Lambda(z), so the training bound becomes

    L = L_VAE + log p(Lambda(z)),   log p(Lambda(z)) = sum_i log Gamma(lambda_ii; alpha_G, beta_G).

It keeps the predicted precisions from running off to infinity early in training. The authors report that good
(alpha_G, beta_G) were hard to find and used the variance minimiser of Eq. 14 instead (``study.schedules``).

The density here is on lambda_ii itself (shape-rate parametrisation). It is *not* the prior on log-diagonal values
of the official ``tf_mvg`` code (which omits the log-Jacobian); a caller that predicts log lambda_ii and wants that
density must add sum_i log lambda_ii.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gamma_log_prob(precision_diagonal: Tensor, concentration: float, rate: float) -> Tensor:
    """Gamma log-density of every precision diagonal entry, summed per image (Dorta et al. 2018, Eq. 13).

    log Gamma(l; a, b) = a log b - lgamma(a) + (a - 1) log l - b l, normaliser included.

    Args:
        precision_diagonal: float (B, ...) of lambda_ii > 0, in the precision units of the likelihood
            (1 / image-units^2 for images in [0, 1]). Non-positive entries give -inf or nan; they are not checked,
            to avoid a device sync on every step.
        concentration: alpha_G > 0 (shape).
        rate: beta_G > 0 (inverse scale; mean = alpha_G / beta_G).

    Returns:
        float (B,): log p(Lambda(z)) in nats per image, summed over all diagonal entries.

    Raises:
        ValueError: ``concentration`` or ``rate`` is not positive and finite, or the input has no batch axis.
    """
    if not (math.isfinite(concentration) and concentration > 0):
        raise ValueError(f"Gamma concentration alpha_G must be positive, got {concentration}")
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"Gamma rate beta_G must be positive, got {rate}")
    if precision_diagonal.dim() < 1:
        raise ValueError("precision_diagonal needs a batch axis: expected (B, ...)")
    log_norm = concentration * math.log(rate) - math.lgamma(concentration)
    lam = precision_diagonal.reshape(precision_diagonal.shape[0], -1)  # (B, N)
    # xlogy keeps alpha_G = 1 (exponential prior) finite where lambda underflows to 0
    per_entry = torch.xlogy(concentration - 1.0, lam) - rate * lam  # (B, N)
    return per_entry.sum(1) + lam.shape[1] * log_norm  # (B,)
