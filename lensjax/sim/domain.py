"""Domain checks for simulator parameters.

They raise ValueError naming the parameter when the value is concrete (a Python
number or a numpy/jax array outside a trace) and do nothing on tracers, so the
same public functions stay usable under jit, vmap and grad.
"""

from __future__ import annotations

import jax
import numpy as np


def _concrete(value) -> np.ndarray | None:
    """The value as a numpy array, or None if it is traced (unknown until run time)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_nonnegative(name: str, value) -> None:
    """Raise ValueError if a concrete `value` has a negative or NaN entry."""
    arr = _concrete(value)
    if arr is not None and arr.size and not np.all(arr >= 0):
        raise ValueError(f"{name} must be >= 0 (and not NaN), got {_describe(arr)}")


def check_positive(name: str, value) -> None:
    """Raise ValueError if a concrete `value` has an entry <= 0 or NaN."""
    arr = _concrete(value)
    if arr is not None and arr.size and not np.all(arr > 0):
        raise ValueError(f"{name} must be > 0, got {_describe(arr)}")


def check_in_range(name: str, value, low: float, high: float, *,
                   low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raise ValueError if a concrete `value` lies outside [low, high] (or open ends)."""
    arr = _concrete(value)
    if arr is None or not arr.size:
        return
    above = arr >= low if low_inclusive else arr > low
    below = arr <= high if high_inclusive else arr < high
    if not np.all(above & below):
        lo, hi = ("[" if low_inclusive else "("), ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {_describe(arr)}")


def check_positive_int(name: str, value) -> None:
    """Raise ValueError unless `value` is a Python/numpy integer > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _describe(arr: np.ndarray) -> str:
    if arr.ndim == 0:
        return repr(arr.item())
    bad = arr.ravel()
    return f"an array with min {np.nanmin(bad) if np.isfinite(bad).any() else bad[0]!r}"
