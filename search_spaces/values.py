"""Value rules shared by validation and the models: numbers as YAML writes them, categorical choices
and how they compare, Optuna's step grid, JSON-like data. Pure functions; import nothing of ours."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["GRID_ATOL", "as_float", "as_int", "is_choice", "choice_key", "on_grid", "is_json_data"]

# Optuna's own test of "on the step grid" (FloatDistribution._contains).
GRID_ATOL = 1.0e-8


def as_float(value: Any) -> float | None:
    """A number, or a numeric string (YAML 1.1 reads ``1e-4`` as a string); never a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def as_int(value: Any) -> int | None:
    """An integer, or a float / numeric string with an integral value; never a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    f = as_float(value)
    if f is None or not math.isfinite(f) or not f.is_integer():
        return None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    return int(f)


def is_choice(value: Any) -> bool:
    """Whether ``value`` may be a categorical choice: null, a bool, a number or a string."""
    return value is None or isinstance(value, (bool, int, float, str))


def choice_key(value: Any) -> tuple[str, Any]:
    """Equality of choices as Optuna sees them, except that bools never equal numbers."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", float(value))
    return (type(value).__name__, value)


def on_grid(value: float, low: float, step: float) -> bool:
    """Whether ``value`` is ``low + k * step`` for an integer ``k`` (to Optuna's tolerance)."""
    k = (value - low) / step
    return abs(k - round(k)) < GRID_ATOL * max(1.0, abs(k))


def is_json_data(value: Any) -> bool:
    """Null, a bool, a finite number, a string, or a list/mapping (string keys) of those."""
    if is_choice(value):
        return not (isinstance(value, float) and not math.isfinite(value))
    if isinstance(value, (list, tuple)):
        return all(is_json_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_json_data(v) for k, v in value.items())
    return False
