"""Structured-residual Gaussian likelihood: a sparse Cholesky precision per image (Dorta et al. 2018).

"Training VAEs Under Structured Residuals" (Dorta, Vicente, Agapito, Campbell, Simpson; arXiv 1804.01050) and
SUPN (CVPR 2018, arXiv 1802.07079) model each channel of x (B, C, H, W) in [0, 1] as

    x | z ~ N(mu(z), Lambda(z)^{-1}),   Lambda = L L^T,   n = H * W pixels in raster order (p = i * W + j),

with L lower triangular and sparse: column p holds the diagonal L_pp > 0 and off-diagonal entries L_qp only
for the raster-later pixels q = p + o inside the n_f x n_f neighbourhood of p. The residual r = x - mu is
whitened by y = L^T r, y_p = L_pp r_p + sum_o L_{p+o, p} r_{p+o} (zero padding: neighbours outside the image
do not exist), and

    log p(x | z) = sum_p log L_pp - ||y||^2 / 2 - (n / 2) log(2 pi)    (nats; log|Lambda| = 2 sum_p log L_pp),

summed over channels, which are conditionally independent as in the paper (which uses C = 1: Y or grey).
1 / L_pp is the standard deviation of x_p given every raster-later pixel (the factorisation is a reverse-raster
autoregression), so ``log_prob`` <= sum_p log L_pp - (n / 2) log(2 pi) whatever the off-diagonals are.

**Parameterisation** (per channel; ``s(t) = c + h tanh((t - c) / h)`` is a soft clamp onto
[lo, hi] = [``min_log_diagonal``, ``max_log_diagonal``], c = (lo + hi) / 2, h = (hi - lo) / 2, slope 1 at c):

* plain (``num_basis=None``, ``dilations=None``): K = (n_f^2 - 1) / 2 raster-later taps of the n_f x n_f
  neighbourhood in raster order ((0, 1) ... (0, k), then rows 1 .. k from dj = -k to k; k = n_f // 2), as in
  tf_mvg's filters whose first floor(n_f^2 / 2) taps are zero. Per pixel: log L_pp = s(t_0) and the K
  off-diagonals L_{p+o_k, p} = e^hi tanh(t_k / e^hi), free (any sign) and ~ t_k while |t_k| << e^hi = 1000.
* basis (``num_basis`` = n_b, Eq. 15, L(z) = s(B W(z))): the shared nn.Parameter ``basis`` ((K + 1), n_b)
  holds in row 0 log B_b(c) (centre, so B_b(c) = exp > 0) and in rows 1..K the free tap values B_b(o_k); the
  decoder predicts log w_{p,b}. Following tf_mvg, unclamped column p is sum_b w_{p,b} B_b: its diagonal is
  exp(a), a = logsumexp_b(log w_{p,b} + log B_b(c)), and its taps sum_b w_{p,b} B_b(o_k)
  = e^a sum_b softmax_b(log w_p + log B(c))_b B_b(o_k) / B_b(c). We set log L_pp = s(a) and scale the whole
  column by e^{s(a) - a} (the taps use e^{s(a)} times that convex combination), so L = s(B W(z)) exactly while
  a is inside the bounds, and the taps stay finite for any log w.
* dilations [d_1 .. d_m] (Fig. 5): m blocks, each the 3 x 3 pattern at dilation d (taps d (0, 1), d (1, -1),
  d (1, 0), d (1, 1)); L^T r sums the blocks and the diagonal is s(logsumexp of every block's log centre term),
  as tf_mvg. Without a basis each block takes 1 log-centre + 4 tap channels (taps as in plain mode); with a
  basis, ``basis`` is (m, 5, n_b), each block has its own n_b weights and the softmax / logsumexp above run
  over all m * n_b (block, basis) pairs. ``neighbourhood_size`` must then be 3.

**Channel layout** of ``dist_params`` (B, (1 + Q) C, H, W), quantity-major like ``GaussianLikelihood``: channel
q * C + c is quantity q of image channel c; q = 0 is the raw mean (mu = sigmoid), q = 1..Q are precision
channels: plain [t_0, t_1 .. t_K] (Q = K + 1); basis [log w_1 .. log w_nb] (Q = n_b); dilated, block-major,
[t_0, 4 taps] per block (Q = 5 m) or [log w_1 .. log w_nb] per block (Q = m n_b).

**Non-zeros of L** per channel: n + sum_k (H - di_k)^+ (W - |dj_k|)^+ (``num_nonzeros``), which is below the
border-free n (K + 1); K = (n_f^2 - 1) / 2, or 4 m with dilations. The paper prints n_p (n_f^2 - 1) / 2 + 1.

**Training path**: without a basis (plain and dilated modes) ``log_prob`` runs as one autograd node with a
hand-written backward (``structured_fused``), which at n_f = 5 cuts the likelihood's share of a CPU training
step by about 3x against autograd through the composed operations (``fused=False``, kept for tests and the
benchmark). Basis mode keeps the composed path (its convolutions are already few, large operations).

**Safety bounds** (defaults): log L_pp in [-log 1000, log 1000], i.e. a conditional standard deviation between
1e-3 (the ``min_sigma`` floor of ``GaussianLikelihood``) and 1000 image units; plain / dilated taps bounded by
e^hi. So ``log_prob`` is finite for any finite dist_params and its gradients are finite (tanh saturates to zero
slope instead of overflowing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.likelihoods.base import Likelihood
from study.likelihoods.structured_fused import structured_log_prob
from study.likelihoods.structured_sampling import (
    SparseCholesky,
    count_nonzeros,
    dense_factor,
    precision_diagonal,
    raster_later_offsets,
    solve_upper_banded,
    whiten,
)

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class StructuredGaussianLikelihood(Likelihood):
    """Gaussian p(x | z) per channel with a sparse Cholesky precision Lambda = L L^T (Dorta et al. 2018).

    See the module docstring for the exact parameterisation and channel layout.

    Args:
        neighbourhood_size: n_f, odd and >= 3; each pixel's column of L reaches the raster-later half of its
            n_f x n_f neighbourhood. Must be 3 when ``dilations`` is given (each block is a 3 x 3 pattern).
        num_basis: n_b >= 1 to use the learned shared basis of Eq. 15, or None to predict every tap per pixel.
        dilations: distinct rates >= 1 of 3 x 3 blocks summed into L (Fig. 5), e.g. [1, 2]; None for a single
            n_f x n_f pattern.
        min_log_diagonal: lower soft bound of log L_pp, in log(1 / image units); default -log(1000).
        max_log_diagonal: upper soft bound of log L_pp (> ``min_log_diagonal``); default log(1000). e^max also
            bounds the per-pixel taps in plain and dilated modes.
        fused: plain and dilated modes compute ``log_prob`` with ``structured_fused.structured_log_prob`` (one
            autograd node with a hand-written backward; faster and leaner) instead of autograd through the
            composed operations. Same values and gradients to rounding (tested); False exists for tests and
            the benchmark's side-by-side row.

    Raises:
        ValueError: an even or < 3 ``neighbourhood_size``; ``num_basis`` < 1; empty, non-positive or repeated
            ``dilations``, or ``dilations`` with ``neighbourhood_size`` != 3; bounds not finite and increasing.
    """

    def __init__(
        self,
        neighbourhood_size: int = 3,
        num_basis: int | None = None,
        dilations: list[int] | None = None,
        min_log_diagonal: float = -math.log(1e3),
        max_log_diagonal: float = math.log(1e3),
        fused: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(neighbourhood_size, bool) or not isinstance(neighbourhood_size, int):
            raise ValueError(f"neighbourhood_size must be an int, got {neighbourhood_size!r}")
        if neighbourhood_size < 3 or neighbourhood_size % 2 == 0:
            raise ValueError(f"neighbourhood_size must be odd and >= 3, got {neighbourhood_size}")
        if num_basis is not None and (isinstance(num_basis, bool) or not isinstance(num_basis, int) or num_basis < 1):
            raise ValueError(f"num_basis must be None or an int >= 1, got {num_basis!r}")
        if dilations is not None:
            dilations = list(dilations)
            if not dilations or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
                raise ValueError(f"dilations must be a non-empty list of ints >= 1, got {dilations!r}")
            if len(set(dilations)) != len(dilations):
                raise ValueError(f"dilations must be distinct (repeated taps), got {dilations!r}")
            if neighbourhood_size != 3:
                raise ValueError("dilations use 3x3 blocks: leave neighbourhood_size at 3")
        lo, hi = float(min_log_diagonal), float(max_log_diagonal)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"need finite min_log_diagonal < max_log_diagonal, got {lo}, {hi}")
        self.neighbourhood_size = neighbourhood_size
        self.fused = bool(fused)
        self.num_basis = num_basis
        self.dilations = dilations
        self.min_log_diagonal, self.max_log_diagonal = lo, hi
        self._centre, self._half_width = (lo + hi) / 2, (hi - lo) / 2
        self._tap_bound = math.exp(hi)
        # One block per dilation rate (one n_f x n_f block without dilations); taps are block-major.
        self._rates = dilations if dilations is not None else [1]
        self._block_taps = (neighbourhood_size**2 - 1) // 2  # 4 for the 3 x 3 blocks of dilated mode
        self.offsets: tuple[tuple[int, int], ...] = tuple(
            o for d in self._rates for o in raster_later_offsets(neighbourhood_size, d)
        )
        if num_basis is not None:
            # Zero taps and log-centre 0: every basis vector starts as the identity column, so training starts
            # from a diagonal (per-pixel) Gaussian; the pixel-varying weights break the symmetry between bases.
            shape = (self._block_taps + 1, num_basis)
            self.basis = nn.Parameter(torch.zeros(shape if dilations is None else (len(self._rates), *shape)))

    # ----------------------------------------------------------------------------------------------- layout
    def _precision_channels(self) -> int:
        """Q, precision channels per image channel."""
        per_block = self.num_basis if self.num_basis is not None else self._block_taps + 1
        return len(self._rates) * per_block

    def param_channels(self, image_channels: int) -> int:
        return (1 + self._precision_channels()) * image_channels

    def num_nonzeros(self, height: int, width: int) -> int:
        """Structural non-zeros of L for one H x W channel (diagonal + in-image taps)."""
        return count_nonzeros(self.offsets, height, width)

    def _split(self, dist_params: Tensor) -> tuple[Tensor, Tensor]:
        """(raw mean (B, C, H, W), raw precision channels (B, C, Q, H, W)) from dist_params (B, (1 + Q) C, H, W)."""
        if dist_params.dim() != 4:
            raise ValueError(f"dist_params must be (B, P, H, W), got shape {tuple(dist_params.shape)}")
        q = self._precision_channels()
        if dist_params.shape[1] % (1 + q):
            raise ValueError(f"dist_params has {dist_params.shape[1]} channels, not a multiple of {1 + q}")
        raw = dist_params.unflatten(1, (1 + q, dist_params.shape[1] // (1 + q)))  # (B, 1 + Q, C, H, W)
        return raw[:, 0], raw[:, 1:].movedim(1, 2)  # (B, C, H, W), (B, C, Q, H, W)

    def _soft_clamp(self, t: Tensor) -> Tensor:
        return self._centre + self._half_width * torch.tanh((t - self._centre) / self._half_width)

    def _plain_terms(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """Plain / dilated mode: (log L_pp (B, C, H, W), unbounded taps t (B, C, K, H, W)) from raw (B, C, Q, H, W)."""
        blocks = raw.unflatten(2, (len(self._rates), self._block_taps + 1))  # (B, C, m, 1 + K_b, H, W)
        centres = blocks[:, :, :, 0]  # (B, C, m, H, W)
        # logsumexp over one block is the identity; skipping it saves two passes over the image per step
        centre = centres[:, :, 0] if centres.shape[2] == 1 else torch.logsumexp(centres, dim=2)
        return self._soft_clamp(centre), blocks[:, :, :, 1:].flatten(2, 3)

    def _basis_terms(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Basis mode: (log L_pp (B, C, H, W), softmax s (B, C, m n_b, H, W), tap ratios (m, K_b, n_b)).

        Column p of L = L_pp * [1, sum_(d,b) s_(d,b) ratio_(d,b)], ratio = B_b(o) / B_b(c) (module docstring).
        """
        basis = self.basis.to(raw.dtype)
        basis = basis if self.dilations is not None else basis.unsqueeze(0)  # (m, 1 + K_b, n_b)
        log_centre = basis[:, 0, :]  # (m, n_b)
        a = raw.unflatten(2, (len(self._rates), self.num_basis)) + log_centre[:, :, None, None]
        a = a.flatten(2, 3)  # (B, C, m n_b, H, W)
        log_diag = self._soft_clamp(torch.logsumexp(a, dim=2))  # (B, C, H, W)
        ratios = basis[:, 1:, :] * torch.exp(-log_centre)[:, None, :]  # (m, K_b, n_b)
        return log_diag, torch.softmax(a, dim=2), ratios

    def sparse_factor(self, dist_params: Tensor) -> SparseCholesky:
        """L in banded form: log_diag (B, C, H, W), ``offsets`` (K), weights (B, C, K, H, W), 1 / image units."""
        _, raw = self._split(dist_params)
        m = len(self._rates)
        if self.num_basis is None:
            log_diag, taps = self._plain_terms(raw)
            weights = self._tap_bound * torch.tanh(taps / self._tap_bound)
            return SparseCholesky(log_diag, self.offsets, weights)
        log_diag, s, ratios = self._basis_terms(raw)
        s = s.unflatten(2, (m, self.num_basis))  # (B, C, m, n_b, H, W)
        coef = torch.einsum("bcdnhw,dkn->bcdkhw", s, ratios).flatten(2, 3)  # (B, C, K, H, W)
        return SparseCholesky(log_diag, self.offsets, log_diag.exp().unsqueeze(2) * coef)

    # ------------------------------------------------------------------------------------------ densities
    def _whitened(self, residual: Tensor, dist_params: Tensor) -> tuple[Tensor, Tensor]:
        """(y = L^T r, log L_pp), each (B, C, H, W); r = x - mu in image units."""
        if self.num_basis is None:
            factor = self.sparse_factor(dist_params)
            return whiten(factor, residual), factor.log_diag
        # Basis mode as tf_mvg: one ordinary convolution per block with the n_b basis filters (centre 1, taps
        # B_b(o) / B_b(c)), then a per-pixel convex combination; no (B, C, K, H, W) tap tensor is formed.
        _, raw = self._split(dist_params)
        log_diag, s, ratios = self._basis_terms(raw)
        b, c, h, w = residual.shape
        r = residual.reshape(b * c, 1, h, w)
        f = self.neighbourhood_size
        responses = []
        for block, rate in enumerate(self._rates):
            head = ratios.new_zeros(self.num_basis, f * f // 2)  # taps before the centre are zero
            centre = ratios.new_ones(self.num_basis, 1)
            kernel = torch.cat([head, centre, ratios[block].T], dim=1).view(self.num_basis, 1, f, f)
            responses.append(F.conv2d(r, kernel, padding=rate * (f // 2), dilation=rate))  # (BC, n_b, H, W)
        t = torch.cat(responses, dim=1).view(b, c, -1, h, w)  # (B, C, m n_b, H, W)
        return log_diag.exp() * (s * t).sum(2), log_diag

    def log_prob(self, x: Tensor, dist_params: Tensor) -> Tensor:
        """log N(x; mu, (L L^T)^{-1}) per image, summed over channels: float (B,), nats.

        Args:
            x: images, float (B, C, H, W) in [0, 1].
            dist_params: decoder output, float (B, param_channels(C), H, W), unconstrained.

        Raises:
            ValueError: dist_params not (B, (1 + Q) C, H, W) for x's shape.
        """
        raw_mu, _ = self._split(dist_params)
        if raw_mu.shape != x.shape:
            raise ValueError(f"dist_params imply images {tuple(raw_mu.shape)}, got x {tuple(x.shape)}")
        if self.fused and self.num_basis is None:
            return structured_log_prob(x, dist_params, self.offsets, len(self._rates),
                                       (self._centre, self._half_width), self._tap_bound)
        y, log_diag = self._whitened(x - torch.sigmoid(raw_mu), dist_params)  # (B, C, H, W) each
        per_pixel = log_diag - 0.5 * y.square() - _HALF_LOG_2PI
        return per_pixel.flatten(1).sum(1)  # (B,)

    def mean(self, dist_params: Tensor) -> Tensor:
        """mu = sigmoid(raw mean), float (B, C, H, W) in (0, 1)."""
        return torch.sigmoid(self._split(dist_params)[0])

    def cholesky_log_diagonal(self, dist_params: Tensor) -> Tensor:
        """log L_pp, float (B, C, H, W) in [min_log_diagonal, max_log_diagonal]; -log of x_p's std given the
        raster-later pixels."""
        _, raw = self._split(dist_params)
        if self.num_basis is not None:
            return self._basis_terms(raw)[0]
        return self._plain_terms(raw)[0]

    def precision_diagonal(self, dist_params: Tensor) -> Tensor:
        """lambda_pp = (L L^T)_pp = sum_k L_pk^2 (row p of L), float (B, C, H, W), > 0, 1 / image units^2.

        The diagonal the Gamma prior of Dorta et al. (Eq. 13) acts on; 1 / lambda_pp is x_p's variance given
        all other pixels.
        """
        return precision_diagonal(self.sparse_factor(dist_params))

    def dense_cholesky_factor(self, dist_params: Tensor) -> Tensor:
        """Dense L, float (B, C, n, n), n = H W, raster order. Tests and inspection of small images only."""
        return dense_factor(self.sparse_factor(dist_params))

    # ------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_residual(self, dist_params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """eps ~ N(0, (L L^T)^{-1}) exactly, float (B, C, H, W), image units (Fig. 1 / 7 of the paper).

        Draws u ~ N(0, I) and solves L^T eps = u by row-wise banded back-substitution
        (``structured_sampling.solve_upper_banded``), so Cov(eps) = L^{-T} L^{-1} = Lambda^{-1}.
        """
        factor = self.sparse_factor(dist_params)
        u = torch.randn(
            factor.log_diag.shape, generator=generator, device=dist_params.device, dtype=factor.log_diag.dtype
        )
        return solve_upper_banded(factor, u)

    @torch.no_grad()
    def sample(self, dist_params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x = mu + eps, float (B, C, H, W), not clipped to [0, 1]."""
        return self.mean(dist_params) + self.sample_residual(dist_params, generator)
