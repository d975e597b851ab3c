"""Figures are PNGs of the data they are given: the points, Pareto overlay and image grids are read back from the
figures (and the grids' pixels from the PNGs) and compared with the inputs; the Pareto mask equals a brute-force
dominance check."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
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


@pytest.fixture()
def saved_figures(monkeypatch) -> list[Figure]:
    """Every matplotlib Figure saved while the test runs, in order (the figure functions return only PNG bytes)."""
    saved: list[Figure] = []
    real_savefig = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def points_by_label(ax) -> dict[str, set[tuple[float, float]]]:
    """Scatter points of an Axes by legend label: label -> {(x, y)}."""
    return {c.get_label(): {tuple(map(float, xy)) for xy in c.get_offsets()} for c in ax.collections}


def row_points(df: pd.DataFrame, x: str, y: str) -> set[tuple[float, float]]:
    return {(float(a), float(b)) for a, b in zip(df[x], df[y], strict=True)}


def has_line(ax, xs, ys) -> bool:
    """Whether a plotted line has exactly these vertices (any style)."""
    return any(
        len(line.get_xdata()) == len(xs)
        and np.allclose(np.asarray(line.get_xdata(), float), xs)
        and np.allclose(np.asarray(line.get_ydata(), float), ys)
        for line in ax.lines
    )


def test_pareto_figure_plots_every_trial_and_the_brute_force_front(trials, saved_figures):
    trials.loc[0, "test_sharpness_ratio"] = np.nan  # missing values are dropped, not plotted
    assert_png(pareto_mse_sharpness(trials))
    (ax,) = saved_figures[-1].axes
    plotted = points_by_label(ax)
    finite = trials.dropna()
    assert set(plotted) == {"gaussian", "structured", "blur", "Pareto front"}
    for family, rows in finite.groupby("family"):
        assert plotted[family] == row_points(rows, "test_mse", "test_sharpness_ratio"), family

    values = finite[["test_mse", "test_sharpness_ratio"]].to_numpy()
    front = finite[brute_force_front(values, [True, False])].sort_values("test_mse")
    assert 0 < len(front) < len(finite)
    assert plotted["Pareto front"] == row_points(front, "test_mse", "test_sharpness_ratio")
    assert has_line(ax, front["test_mse"], front["test_sharpness_ratio"])  # the front joined in MSE order
    assert has_line(ax, [0, 1], [1, 1])  # y = 1, the inputs' own sharpness (axes-fraction x)

    assert_png(pareto_mse_sharpness(trials.iloc[:0]))  # no data: still a figure, with no points
    (empty,) = saved_figures[-1].axes
    assert not empty.collections and "no trials" in empty.texts[0].get_text()


def test_trials_stopped_early_are_crosses_and_the_front_is_over_full_schedules(trials, saved_figures):
    """A trial ASHA stopped after a few epochs is under-trained: drawn apart, never part of the front."""
    values = trials[["test_mse", "test_sharpness_ratio"]].to_numpy()
    everyone = brute_force_front(values, [True, False])
    trials["complete"] = True
    trials.loc[np.flatnonzero(everyone)[0], "complete"] = False  # a front member of all trials, stopped early
    trials.loc[5, "complete"] = False
    assert_png(pareto_mse_sharpness(trials, complete="complete"))
    (ax,) = saved_figures[-1].axes
    plotted = points_by_label(ax)
    markers = {c.get_label(): c.get_paths()[0].vertices.shape for c in ax.collections}
    stopped = trials[~trials["complete"]]
    for family, rows in stopped.groupby("family"):
        assert plotted[f"{family} (stopped early)"] == row_points(rows, "test_mse", "test_sharpness_ratio")
        assert markers[f"{family} (stopped early)"] != markers[family]  # another marker than the full trials
    for family, rows in trials[trials["complete"]].groupby("family"):
        assert plotted[family] == row_points(rows, "test_mse", "test_sharpness_ratio")
    complete = trials[trials["complete"]]
    front = complete[brute_force_front(complete[["test_mse", "test_sharpness_ratio"]].to_numpy(), [True, False])]
    assert plotted["Pareto front"] == row_points(front, "test_mse", "test_sharpness_ratio")
    assert not plotted["Pareto front"] & row_points(stopped, "test_mse", "test_sharpness_ratio")
    assert "full schedule" in ax.get_title()


def test_variance_loss_figure_plots_every_trial_and_y_equals_x(trials, saved_figures):
    assert_png(variance_loss_vs_mse(trials))
    (ax,) = saved_figures[-1].axes
    plotted = points_by_label(ax)
    assert set(plotted) == {"gaussian", "structured", "blur"}
    for family, rows in trials.groupby("family"):
        assert plotted[family] == row_points(rows, "test_mse", "test_variance_loss_recon"), family
    (line,) = [ln for ln in ax.lines if ln.get_label() == "y = x"]
    xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    np.testing.assert_array_equal(xs, ys)
    assert xs.min() <= 0 and xs.max() >= trials[["test_mse", "test_variance_loss_recon"]].to_numpy().max()


def png_pixel(png: np.ndarray, fig: Figure, ax, col: float, row: float, dpi: int = 120) -> np.ndarray:
    """The saved PNG's RGB in [0, 1] at an Axes' data point (col, row) (figures are saved at ``dpi``)."""
    x, y = ax.transData.transform((col, row)) * dpi / fig.dpi  # display points of the on-screen figure
    return png[int(png.shape[0] - y), int(x), :3] / 255.0


def assert_mosaic(fig: Figure, ax, png: np.ndarray, images: np.ndarray, columns: int, pad: int = 1) -> None:
    """The Axes shows ``images`` (N, H, W, 3) in rows of ``columns`` with ``pad`` pixels between them: the plotted
    array block by block, and the PNG at the centre of every 4th image pixel."""
    (shown,) = ax.images
    mosaic = np.asarray(shown.get_array(), float)
    n, h, w, _ = images.shape
    for i in range(n):
        top, left = (i // columns) * (h + pad), (i % columns) * (w + pad)
        np.testing.assert_array_equal(mosaic[top : top + h, left : left + w], images[i])
        for r in range(0, h, 4):
            for c in range(0, w, 4):
                # 8-bit PNG: within one quantisation step (and a half for the resampler's rounding)
                pixel = png_pixel(png, fig, ax, left + c, top + r)
                np.testing.assert_allclose(pixel, images[i, r, c], atol=1.5 / 255)


def read_png(data: bytes) -> np.ndarray:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def test_grid_comparison_shows_each_set_in_its_cell(saved_figures):
    rng = np.random.default_rng(1)
    inputs = rng.random((6, 16, 16, 3))
    samples = rng.random((6, 16, 16, 3))
    rows = {
        "gaussian": {"input": inputs, "reconstruction": inputs * 0.8, "sample": samples},
        "grey": {"input": inputs[..., 0], "reconstruction": inputs[..., :1]},  # grey sets, no samples
    }
    png = read_png(grid_comparison(rows, columns=4))
    fig = saved_figures[-1]
    assert png.shape[1] > png.shape[0]  # three set columns side by side, two family rows
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["input", "reconstruction", "sample"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["gaussian", "grey"]
    grey = np.repeat(inputs[..., :1], 3, axis=-1)  # grey shown as equal RGB
    expected = {(0, 0): inputs, (0, 1): inputs * 0.8, (0, 2): samples, (1, 0): grey, (1, 1): grey}
    for (i, j), images in expected.items():
        assert_mosaic(fig, axes[i, j], png, images, columns=4)
    assert not axes[1, 2].images and axes[1, 2].texts[0].get_text() == "n/a"  # grey has no samples


def test_residual_maps_show_inputs_reconstructions_and_residuals(saved_figures):
    rng = np.random.default_rng(2)
    inputs = rng.random((3, 12, 12, 3))
    recons = {"gaussian": inputs * 0.8, "blur": np.clip(inputs + 0.1, 0, 1)}
    png = read_png(residual_maps(inputs, recons))
    fig = saved_figures[-1]
    axes = np.array(fig.axes[: 5 * 3]).reshape(5, 3)  # then the colour bar's own Axes
    residuals = {f: np.abs(inputs - r).mean(-1) for f, r in recons.items()}
    vmax = max(r.max() for r in residuals.values())
    shown = [inputs, recons["gaussian"], residuals["gaussian"], recons["blur"], residuals["blur"]]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == [
        "input", "gaussian\nreconstruction", "gaussian\n|x - recon|", "blur\nreconstruction", "blur\n|x - recon|"]
    for i, images in enumerate(shown):
        for j in range(3):
            (image,) = axes[i, j].images
            np.testing.assert_array_equal(np.asarray(image.get_array(), float), images[j])
            if images.ndim == 4:  # RGB cells: the PNG shows the pixels themselves
                for r in range(0, 12, 3):
                    for c in range(0, 12, 3):
                        np.testing.assert_allclose(png_pixel(png, fig, axes[i, j], c, r), images[j, r, c],
                                                   atol=1.5 / 255)
            else:  # residual cells: one colour scale from 0 to the largest residual shown
                assert image.get_clim() == pytest.approx((0.0, vmax))
    with pytest.raises(ValueError, match="do not match"):
        residual_maps(inputs, {"bad": inputs[:, :8]})


def test_tile_layout():
    images = np.zeros((5, 4, 4, 3))
    mosaic = tile(images, columns=2, pad=1)
    assert mosaic.shape == (3 * 5 - 1, 2 * 5 - 1, 3)
    assert mosaic[4, 0, 0] == 1.0 and mosaic[0, 0, 0] == 0.0  # padding row between image rows


def test_grid_comparison_leaves_no_empty_canvas():
    """Eight images in rows of four make mosaics twice as wide as tall: the cells follow, so white background
    (never a colour of these images, all below 0.8) stays a small share of the PNG (it was 59% in square cells)."""
    rng = np.random.default_rng(0)
    rows = {arm: {name: rng.random((8, 16, 16, 3)) * 0.8 for name in ("input", "reconstruction", "sample")}
            for arm in ("gaussian", "structured")}
    png = read_png(grid_comparison(rows, columns=4)) / 255.0
    background = (png.min(axis=-1) > 0.97).mean()
    assert background < 0.35, background
