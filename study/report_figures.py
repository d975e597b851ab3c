"""Paper-style figures of evaluated trials, returned as PNG bytes (matplotlib's Agg canvas; no pyplot state).

- :func:`grid_comparison`: input / reconstruction / sample grids of every family side by side.
- :func:`residual_maps`: |x - reconstruction| heat maps per family, on one colour scale.
- :func:`pareto_mse_sharpness`: MSE vs sharpness ratio of every trial, Pareto front (low MSE, high sharpness)
  marked, by :func:`study.pareto.pareto_front`.
- :func:`variance_loss_vs_mse`: Asperti 2020's plot, variance loss of reconstructions vs MSE, with y = x.

Figures are built on :class:`matplotlib.figure.Figure` directly, so they neither need nor change a pyplot backend
and are safe to make from worker threads. PNGs carry no "Software" metadata, so the bytes depend on the data and the
matplotlib version only. The caller writes them (atomically).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from study.pareto import pareto_front

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Display order of image sets in :func:`grid_comparison`; other keys follow in their given order.
SET_ORDER = ("input", "reconstruction", "sample")


def _png(fig: Figure, dpi: int = 120) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def _as_rgb(images: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W), (N, H, W, 1) or (N, H, W, 3) float -> (N, H, W, 3) clipped to [0, 1]."""
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected images (N, H, W, 3) (or grey (N, H, W[, 1])), got {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.clip(arr, 0.0, 1.0)


def tile(images: np.ndarray, columns: int, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Mosaic of N images in rows of ``columns``, separated by ``pad`` pixels of ``pad_value``.

    Args:
        images: float (N, H, W, 3) in [0, 1], N >= 1.
        columns: images per row (>= 1).

    Returns:
        float (rows * (H + pad) - pad, columns * (W + pad) - pad, 3), rows = ceil(N / columns); empty cells padded.
    """
    n, h, w, c = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, c), pad_value, dtype=np.float64)
    for i in range(n):
        r, k = divmod(i, columns)
        out[r * (h + pad) : r * (h + pad) + h, k * (w + pad) : k * (w + pad) + w] = images[i]
    return out


def grid_comparison(rows: dict[str, dict[str, np.ndarray]], max_images: int = 16, columns: int = 4) -> bytes:
    """Input / reconstruction / sample grids of every family side by side (one figure row per family).

    Args:
        rows: family -> {set name -> images}; set names usually ``input``, ``reconstruction``, ``sample`` (shown in
            that order, others after). Images float (N, H, W, 3) in [0, 1] (grey (N, H, W) or (N, H, W, 1) is
            repeated to RGB; values are clipped to [0, 1]). A family lacking a set gets an empty "n/a" cell.
        max_images: the first this many images of each set are shown.
        columns: images per row inside one grid.

    Returns:
        PNG bytes.

    Raises:
        ValueError: an image set of the wrong shape.
    """
    sets: list[str] = [s for s in SET_ORDER if any(s in r for r in rows.values())]
    for sets_of_family in rows.values():
        sets += [s for s in sets_of_family if s not in sets]
    families = list(rows)
    n_rows, n_cols = max(1, len(families)), max(1, len(sets))
    # Cells take the mosaics' own aspect (8 images in rows of 4 are twice as wide as tall), so no canvas is empty.
    shown = [images[:max_images] for r in rows.values() for images in r.values() if len(images)]
    aspect = 1.0
    if shown:
        n, h, w = len(shown[0]), shown[0].shape[1], shown[0].shape[2]
        per_row = min(columns, n)
        aspect = (math.ceil(n / per_row) * (h + 1)) / (per_row * (w + 1))
    fig = Figure(figsize=(3.2 * n_cols + 0.8, 3.2 * aspect * n_rows + 0.6))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    if not families:
        axes[0, 0].text(0.5, 0.5, "no data", ha="center", va="center")
        axes[0, 0].axis("off")
    for i, family in enumerate(families):
        for j, name in enumerate(sets):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if name in rows[family] and len(rows[family][name]):
                images = _as_rgb(rows[family][name], f"{family}/{name}")[:max_images]
                ax.imshow(tile(images, columns), interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            if i == 0:
                ax.set_title(name, fontsize=11)
            if j == 0:
                ax.set_ylabel(family, fontsize=11)
    fig.tight_layout()
    return _png(fig)


def residual_maps(
    inputs: np.ndarray,
    recons_by_family: dict[str, np.ndarray],
    max_images: int = 8,
    show_reconstructions: bool = True,
) -> bytes:
    """|x - reconstruction| heat maps per family (mean over RGB channels), on one shared colour scale.

    Rows: the inputs; then per family its reconstructions (if ``show_reconstructions``) and the residual map.
    Columns: the first ``max_images`` images. The colour scale runs from 0 to the largest residual shown, in [0, 1]
    pixel units, with one colour bar.

    Args:
        inputs: float (N, H, W, 3) in [0, 1] (grey accepted as in :func:`grid_comparison`).
        recons_by_family: family -> float (N, H, W, 3) reconstructions of the same N inputs.
        max_images: images (columns) shown.
        show_reconstructions: add a row of reconstructions above each family's residuals.

    Returns:
        PNG bytes.

    Raises:
        ValueError: shapes that do not match the inputs.
    """
    x = _as_rgb(inputs, "inputs")[:max_images]  # (n, H, W, 3)
    n = x.shape[0]
    residuals: dict[str, np.ndarray] = {}
    recons: dict[str, np.ndarray] = {}
    for family, recon in recons_by_family.items():
        r = _as_rgb(recon, family)[:max_images]
        if r.shape != x.shape:
            raise ValueError(f"{family}: reconstructions {r.shape} do not match the inputs {x.shape}")
        recons[family] = r
        residuals[family] = np.abs(x - r).mean(-1)  # (n, H, W), [0, 1] units
    vmax = max((float(v.max()) for v in residuals.values()), default=1.0) or 1.0
    labels: list[tuple[str, str, np.ndarray]] = [("input", "image", x)]
    for family in recons_by_family:
        if show_reconstructions:
            labels.append((f"{family}\nreconstruction", "image", recons[family]))
        labels.append((f"{family}\n|x - recon|", "residual", residuals[family]))
    fig = Figure(figsize=(1.3 * max(n, 1) + 1.4, 1.4 * len(labels) + 0.3))
    axes = fig.subplots(len(labels), max(n, 1), squeeze=False)
    mappable = None
    for i, (label, kind, data) in enumerate(labels):
        for j in range(max(n, 1)):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < n:
                if kind == "image":
                    ax.imshow(data[j], interpolation="nearest")
                else:
                    mappable = ax.imshow(data[j], cmap="inferno", vmin=0.0, vmax=vmax, interpolation="nearest")
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02)
        bar.set_label("|x - recon|, mean over RGB, [0, 1] units", fontsize=8)
    return _png(fig)


def _scatter_by_family(ax, df: pd.DataFrame, x: str, y: str, label: str, complete: str | None = None) -> None:
    """One colour per ``label`` group; with a ``complete`` column, the rows where it is false (trials the scheduler
    stopped early) drawn as crosses of the same colour and labelled ``<group> (stopped early)``."""
    groups = df[label].astype(str) if label in df.columns else pd.Series("trials", index=df.index)
    full = (df[complete].astype(bool) if complete is not None and complete in df.columns
            else pd.Series(True, index=df.index))
    for index, name in enumerate(sorted(groups.unique())):
        colour = f"C{index % 10}"
        part = df[(groups == name) & full]
        if len(part):
            ax.scatter(part[x], part[y], s=28, alpha=0.8, label=name, color=colour)
        stopped = df[(groups == name) & ~full]
        if len(stopped):
            ax.scatter(stopped[x], stopped[y], s=30, alpha=0.8, marker="x", color=colour,
                       label=f"{name} (stopped early)")


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)


def _finite_rows(df: pd.DataFrame, x: str, y: str, label: str, complete: str | None = None) -> pd.DataFrame:
    """Columns x, y (and label, complete if present) of the rows where both x and y are finite; empty without x
    or y."""
    if x not in df or y not in df:
        return pd.DataFrame()
    data = df[[c for c in dict.fromkeys((x, y, label, complete)) if c is not None and c in df.columns]].copy()
    return data[np.isfinite(data[x].astype(float)) & np.isfinite(data[y].astype(float))]


def _axis_label(column: str) -> str:
    return {
        "test_mse": "MSE per pixel, [0, 1] scale (lower is better)",
        "test_mse_255": "MSE per pixel, [0, 255] scale (lower is better)",
        "val_mse_255": "validation MSE per pixel, [0, 255] scale (lower is better)",
        "test_sharpness_ratio": "sharpness ratio recon / input (higher is sharper)",
        "val_sharpness_ratio": "validation sharpness ratio recon / input (higher is sharper)",
    }.get(column, column)


def pareto_mse_sharpness(
    df: pd.DataFrame, x: str = "test_mse", y: str = "test_sharpness_ratio", label: str = "family",
    complete: str | None = None,
) -> bytes:
    """MSE (x) vs sharpness ratio (y) of every trial, coloured by ``label``, Pareto front circled and joined.

    The front minimises MSE and maximises sharpness (:func:`pareto_front`); the dotted line y = 1 is the inputs'
    own sharpness. Rows with a missing x or y are left out.

    Args:
        df: one row per trial with columns ``x``, ``y`` (and ``label`` for colours).
        x: MSE column (default ``test_mse``, per-pixel MSE on the [0, 1] scale; ``*_mse_255``: [0, 255]).
        y: sharpness column (default ``test_sharpness_ratio``, Laplacian variance recon / inputs).
        label: colour-group column (the arm).
        complete: optional bool column, true for trials that ran their full schedule. With it, the others (stopped
            early by the scheduler, so under-trained) are drawn as crosses and the front is computed over the
            complete trials only (the title says so).

    Returns:
        PNG bytes.
    """
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    data = _finite_rows(df, x, y, label, complete)
    title = "Blur vs error: Pareto front (min MSE, max sharpness)"
    if not len(data):
        _empty(ax, "no trials with both metrics")
    else:
        _scatter_by_family(ax, data, x, y, label, complete)
        candidates = data
        if complete is not None and complete in data.columns:
            candidates = data[data[complete].astype(bool)]
            title += "\nfront over trials that ran the full schedule; x: stopped early"
        front = candidates[pareto_front(candidates, minimise=[x], maximise=[y])].sort_values(x)
        if len(front):
            ax.plot(front[x], front[y], drawstyle="steps-post", color="black", linewidth=1, alpha=0.7)
            ax.scatter(front[x], front[y], s=110, facecolors="none", edgecolors="black", linewidths=1.2,
                       label="Pareto front")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.legend(fontsize=8)
    ax.set_xlabel(_axis_label(x))
    ax.set_ylabel(_axis_label(y))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def variance_loss_vs_mse(
    df: pd.DataFrame, x: str = "test_mse", y: str = "test_variance_loss_recon", label: str = "family",
    complete: str | None = None, scale: str = "[0, 1]",
) -> bytes:
    """Asperti 2020's plot: variance loss of reconstructions (y) vs their MSE (x), with the line y = x.

    Both are in [0, 1]^2 pixel units, so points on the line lost exactly as much per-pixel variance as their
    reconstruction error (Asperti observes VL ~ MSE for VAEs).

    Args:
        df: one row per trial with columns ``x``, ``y`` (and ``label`` for colours).
        x: MSE column, on the scale ``scale``.
        y: variance-loss column, on the same scale (squared units of it).
        label: colour-group column (the arm).
        complete: optional bool column (see :func:`pareto_mse_sharpness`): false rows drawn as crosses.
        scale: the pixel scale of both columns, for the axis labels (``[0, 1]`` or ``[0, 255]``).

    Returns:
        PNG bytes.
    """
    fig = Figure(figsize=(5.6, 5.0))
    ax = fig.subplots()
    data = _finite_rows(df, x, y, label, complete)
    if not len(data):
        _empty(ax, "no trials with both metrics")
    else:
        _scatter_by_family(ax, data, x, y, label, complete)
        hi = float(max(data[x].max(), data[y].max(), 0.0))
        lo = float(min(data[x].min(), data[y].min(), 0.0))
        span = (hi - lo) or 1.0
        ends = [lo - 0.05 * span, hi + 0.05 * span]
        ax.plot(ends, ends, color="grey", linestyle="--", linewidth=1, label="y = x")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"MSE per pixel, {scale} scale")
    ax.set_ylabel(f"variance loss of reconstructions, {scale}^2")
    ax.set_title("Variance loss vs MSE (Asperti 2020)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


__all__ = [
    "PNG_SIGNATURE",
    "grid_comparison",
    "pareto_front",
    "pareto_mse_sharpness",
    "residual_maps",
    "tile",
    "variance_loss_vs_mse",
]
