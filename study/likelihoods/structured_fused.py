"""The structured likelihood's training path as one autograd node (plain and dilated modes, Dorta et al. 2018).

``StructuredGaussianLikelihood.log_prob`` (module ``structured``) composes a dozen small tensor operations:
split ``dist_params`` into mu, the log-diagonal and the K tap channels, soft-clamp, bound the taps, shift the
residual K times, multiply, sum, square. Under autograd each of them allocates and saves its own full-size
tensor, and the gradient of ``dist_params`` is assembled from per-slice zero-filled buffers; at n_f = 5 (K = 12)
that bookkeeping costs more than the arithmetic. ``structured_log_prob`` computes the same density,

    log p(x | z) = sum_p [ log L_pp - (L^T r)_p^2 / 2 - log(2 pi) / 2 ],   r = x - sigmoid(raw mu),
    log L_pp = s(logsumexp_blocks t_0),  L_{p+o_k, p} = b tanh(t_k / b),  (L^T r)_p = L_pp r_p + sum_k L_{p+o_k,p} r_{p+o_k}

(soft clamp s and bound b = e^max as in ``structured``; Dorta et al. 2018, Eq. 6 with Lambda = L L^T), with
the K products accumulated in place and a hand-written backward that writes every gradient straight into one
buffer shaped like ``dist_params``: with g = dlog p / dy = -y (times the incoming gradient),

    dt_k = g r_{p+o_k} (1 - tanh^2(t_k / b)),   dr = L_pp g + sum_k shift_{-o_k}(L_{p+o_k,p} g),
    draw mu = -dr mu (1 - mu),   dlog L_pp = 1 + g L_pp r,   dt_0 = dlog L_pp s'(.) softmax_blocks(t_0).

It is a faster evaluation of the same maths, not a different model: ``tests/likelihoods/test_structured.py``
checks values and gradients against the composed path (itself checked against a dense
``MultivariateNormal``) and ``torch.autograd.gradcheck`` in float64. First derivatives only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

Offset = tuple[int, int]


class _StructuredLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dist_params: Tensor, offsets: tuple[Offset, ...], num_blocks: int,
                clamp: tuple[float, float], tap_bound: float) -> Tensor:
        channels = x.shape[1]
        h, w = x.shape[-2:]
        pad_w = max(abs(dj) for _, dj in offsets)
        pad_h = max(di for di, _ in offsets)
        block_taps = len(offsets) // num_blocks
        centre, half_width = clamp
        raw = dist_params.unflatten(1, (dist_params.shape[1] // channels, channels))  # (B, 1 + Q, C, H, W)
        mu = torch.sigmoid(raw[:, 0])  # (B, C, H, W)
        r = x - mu
        blocks = raw[:, 1:].unflatten(1, (num_blocks, block_taps + 1))  # (B, m, 1 + K_b, C, H, W)
        centres = blocks[:, :, 0]  # (B, m, C, H, W)
        lse = centres[:, 0] if num_blocks == 1 else torch.logsumexp(centres, dim=1)  # (B, C, H, W)
        th0 = torch.tanh((lse - centre) / half_width)
        log_diag = th0 * half_width + centre
        diag = log_diag.exp()
        tanh_taps = torch.tanh(blocks[:, :, 1:].flatten(1, 2) / tap_bound)  # (B, K, C, H, W)
        r_pad = F.pad(r, (pad_w, pad_w, 0, pad_h))  # (B, C, H + pad_h, W + 2 pad_w), zero outside the image
        y = diag * r
        for k, (di, dj) in enumerate(offsets):
            y.addcmul_(tanh_taps[:, k], r_pad[..., di : di + h, pad_w + dj : pad_w + dj + w], value=tap_bound)
        out = (log_diag - 0.5 * y.square()).flatten(1).sum(1) - _HALF_LOG_2PI * y[0].numel()  # (B,)
        ctx.save_for_backward(mu, r, diag, th0, tanh_taps, y, centres)
        ctx.statics = (offsets, num_blocks, half_width, tap_bound, pad_w, pad_h, channels)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        mu, r, diag, th0, tanh_taps, y, centres = ctx.saved_tensors
        offsets, num_blocks, half_width, tap_bound, pad_w, pad_h, channels = ctx.statics
        h, w = r.shape[-2:]
        block_taps = len(offsets) // num_blocks
        go = grad_out.view(-1, 1, 1, 1)
        g = -y * go  # dL / dy, (B, C, H, W)
        grad = torch.empty(  # one buffer in dist_params' layout; every channel is written below
            (r.shape[0], (1 + num_blocks * (block_taps + 1)) * channels, h, w), dtype=r.dtype, device=r.device
        )
        grad_raw = grad.unflatten(1, (grad.shape[1] // channels, channels))  # (B, 1 + Q, C, H, W)
        grad_blocks = grad_raw[:, 1:].unflatten(1, (num_blocks, block_taps + 1))  # (B, m, 1 + K_b, C, H, W)
        r_pad = F.pad(r, (pad_w, pad_w, 0, pad_h))
        grad_r_pad = torch.zeros_like(r_pad)  # one zero fill for all K taps
        for k, (di, dj) in enumerate(offsets):
            window = (..., slice(di, di + h), slice(pad_w + dj, pad_w + dj + w))
            t = tanh_taps[:, k]
            grad_t = grad_blocks[:, k // block_taps, 1 + k % block_taps]  # (B, C, H, W) view into grad
            torch.mul(g, r_pad[window], out=grad_t)
            grad_t.mul_(1.0 - t.square())
            grad_r_pad[window].addcmul_(t, g, value=tap_bound)  # L_{p+o_k, p} g_p lands on r_{p+o_k}
        gd = g * diag
        grad_r = grad_r_pad[..., :h, pad_w : pad_w + w].add_(gd)  # (B, C, H, W)
        torch.mul(grad_r, mu * (mu - 1.0), out=grad_raw[:, 0])  # d sigmoid = mu (1 - mu), and r = x - mu
        grad_lse = (gd * r).add_(go).mul_(1.0 - th0.square())  # dL/dlog L_pp times the soft clamp's slope
        if num_blocks == 1:
            grad_blocks[:, 0, 0].copy_(grad_lse)
        else:
            torch.mul(torch.softmax(centres, dim=1), grad_lse.unsqueeze(1), out=grad_blocks[:, :, 0])
        grad_x = grad_r if ctx.needs_input_grad[0] else None
        return grad_x, grad, None, None, None, None


def structured_log_prob(x: Tensor, dist_params: Tensor, offsets: tuple[Offset, ...], num_blocks: int,
                        clamp: tuple[float, float], tap_bound: float) -> Tensor:
    """log N(x; mu, (L L^T)^{-1}) per image, summed over channels: float (B,), nats (module docstring).

    Args:
        x: images, float (B, C, H, W) in [0, 1].
        dist_params: float (B, (1 + m (1 + K_b)) C, H, W) in ``StructuredGaussianLikelihood``'s plain / dilated
            layout (quantity-major; per block [t_0, K_b taps]).
        offsets: the K = m K_b raster-later offsets, block-major (``StructuredGaussianLikelihood.offsets``).
        num_blocks: m, 1 without dilations.
        clamp: (centre c, half-width h) of the soft clamp s(t) = c + h tanh((t - c) / h) of log L_pp.
        tap_bound: b > 0 bounding the taps, in 1 / image units.

    Raises:
        ValueError: ``dist_params`` channels not (1 + m (1 + K_b)) C, or K not divisible by m.
    """
    if len(offsets) % num_blocks:
        raise ValueError(f"{len(offsets)} offsets do not split into {num_blocks} blocks")
    expected = (1 + num_blocks * (len(offsets) // num_blocks + 1)) * x.shape[1]
    if dist_params.dim() != 4 or dist_params.shape[1] != expected or dist_params.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"dist_params must be (B, {expected}, H, W) for x {tuple(x.shape)}, got {tuple(dist_params.shape)}")
    return _StructuredLogProb.apply(x, dist_params, tuple(offsets), int(num_blocks), clamp, float(tap_bound))
