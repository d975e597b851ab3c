"""The Pareto front of trials on several objectives: which trials no other trial beats on all of them.

Pure numpy / pandas, so the sweep stage (the Pareto trials of a multi-objective search) and the report's figures
share one rule without the sweep depending on plotting code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def pareto_front(df: pd.DataFrame, minimise: Sequence[str] = (), maximise: Sequence[str] = ()) -> np.ndarray:
    """Mask of the non-dominated rows (the Pareto front) for the given objectives.

    Row j dominates row i when it is no worse in every objective (<= for ``minimise``, >= for ``maximise``) and
    strictly better in at least one. Identical rows do not dominate each other, so ties are all on the front. Rows
    with a missing (NaN) objective are never on the front and never dominate.

    Args:
        df: one row per candidate; the named columns numeric.
        minimise, maximise: column names (at least one in total).

    Returns:
        bool array (len(df),), True on the front, in ``df``'s row order.

    Raises:
        ValueError: no objective given.
        KeyError: a column is missing.
    """
    names = list(minimise) + list(maximise)
    if not names:
        raise ValueError("give at least one column to minimise or maximise")
    # Turn every objective into "smaller is better".
    values = np.column_stack(
        [df[c].to_numpy(dtype=np.float64) for c in minimise] + [-df[c].to_numpy(dtype=np.float64) for c in maximise]
    )  # (n, k)
    finite = np.isfinite(values).all(axis=1)
    v = values[finite]  # (m, k)
    if v.shape[0] == 0:
        return np.zeros(len(df), dtype=bool)
    no_worse = (v[:, None, :] <= v[None, :, :]).all(-1)  # [j, i]: j <= i everywhere
    better = (v[:, None, :] < v[None, :, :]).any(-1)  # [j, i]: j < i somewhere
    dominated = (no_worse & better).any(axis=0)  # (m,)
    mask = np.zeros(len(df), dtype=bool)
    mask[np.flatnonzero(finite)] = ~dominated
    return mask
