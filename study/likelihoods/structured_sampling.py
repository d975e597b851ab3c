"""Band operations on the sparse Cholesky factor of a structured-residual Gaussian (Dorta et al. 2018).

A :class:`SparseCholesky` stores the lower-triangular factor L of a precision Lambda = L L^T over the n = H * W
pixels of one image channel in raster order (p = i * W + j) as bands, never as an n x n matrix:

* ``log_diag[..., i, j]`` = log L_pp, the log of the (positive) diagonal;
* ``weights[..., k, i, j]`` = L_qp, the off-diagonal entry of column p for the pixel q = p + o_k that lies at
  the raster-later offset ``offsets[k] = (di, dj)`` (di > 0, or di == 0 and dj > 0) of p. Entries whose q falls
  outside the image do not exist (zero padding, not wrap-around) and are ignored by every function here.

M = L^T is upper triangular with row p holding L_pp on the diagonal and L_{p+o_k, p} at column p + o_k, so

    (L^T r)_p = L_pp r_p + sum_k L_{p+o_k, p} r_{p+o_k}      (Dorta et al. 2018, the "whitened" residual).

This module holds what the likelihood needs besides ``log_prob``: exact sampling by back-substitution
(solve L^T eps = u, u ~ N(0, I), so Cov(eps) = (L L^T)^{-1}; SUPN, Dorta et al. CVPR 2018, Sec. 3), the
diagonal of Lambda, and dense reference builders / solvers for tests, inspection and benchmarks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Offset = tuple[int, int]


class SparseCholesky(NamedTuple):
    """Banded storage of a sparse lower-triangular Cholesky factor L (one per leading index, e.g. (B, C)).

    Attributes:
        log_diag: float (..., H, W), log L_pp (finite; L_pp = exp(log_diag) > 0), in log(1 / image units).
        offsets: K raster-later pixel offsets (di, dj), di >= 0, dj > 0 when di == 0.
        weights: float (..., K, H, W), L_{p + offsets[k], p} in 1 / image units; entries pointing outside the
            image are ignored.
    """

    log_diag: Tensor
    offsets: tuple[Offset, ...]
    weights: Tensor


def raster_later_offsets(size: int = 3, dilation: int = 1) -> list[Offset]:
    """The raster-later half of a ``size`` x ``size`` pattern, scaled by ``dilation``, in raster order.

    These are the (size^2 - 1) / 2 filter taps after the centre when the filter is flattened row by row: the
    rest of the centre row, then the full rows below (tf_mvg's filters, whose first floor(size^2 / 2) taps are
    forced to zero). For size = 3: (0, 1), (1, -1), (1, 0), (1, 1) times ``dilation``.

    Raises:
        ValueError: ``size`` even or < 3, or ``dilation`` < 1.
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"size must be odd and >= 3, got {size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    k = size // 2
    return [(dilation * di, dilation * dj) for di in range(k + 1) for dj in range(-k, k + 1) if di > 0 or dj > 0]


def count_nonzeros(offsets: tuple[Offset, ...] | list[Offset], height: int, width: int) -> int:
    """Structural non-zeros of L for an H x W image: n diagonal entries plus every in-image off-diagonal tap.

    Offset (di, dj) exists at the (H - di) * (W - |dj|) pixels whose neighbour is inside the image (when both
    factors are positive), so the count is below the border-free n * (K + 1).
    """
    return height * width + sum(max(height - di, 0) * max(width - abs(dj), 0) for di, dj in offsets)


def _margins(offsets: tuple[Offset, ...] | list[Offset]) -> tuple[int, int]:
    """(largest |dj|, largest di): the zero padding that makes every offset a plain slice."""
    return max((abs(dj) for _, dj in offsets), default=0), max((di for di, _ in offsets), default=0)


def whiten(factor: SparseCholesky, residual: Tensor) -> Tensor:
    """y = L^T r with zero padding, float (..., H, W), from a residual r float (..., H, W) in image units.

    An unfold of the raster-later half only: the K shifted residuals are views of one zero-padded copy of r,
    stacked into (..., K, H, W) and contracted with the taps in one vectorised product (autograd keeps that
    stack, K images, the same size as the taps; a per-tap loop saves nothing but costs O(K^2 n) in backward,
    where indexing each tap out of ``weights`` allocates a full-size gradient).
    """
    h, w = residual.shape[-2:]
    pad_w, pad_h = _margins(factor.offsets)
    r_pad = F.pad(residual, (pad_w, pad_w, 0, pad_h))  # (..., H + pad_h, W + 2 pad_w)
    shifted = torch.stack(
        [r_pad[..., di : di + h, pad_w + dj : pad_w + dj + w] for di, dj in factor.offsets], dim=-3
    )  # (..., K, H, W): r at p + o_k, zero outside the image
    return factor.log_diag.exp() * residual + (factor.weights * shifted).sum(-3)


def precision_diagonal(factor: SparseCholesky) -> Tensor:
    """Lambda_pp = sum_k L_pk^2 (row p of L), float (..., H, W), > 0, in 1 / image units^2.

    Row p of L holds L_pp and, for each offset o_k with p - o_k inside the image, the entry L_{p, p - o_k} of the
    earlier pixel's column; so Lambda_pp = L_pp^2 + sum_k weights[k] at p - o_k, squared. 1 / Lambda_pp is the
    variance of x_p given all other pixels.
    """
    h, w = factor.log_diag.shape[-2:]
    pad_w, pad_h = _margins(factor.offsets)
    sq = F.pad(factor.weights.square(), (pad_w, pad_w, pad_h, 0))  # (..., K, pad_h + H, W + 2 pad_w)
    moved = torch.stack(
        [plane[..., pad_h - di : pad_h - di + h, pad_w - dj : pad_w - dj + w]  # value at p - o_k
         for plane, (di, dj) in zip(sq.unbind(-3), factor.offsets)],
        dim=-3,
    )  # fmt: skip
    return (2.0 * factor.log_diag).exp() + moved.sum(-3)


def dense_factor(factor: SparseCholesky) -> Tensor:
    """The dense L, float (..., n, n), n = H * W, raster order; for tests and inspection of small images only.

    Memory is n^2 per channel (128 MiB in float64 at 64 x 64), so never use it in the training path.
    """
    lead = factor.log_diag.shape[:-2]
    h, w = factor.log_diag.shape[-2:]
    n = h * w
    diag = factor.log_diag.exp().reshape(-1, n)  # (N, n)
    weights = factor.weights.reshape(diag.shape[0], len(factor.offsets), h, w)  # (N, K, H, W)
    dense = diag.new_zeros(diag.shape[0], n, n)  # (N, n, n)
    idx = torch.arange(n, device=diag.device)
    dense[:, idx, idx] = diag
    for k, (di, dj) in enumerate(factor.offsets):
        rows = torch.arange(0, h - di, device=diag.device)
        cols = torch.arange(max(0, -dj), min(w, w - dj), device=diag.device)
        if rows.numel() == 0 or cols.numel() == 0:
            continue  # the offset leaves the image everywhere
        ii, jj = torch.meshgrid(rows, cols, indexing="ij")
        p = (ii * w + jj).flatten()
        q = p + di * w + dj  # raster-later neighbour, row of L
        dense[:, q, p] = weights[:, k, ii.flatten(), jj.flatten()]
    return dense.reshape(*lead, n, n)


@torch.no_grad()
def solve_upper_banded(factor: SparseCholesky, u: Tensor) -> Tensor:
    """eps with L^T eps = u, float (..., H, W), by back-substitution one image row at a time.

    Row i of L^T couples pixels of row i (same-row taps, dj > 0) to pixels of rows i + 1 .. i + max(di), which
    are already solved when rows go bottom-up. Each step subtracts those known terms and solves the W x W
    upper-triangular (banded) block of row i for all N = prod(leading dims) images at once with
    ``torch.linalg.solve_triangular``: H sequential steps of O(N W^2) work, any device, no gradients.

    Args:
        factor: the factor, leading dims (...) matching ``u``.
        u: float (..., H, W), right-hand side (a standard-normal draw when sampling).
    """
    lead = u.shape[:-2]
    h, w = u.shape[-2:]
    n_img = u[..., 0, 0].numel()
    diag = factor.log_diag.exp().reshape(n_img, h, w)  # (N, H, W)
    weights = factor.weights.reshape(n_img, len(factor.offsets), h, w)  # (N, K, H, W)
    u = u.reshape(n_img, h, w)
    same_row = [(k, dj) for k, (di, dj) in enumerate(factor.offsets) if di == 0 and dj < w]
    below = [k for k, (di, dj) in enumerate(factor.offsets) if di > 0]
    pad_w, pad_h = _margins(factor.offsets)
    eps = u.new_zeros(n_img, h + pad_h, w + 2 * pad_w)  # solved rows, zero outside the image
    if below:
        di_b = torch.tensor([factor.offsets[k][0] for k in below], device=u.device)  # (K',)
        dj_b = torch.tensor([factor.offsets[k][1] for k in below], device=u.device)
        cols_b = pad_w + dj_b[:, None] + torch.arange(w, device=u.device)  # (K', W) padded column of p + o
        w_below = weights[:, below]  # (N, K', H, W)
    for i in range(h - 1, -1, -1):
        rhs = u[:, i, :]  # (N, W)
        if below:
            known = eps[:, (i + di_b)[:, None], cols_b]  # (N, K', W), eps at p + o for p in row i
            rhs = rhs - (w_below[:, :, i, :] * known).sum(1)
        block = torch.diag_embed(diag[:, i, :])  # (N, W, W), upper triangular
        for k, dj in same_row:
            block = block + torch.diag_embed(weights[:, k, i, : w - dj], offset=dj)
        row = torch.linalg.solve_triangular(block, rhs.unsqueeze(-1), upper=True)  # (N, W, 1)
        eps[:, i, pad_w : pad_w + w] = row.squeeze(-1)
    return eps[:, :h, pad_w : pad_w + w].reshape(*lead, h, w)


@torch.no_grad()
def solve_upper_dense(dense_l: Tensor, u: Tensor) -> Tensor:
    """Reference solve of L^T eps = u with a dense triangular solve; for tests and benchmarks.

    Args:
        dense_l: float (..., n, n), lower-triangular L (``dense_factor``).
        u: float (..., H, W) with H * W = n.

    Returns:
        eps, float (..., H, W).
    """
    flat = u.reshape(*u.shape[:-2], -1, 1)  # (..., n, 1)
    eps = torch.linalg.solve_triangular(dense_l.mT, flat, upper=True)
    return eps.reshape(u.shape)
