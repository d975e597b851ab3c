"""YCbCr product likelihood (Dorta et al. 2018, Eq. 8-12): equals the sum of its parts, at their resolutions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from study.likelihoods.gaussian import GaussianLikelihood
from study.likelihoods.structured import StructuredGaussianLikelihood
from study.likelihoods.ycbcr import YCbCrProductLikelihood


def _float64(fn):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return fn()
    finally:
        torch.set_default_dtype(default)


def test_product_equals_sum_of_parts():
    luma = _float64(lambda: StructuredGaussianLikelihood(5))
    chroma = _float64(lambda: GaussianLikelihood("per_pixel"))
    lik = YCbCrProductLikelihood(luma, chroma, factor=4)
    gen = torch.Generator().manual_seed(0)
    p_y, p_c = luma.param_channels(1), chroma.param_channels(2)
    assert lik.param_channels(3) == p_y + p_c
    params = torch.randn(3, p_y + p_c, 8, 8, dtype=torch.float64, generator=gen) * 0.5
    y = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=gen)
    chroma_low = torch.rand(3, 2, 2, 2, dtype=torch.float64, generator=gen)
    x = torch.cat([y, chroma_low.repeat_interleave(4, 2).repeat_interleave(4, 3)], 1)  # stored layout
    # Independent reference: each part at its own resolution, chroma parameters block-averaged.
    c_params = params[:, p_y:].reshape(3, p_c, 2, 4, 2, 4).mean(dim=(3, 5))
    expected = luma.log_prob(y, params[:, :p_y]) + chroma.log_prob(chroma_low, c_params)
    torch.testing.assert_close(lik.log_prob(x, params), expected, rtol=1e-12, atol=1e-9)
    assert lik.num_dims((3, 8, 8)) == 64 + 2 * 4
    mean = lik.mean(params)
    assert mean.shape == (3, 3, 8, 8)
    torch.testing.assert_close(F.avg_pool2d(mean[:, 1:], 4), chroma.mean(c_params))
    torch.testing.assert_close(lik.precision_diagonal(params), luma.precision_diagonal(params[:, :p_y]))
    assert lik.sample(params, generator=gen).shape == (3, 3, 8, 8)
