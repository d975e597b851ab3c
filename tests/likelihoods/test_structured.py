"""Tests of the structured-residual Gaussian likelihood (Dorta et al. 2018) against dense references.

Every reference here is built independently of the library's band code: L is assembled entry by entry with
Python loops over pixels straight from the raw decoder channels and the documented parameterisation, and
densities / solves use dense torch.distributions / torch.linalg calls. All in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from study.likelihoods.structured import StructuredGaussianLikelihood
from study.likelihoods.structured_sampling import solve_upper_banded, solve_upper_dense

DT = torch.float64
LO, HI = -math.log(1e3), math.log(1e3)  # the documented default soft bounds of log L_pp

# (constructor kwargs, id) for every parameterisation the tests sweep.
MODES = [
    (dict(neighbourhood_size=3), "nf3"),
    (dict(neighbourhood_size=5), "nf5"),
    (dict(neighbourhood_size=3, num_basis=3), "nf3-basis3"),
    (dict(neighbourhood_size=5, num_basis=2), "nf5-basis2"),
    (dict(dilations=[1, 2]), "dil12"),
    (dict(dilations=[1, 2], num_basis=2), "dil12-basis2"),
]
SHAPES = [(4, 4), (5, 7), (8, 8), (6, 4)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread. On a loaded 2-core box, 2 OpenMP threads made each tiny float64
    conv2d ~30x slower (spin-waiting on a busy core), which dominated the 1,000-example hypothesis test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------- independent reference
def ref_offsets(kwargs: dict) -> list[list[tuple[int, int]]]:
    """Per block, the raster-later taps in raster order (written out from the definition, not imported)."""
    if kwargs.get("dilations"):
        return [[(0, d), (d, -d), (d, 0), (d, d)] for d in kwargs["dilations"]]
    k = kwargs.get("neighbourhood_size", 3) // 2
    taps = [(0, dj) for dj in range(1, k + 1)]
    taps += [(di, dj) for di in range(1, k + 1) for dj in range(-k, k + 1)]
    return [taps]


def soft_clamp(t: float) -> float:
    c, h = (LO + HI) / 2, (HI - LO) / 2
    return c + h * math.tanh((t - c) / h)


def ref_cholesky(lik: StructuredGaussianLikelihood, kwargs: dict, params: torch.Tensor) -> torch.Tensor:
    """Dense L (B, C, n, n) by loops over pixels, from the raw channels and the module docstring's formulas."""
    blocks = ref_offsets(kwargs)
    nb = kwargs.get("num_basis")
    b_sz, p_ch, h, w = params.shape
    q = len(blocks) * (nb if nb else 1 + len(blocks[0]))
    c_sz = p_ch // (1 + q)
    n = h * w
    out = torch.zeros(b_sz, c_sz, n, n, dtype=DT)
    basis = None
    if nb:
        basis = lik.basis.detach().to(DT)
        basis = basis if kwargs.get("dilations") else basis.unsqueeze(0)  # (m, 1 + K_b, n_b)
    for b in range(b_sz):
        for c in range(c_sz):

            def chan(qq: int, i: int, j: int) -> float:  # quantity qq (1-based precision channel) at (i, j)
                return float(params[b, qq * c_sz + c, i, j])

            for i in range(h):
                for j in range(w):
                    p = i * w + j
                    column: dict[tuple[int, int], float] = {}
                    if not nb:
                        centres = []
                        for m, taps in enumerate(blocks):
                            base = 1 + m * (1 + len(taps))
                            centres.append(chan(base, i, j))
                            for t, o in enumerate(taps):
                                column[o] = 1e3 * math.tanh(chan(base + 1 + t, i, j) / 1e3)
                        diag = math.exp(soft_clamp(math.log(sum(math.exp(v) for v in centres))))
                    else:
                        # Unclamped column = sum over (block, basis) of w * B; then rescaled to the clamped diag.
                        raw_diag = 0.0
                        raw_taps: dict[tuple[int, int], float] = {}
                        for m, taps in enumerate(blocks):
                            for k in range(nb):
                                wt = math.exp(chan(1 + m * nb + k, i, j))
                                raw_diag += wt * math.exp(float(basis[m, 0, k]))
                                for t, o in enumerate(taps):
                                    raw_taps[o] = raw_taps.get(o, 0.0) + wt * float(basis[m, 1 + t, k])
                        diag = math.exp(soft_clamp(math.log(raw_diag)))
                        column = {o: v * diag / raw_diag for o, v in raw_taps.items()}
                    out[b, c, p, p] = diag
                    for (di, dj), v in column.items():
                        if 0 <= i + di < h and 0 <= j + dj < w:
                            out[b, c, (i + di) * w + (j + dj), p] = v
    return out


def make(kwargs: dict, shape: tuple[int, int], batch: int = 2, channels: int = 2, seed: int = 0):
    """(likelihood, params, x) with a well-conditioned precision (taps ~ 0.3 of the diagonal)."""
    g = torch.Generator().manual_seed(seed)
    lik = StructuredGaussianLikelihood(**kwargs).to(DT)
    if kwargs.get("num_basis"):
        with torch.no_grad():
            lik.basis.copy_(0.3 * torch.randn(lik.basis.shape, generator=g, dtype=DT))
    params = torch.randn(batch, lik.param_channels(channels), *shape, generator=g, dtype=DT)
    if not kwargs.get("num_basis"):
        params[:, channels:] *= 0.3  # taps small against L_pp ~ 1 so MultivariateNormal's inversion is accurate
    x = torch.rand(batch, channels, *shape, generator=g, dtype=DT)
    return lik, params, x


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kwargs", [m[0] for m in MODES], ids=[m[1] for m in MODES])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
def test_log_prob_matches_dense_multivariate_normal(kwargs, shape):
    lik, params, x = make(kwargs, shape)
    ref_l = ref_cholesky(lik, kwargs, params)
    mvn = torch.distributions.MultivariateNormal(lik.mean(params).flatten(2), precision_matrix=ref_l @ ref_l.mT)
    expected = mvn.log_prob(x.flatten(2)).sum(1)  # channels independent
    got = lik.log_prob(x, params)
    assert got.shape == (2,) and got.dtype == DT
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(lik.dense_cholesky_factor(params), ref_l, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [m[0] for m in MODES], ids=[m[1] for m in MODES])
@pytest.mark.parametrize("shape", [(4, 4), (5, 7), (3, 9)], ids=["4x4", "5x7", "3x9"])
def test_factor_is_lower_triangular_with_expected_nonzeros(kwargs, shape):
    lik, params, _ = make(kwargs, shape)
    dense = lik.dense_cholesky_factor(params)
    h, w = shape
    assert torch.all(torch.triu(dense, diagonal=1) == 0)
    assert torch.all(torch.diagonal(dense, dim1=-2, dim2=-1) > 0)
    # Count by brute force: a tap exists where the neighbour lands inside the image.
    expected = h * w + sum(
        1
        for taps in ref_offsets(kwargs)
        for di, dj in taps
        for i in range(h)
        for j in range(w)
        if 0 <= i + di < h and 0 <= j + dj < w
    )
    assert lik.num_nonzeros(h, w) == expected
    for b in range(dense.shape[0]):
        for c in range(dense.shape[1]):
            assert int(torch.count_nonzero(dense[b, c])) == expected


def test_nonzeros_border_count_example():
    # n_f = 3 on 4 x 4: taps (0,1): 4*3, (1,-1): 3*3, (1,0): 3*4, (1,1): 3*3 -> 16 + 12 + 9 + 12 + 9 = 58.
    assert StructuredGaussianLikelihood(3).num_nonzeros(4, 4) == 58


# Modes the fused training path (study.likelihoods.structured_fused) covers: every mode without a basis.
FUSED_MODES = [
    (dict(neighbourhood_size=3), "nf3"),
    (dict(neighbourhood_size=5), "nf5"),
    (dict(neighbourhood_size=7), "nf7"),
    (dict(dilations=[1, 2]), "dil12"),
    (dict(dilations=[1, 2, 4]), "dil124"),
]


@pytest.mark.parametrize("kwargs", [m[0] for m in FUSED_MODES], ids=[m[1] for m in FUSED_MODES])
@pytest.mark.parametrize("shape", [(4, 4), (5, 7), (9, 3)], ids=["4x4", "5x7", "9x3"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_log_prob_matches_composed_path(kwargs, shape, channels_last):
    """The fused autograd node gives the composed path's value and gradients (w.r.t. params and x) on random
    float64 inputs with large taps and log-diagonals, in NCHW and channels-last layouts."""
    g = torch.Generator().manual_seed(sum(shape))
    fused = StructuredGaussianLikelihood(**kwargs)
    composed = StructuredGaussianLikelihood(**kwargs, fused=False)
    assert fused.fused and not composed.fused
    params = 3.0 * torch.randn(3, fused.param_channels(2), *shape, generator=g, dtype=DT)
    if channels_last:
        params = params.contiguous(memory_format=torch.channels_last)
    x = torch.rand(3, 2, *shape, generator=g, dtype=DT)
    weights = torch.randn(3, generator=g, dtype=DT)  # a non-uniform incoming gradient per image
    results = []
    for lik in (fused, composed):
        p, xx = params.clone().requires_grad_(True), x.clone().requires_grad_(True)
        lp = lik.log_prob(xx, p)
        results.append((lp, *torch.autograd.grad((weights * lp).sum(), (p, xx))))
    for got, expected in zip(results[0], results[1]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("kwargs", [m[0] for m in FUSED_MODES], ids=[m[1] for m in FUSED_MODES])
def test_fused_log_prob_gradcheck(kwargs):
    """Finite differences (float64) confirm the hand-written backward, for params and x."""
    g = torch.Generator().manual_seed(3)
    lik = StructuredGaussianLikelihood(**kwargs)
    params = torch.randn(2, lik.param_channels(2), 5, 4, generator=g, dtype=DT).requires_grad_(True)
    x = torch.rand(2, 2, 5, 4, generator=g, dtype=DT).requires_grad_(True)
    assert torch.autograd.gradcheck(lik.log_prob, (x, params))


def test_fused_log_prob_float32_close_to_float64():
    """In float32 (the training dtype) the fused path stays within float32 rounding of the float64 value."""
    g = torch.Generator().manual_seed(4)
    lik = StructuredGaussianLikelihood(neighbourhood_size=5)
    params = torch.randn(4, lik.param_channels(3), 16, 16, generator=g, dtype=DT)
    x = torch.rand(4, 3, 16, 16, generator=g, dtype=DT)
    p32 = params.float().requires_grad_(True)
    p64 = params.clone().requires_grad_(True)
    lp32, lp64 = lik.log_prob(x.float(), p32), lik.log_prob(x, p64)
    lp32.sum().backward()
    lp64.sum().backward()
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-4)


def test_fused_log_prob_rejects_bad_layout():
    from study.likelihoods.structured_fused import structured_log_prob

    lik = StructuredGaussianLikelihood(neighbourhood_size=3)
    x = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="params must be"):
        structured_log_prob(x, torch.zeros(1, 7, 4, 4), lik.offsets, 1, (0.0, 1.0), 10.0)
    with pytest.raises(ValueError, match="blocks"):
        structured_log_prob(x, torch.zeros(1, 6, 4, 4), lik.offsets, 3, (0.0, 1.0), 10.0)


@pytest.mark.parametrize("kwargs", [m[0] for m in MODES], ids=[m[1] for m in MODES])
@pytest.mark.parametrize("shape", [(8, 8), (6, 9)], ids=["8x8", "6x9"])
def test_banded_solve_is_exact_and_matches_dense(kwargs, shape):
    lik, params, _ = make(kwargs, shape, seed=1)
    factor = lik.sparse_factor(params)
    u = torch.randn(2, 2, *shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    eps = solve_upper_banded(factor, u)
    dense = lik.dense_cholesky_factor(params)
    residual = (dense.mT @ eps.flatten(2).unsqueeze(-1)).squeeze(-1) - u.flatten(2)  # L^T eps - u
    assert residual.norm() / u.norm() < 1e-12
    torch.testing.assert_close(eps, solve_upper_dense(dense, u), rtol=1e-10, atol=1e-12)


def test_sample_residual_reproducible_and_sample_adds_mean():
    lik, params, _ = make(dict(neighbourhood_size=3), (5, 6))
    e1 = lik.sample_residual(params, generator=torch.Generator().manual_seed(7))
    e2 = lik.sample_residual(params, generator=torch.Generator().manual_seed(7))
    s = lik.sample(params, generator=torch.Generator().manual_seed(7))
    assert e1.shape == (2, 2, 5, 6) and not e1.requires_grad
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    torch.testing.assert_close(s, lik.mean(params) + e1)


@pytest.mark.parametrize(
    "kwargs", [dict(neighbourhood_size=3), dict(dilations=[1, 2], num_basis=2)], ids=["nf3", "dil12-basis2"]
)
def test_empirical_covariance_matches_inverse_precision(kwargs):
    """200k draws on one 4 x 4 channel: every entry of the sample covariance within 5 standard errors.

    With the mean known (zero), the sample covariance S_ij = mean(eps_i eps_j) of N Gaussian draws has variance
    (Sigma_ii Sigma_jj + Sigma_ij^2) / N. Over the 136 distinct entries a 5-sigma bound gives a false-failure
    rate below 1e-4 (and the seed is fixed), while a wrong covariance (e.g. L^{-1} L^{-T} instead of
    L^{-T} L^{-1}) misses by many standard errors.
    """
    n_draws = 200_000
    lik, params, _ = make(kwargs, (4, 4), batch=1, channels=1, seed=3)
    eps = lik.sample_residual(params.expand(n_draws, -1, -1, -1), generator=torch.Generator().manual_seed(4))
    eps = eps.reshape(n_draws, 16)
    emp = eps.T @ eps / n_draws
    l_ref = ref_cholesky(lik, kwargs, params)[0, 0]
    sigma = torch.linalg.inv(l_ref @ l_ref.T)
    stderr = ((torch.outer(sigma.diagonal(), sigma.diagonal()) + sigma.square()) / n_draws).sqrt()
    z = (emp - sigma).abs() / stderr
    assert z.max() < 5.0, f"max z = {z.max():.2f}"


@pytest.mark.parametrize("kwargs", [m[0] for m in MODES], ids=[m[1] for m in MODES])
def test_precision_diagonal_matches_dense(kwargs):
    lik, params, _ = make(kwargs, (5, 7))
    ref_l = ref_cholesky(lik, kwargs, params)
    expected = torch.diagonal(ref_l @ ref_l.mT, dim1=-2, dim2=-1).reshape(2, 2, 5, 7)
    torch.testing.assert_close(lik.precision_diagonal(params), expected, rtol=1e-12, atol=1e-12)
    log_l = torch.diagonal(ref_l, dim1=-2, dim2=-1).log().reshape(2, 2, 5, 7)
    torch.testing.assert_close(lik.cholesky_log_diagonal(params), log_l, rtol=1e-12, atol=1e-12)


def test_param_channels_and_mean():
    assert StructuredGaussianLikelihood(3).param_channels(1) == 1 + 5
    assert StructuredGaussianLikelihood(5).param_channels(3) == 3 * (1 + 13)
    assert StructuredGaussianLikelihood(7, num_basis=4).param_channels(1) == 5
    assert StructuredGaussianLikelihood(dilations=[1, 2]).param_channels(1) == 1 + 10
    assert StructuredGaussianLikelihood(dilations=[1, 2, 4], num_basis=2).param_channels(2) == 2 * (1 + 6)
    assert StructuredGaussianLikelihood(5, num_basis=3).basis.shape == (13, 3)
    assert StructuredGaussianLikelihood(dilations=[1, 2], num_basis=3).basis.shape == (2, 5, 3)
    lik, params, _ = make(dict(neighbourhood_size=3), (4, 4))
    torch.testing.assert_close(lik.mean(params), torch.sigmoid(params[:, :2]))


def test_log_prob_rejects_mismatched_shapes():
    lik, params, x = make(dict(neighbourhood_size=3), (4, 4))
    with pytest.raises(ValueError):
        lik.log_prob(x[:, :1], params)
    with pytest.raises(ValueError):
        lik.log_prob(x, params[:, :-1])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(neighbourhood_size=4),
        dict(neighbourhood_size=1),
        dict(neighbourhood_size=0),
        dict(neighbourhood_size=3.0),
        dict(num_basis=0),
        dict(num_basis=-2),
        dict(dilations=[]),
        dict(dilations=[0, 1]),
        dict(dilations=[1, 1]),
        dict(dilations=[1, 2], neighbourhood_size=5),
        dict(min_log_diagonal=2.0, max_log_diagonal=1.0),
        dict(max_log_diagonal=math.inf),
    ],
)
def test_bad_constructor_args_raise(kwargs):
    with pytest.raises(ValueError):
        StructuredGaussianLikelihood(**kwargs)


# ------------------------------------------------------------------------------- gradients at extremes
def _grad_liks(dtype: torch.dtype) -> list[StructuredGaussianLikelihood]:
    liks = [StructuredGaussianLikelihood(**kw).to(dtype) for kw, _ in MODES]
    for lik in liks:
        if lik.num_basis is not None:
            with torch.no_grad():
                lik.basis.copy_(torch.randn(lik.basis.shape, generator=torch.Generator().manual_seed(5)))
    return liks


# Built once: constructing modules per example would dominate the 1,000 examples.
_GRAD_LIKS = {torch.float64: _grad_liks(torch.float64), torch.float32: _grad_liks(torch.float32)}
_SPECIAL = {"max": 1.0, "-max": -1.0}  # times finfo(dtype).max


def _value(v, dtype: torch.dtype) -> float:
    return _SPECIAL[v] * torch.finfo(dtype).max if isinstance(v, str) else v


@settings(max_examples=1000, deadline=None)
@given(
    mode=st.integers(0, len(MODES) - 1),
    float32=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    scale=st.one_of(st.floats(0.0, 1e4), st.sampled_from([1e8, 1e30, "max"])),
    extreme=st.one_of(st.floats(-1e4, 1e4), st.sampled_from(["max", "-max", 1e-30, -1e-30])),
    extreme_frac=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
)
def test_log_prob_gradients_finite_for_extreme_params(mode, float32, seed, scale, extreme, extreme_frac):
    """Raw params in [-1e4, 1e4], up to the largest finite float of the dtype, on a whole or part of a 4 x 4
    image: log_prob and its gradients w.r.t. params (and the basis) stay finite (the soft bounds saturate)."""
    dtype = torch.float32 if float32 else DT
    lik = _GRAD_LIKS[dtype][mode]
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(1, lik.param_channels(1), 4, 4, generator=g, dtype=dtype).clamp(-1, 1)
    params = params * _value(scale, dtype)
    mask = torch.rand(params.shape, generator=g, dtype=dtype) < extreme_frac
    params = torch.where(mask, _value(extreme, dtype), params).requires_grad_(True)
    x = torch.rand(1, 1, 4, 4, generator=g, dtype=dtype)
    lik.zero_grad()
    lp = lik.log_prob(x, params)
    lp.sum().backward()
    assert torch.isfinite(lp).all()
    assert torch.isfinite(params.grad).all()
    if lik.num_basis is not None:
        assert torch.isfinite(lik.basis.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    lik, params, x = make(dict(dilations=[1, 2], num_basis=2), (8, 8), seed=6)
    u = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(8), dtype=DT)
    cpu_lp = lik.log_prob(x, params)
    cpu_eps = solve_upper_banded(lik.sparse_factor(params), u)
    lik_gpu = lik.cuda()
    torch.testing.assert_close(lik_gpu.log_prob(x.cuda(), params.cuda()).cpu(), cpu_lp)
    torch.testing.assert_close(solve_upper_banded(lik_gpu.sparse_factor(params.cuda()), u.cuda()).cpu(), cpu_eps)
