"""Input checks shared by the public functions: clear ``ValueError`` s that name the argument."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_X(X: Any, name: str = "X", *, n_features: int | None = None, min_rows: int = 1):
    """Return ``X`` as a finite float64 2-D array, or raise ``ValueError`` naming ``name``."""
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array: {exc}") from exc
    if arr.ndim == 1 and n_features == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows = inputs), got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} row(s), got {arr.shape[0]}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(
            f"{name} has {arr.shape[1]} features but the source model expects {n_features}"
        )
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} contains NaN or inf (first at row {bad[0]}, column {bad[1]})")
    return arr


def check_y(y: Any, name: str = "y"):
    """Return ``y`` as a finite float64 1-D array, or raise ``ValueError`` naming ``name``."""
    try:
        arr = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array: {exc}") from exc
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} contains NaN or inf (first at index {np.argmax(~np.isfinite(arr))})"
        )
    return arr


def check_Xy(X: Any, y: Any, *, n_features: int | None = None, min_rows: int = 2):
    """Check ``X`` and ``y`` together: finite, matching lengths, at least ``min_rows`` rows."""
    X = check_X(X, "X", n_features=n_features, min_rows=0)
    y = check_y(y, "y")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X and y have mismatched lengths: {X.shape[0]} rows vs {y.shape[0]}")
    if X.shape[0] < min_rows:
        raise ValueError(f"y must have at least {min_rows} target rows, got {X.shape[0]}")
    return X, y


def check_positive(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a positive number, got {value!r}") from exc
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_probability(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from exc
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return v
