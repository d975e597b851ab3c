"""YCbCr product likelihood (Dorta et al. 2018, Eq. 8-12): luma and chroma conditionally independent.

p(x | z) = p_Y(Y | z) * N(Cb_down, Cr_down | z). The luma Y is modelled at full resolution by any family
(the structured Gaussian in the paper); Cb and Cr, area-downsampled by ``factor`` (16 x 16 for 64 x 64), by a
diagonal Gaussian at their own resolution. The density therefore lives on (Y, Cb_down, Cr_down): D = H W +
2 (H / f)(W / f) dimensions, **not** on RGB pixels, so its NLL does not compare with an RGB NLL (the
downsampled chroma has far fewer, smoother dimensions); grey-scale runs compare, as in the paper's Table 1.

Inside the library a YCbCr image is one float tensor (B, 3, H, W) in [0, 1]: channel 0 is Y, channels 1-2
are the stored low-resolution chroma repeated over each f x f block (nearest upsampling), so average-pooling
them recovers the stored chroma exactly. The decoder emits the chroma parameters at full resolution and they
are average-pooled to the chroma resolution: the pooling is the decoder's fixed last layer for chroma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.likelihoods.base import Likelihood


class YCbCrProductLikelihood(Likelihood):
    """Luma likelihood on Y (full resolution) times a diagonal Gaussian on the downsampled Cb, Cr.

    Args:
        luma: the Y likelihood (one channel).
        chroma: the chroma likelihood (two channels, at 1 / ``factor`` resolution), normally Gaussian.
        factor: chroma downsampling factor f (4 in the paper: 16 x 16 chroma for 64 x 64 images).

    Raises:
        ValueError: ``factor`` < 1.
    """

    def __init__(self, luma: Likelihood, chroma: Likelihood, factor: int = 4) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.luma = luma
        self.chroma = chroma
        self.factor = factor
        self.elbo_valid = luma.elbo_valid and chroma.elbo_valid

    def param_channels(self, image_channels: int) -> int:
        if image_channels != 3:
            raise ValueError(f"YCbCr images have 3 channels (Y, Cb, Cr), got {image_channels}")
        return self.luma.param_channels(1) + self.chroma.param_channels(2)

    def num_dims(self, image_shape: tuple[int, int, int]) -> int:
        _, height, width = image_shape
        return height * width + 2 * (height // self.factor) * (width // self.factor)

    def _split(self, dist_params: Tensor) -> tuple[Tensor, Tensor]:
        """(luma dist_params (B, P_y, H, W), chroma dist_params (B, P_c, H / f, W / f))."""
        p_y = self.luma.param_channels(1)
        return dist_params[:, :p_y], F.avg_pool2d(dist_params[:, p_y:], self.factor)

    def _chroma_data(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x[:, 1:], self.factor)  # (B, 2, H / f, W / f): the stored chroma, exactly

    def _upsample(self, chroma: Tensor) -> Tensor:
        return F.interpolate(chroma, scale_factor=self.factor, mode="nearest")  # (B, 2, H, W)

    def log_prob(self, x: Tensor, dist_params: Tensor) -> Tensor:
        p_y, p_c = self._split(dist_params)
        return self.luma.log_prob(x[:, :1], p_y) + self.chroma.log_prob(self._chroma_data(x), p_c)

    def log_prob_given_z(self, x: Tensor, dist_params: Tensor, z: Tensor) -> Tensor:
        p_y, p_c = self._split(dist_params)
        return self.luma.log_prob_given_z(x[:, :1], p_y, z) + self.chroma.log_prob(self._chroma_data(x), p_c)

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return self.luma.auxiliary_parameters()

    def auxiliary_loss(self, x: Tensor, dist_params: Tensor, z: Tensor) -> Tensor | None:
        return self.luma.auxiliary_loss(x[:, :1], self._split(dist_params)[0], z)

    def mean(self, dist_params: Tensor) -> Tensor:
        p_y, p_c = self._split(dist_params)
        return torch.cat([self.luma.mean(p_y), self._upsample(self.chroma.mean(p_c))], dim=1)  # (B, 3, H, W)

    def sample(self, dist_params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        p_y, p_c = self._split(dist_params)
        chroma = self._upsample(self.chroma.sample(p_c, generator=generator))
        return torch.cat([self.luma.sample(p_y, generator=generator), chroma], dim=1)  # (B, 3, H, W)

    def sample_given_z(self, dist_params: Tensor, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A draw whose luma comes from the luma family's ``sample_given_z`` (its z-dependent kernel, if any)."""
        p_y, p_c = self._split(dist_params)
        chroma = self._upsample(self.chroma.sample(p_c, generator=generator))
        return torch.cat([self.luma.sample_given_z(p_y, z, generator=generator), chroma], dim=1)  # (B, 3, H, W)

    def precision_diagonal(self, dist_params: Tensor) -> Tensor:
        """The luma likelihood's precision diagonal (the Gamma prior of Eq. 13 is on the structured Y)."""
        if not hasattr(self.luma, "precision_diagonal"):
            raise AttributeError(f"{type(self.luma).__name__} has no precision_diagonal")
        return self.luma.precision_diagonal(self._split(dist_params)[0])

    def sample_residual(self, dist_params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The luma's correlated residual eps (B, 1, H, W) (Dorta et al. Fig. 1 / 7)."""
        if not hasattr(self.luma, "sample_residual"):
            raise AttributeError(f"{type(self.luma).__name__} has no sample_residual")
        return self.luma.sample_residual(self._split(dist_params)[0], generator=generator)
