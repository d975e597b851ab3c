"""Figures are PNGs; the Pareto mask equals a brute-force dominance check."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from study.report_figures import (
    PNG_SIGNATURE,
    grid_comparison,
    pareto_front,
    pareto_mse_sharpness,
    residual_maps,
    tile,
    variance_loss_vs_mse,
)


def brute_force_front(points: np.ndarray, minimise: list[bool]) -> np.ndarray:
    """O(n^2 k) loop straight from the definition; ``minimise[k]`` False means maximise column k."""
    signs = np.where(minimise, 1.0, -1.0)
    on_front = []
    for i, p in enumerate(points):
        if not np.isfinite(p).all():
            on_front.append(False)
            continue
        dominated = False
        for j, q in enumerate(points):
            if j == i or not np.isfinite(q).all():
                continue
            no_worse = all(signs[k] * q[k] <= signs[k] * p[k] for k in range(len(p)))
            better = any(signs[k] * q[k] < signs[k] * p[k] for k in range(len(p)))
            dominated |= no_worse and better
        on_front.append(not dominated)
    return np.array(on_front)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 60
    # Rounded values make ties and duplicates common; a few NaNs must be excluded.
    points = np.round(rng.random((n, 3)), 1)
    points[rng.choice(n, 3, replace=False), rng.integers(0, 3)] = np.nan
    df = pd.DataFrame(points, columns=["mse", "sharp", "fid"])
    mask = pareto_front(df, minimise=["mse", "fid"], maximise=["sharp"])
    expected = brute_force_front(points[:, [0, 2, 1]], [True, True, False])
    np.testing.assert_array_equal(mask, expected)
    assert mask.any()


def test_pareto_front_small_cases():
    df = pd.DataFrame({"mse": [1.0, 2.0, 1.0, 0.5], "sharp": [0.5, 0.9, 0.5, 0.1]})
    # (1, .5) twice: ties stay; (2, .9) is sharper; (.5, .1) has the lowest error: nothing dominated.
    assert pareto_front(df, minimise=["mse"], maximise=["sharp"]).tolist() == [True, True, True, True]
    df.loc[4] = [0.4, 0.95]  # dominates everything
    assert pareto_front(df, minimise=["mse"], maximise=["sharp"]).tolist() == [False] * 4 + [True]
    with pytest.raises(ValueError):
        pareto_front(df)


def assert_png(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as im:
        return im.size


@pytest.fixture()
def trials() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    mse = rng.uniform(0.005, 0.03, 12)
    return pd.DataFrame({
        "family": ["gaussian"] * 4 + ["structured"] * 4 + ["blur"] * 4,
        "test_mse": mse,
        "test_sharpness_ratio": rng.uniform(0.1, 0.9, 12),
        "test_variance_loss_recon": mse * rng.uniform(0.7, 1.1, 12),
    })


def test_scatter_figures_are_png(trials):
    assert_png(pareto_mse_sharpness(trials))
    assert_png(variance_loss_vs_mse(trials))
    trials.loc[0, "test_sharpness_ratio"] = np.nan  # missing values are dropped, not plotted
    assert_png(pareto_mse_sharpness(trials))
    assert_png(pareto_mse_sharpness(trials.iloc[:0]))  # no data: still a figure


def test_image_figures_are_png():
    rng = np.random.default_rng(1)
    inputs = rng.random((6, 16, 16, 3))
    rows = {
        "gaussian": {"input": inputs, "reconstruction": inputs * 0.8, "sample": rng.random((6, 16, 16, 3))},
        "grey": {"input": inputs[..., 0], "reconstruction": inputs[..., :1]},  # grey sets, no samples
    }
    width, height = assert_png(grid_comparison(rows))
    assert width > height  # three set columns side by side, two family rows
    assert_png(residual_maps(inputs, {"gaussian": inputs * 0.8, "blur": np.clip(inputs + 0.1, 0, 1)}))
    with pytest.raises(ValueError, match="do not match"):
        residual_maps(inputs, {"bad": inputs[:, :8]})


def test_tile_layout():
    images = np.zeros((5, 4, 4, 3))
    mosaic = tile(images, columns=2, pad=1)
    assert mosaic.shape == (3 * 5 - 1, 2 * 5 - 1, 3)
    assert mosaic[4, 0, 0] == 1.0 and mosaic[0, 0, 0] == 0.0  # padding row between image rows
