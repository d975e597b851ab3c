"""How a number is written wherever a person reads it (report tables, the MLflow sweep run's description, the
console): 4 significant digits, never an exponent between 1e-4 and 1e6, ``unavailable`` for a missing value."""

from __future__ import annotations

import math

UNAVAILABLE = "unavailable"


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return not math.isfinite(float(value))  # NaN and +-inf (a perfect PSNR is inf, but not a table entry)
    except (TypeError, ValueError):
        return True


def _decimals_for(value: float, significant: int) -> int:
    """Decimal places that show ``significant`` significant digits of ``value``, never negative."""
    if value == 0:
        return significant - 1
    return max(0, significant - 1 - math.floor(math.log10(abs(value))))


def format_value(value: object, significant: int = 4) -> str:
    """A number with ``significant`` significant digits (no exponent between 1e-4 and 1e6); ``unavailable``.

    Args:
        value: a float (NaN / None / non-numeric: unavailable).
        significant: digits to keep (>= 1). Integer digits are never rounded away (12345.6 -> ``12346``).

    Returns:
        str, e.g. ``339.7``, ``0.01234``, ``-4016``.
    """
    if _is_missing(value):
        return UNAVAILABLE
    x = float(value)  # type: ignore[arg-type]
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-4):
        return f"{x:.{significant - 1}e}"
    return f"{x:.{_decimals_for(x, significant)}f}"
