"""Input checks shared by the public functions: clear ``ValueError`` s that name the argument."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
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


def check_integer(value: Any, name: str, *, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int`` (an integer type, not a bool or a float such as 4.7) that
    is at least ``minimum``, or raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be an integer, got the bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and v < minimum:
        qualifier = {0: "a non-negative", 1: "a positive"}.get(minimum, f"an >= {minimum}")
        raise ValueError(f"{name} must be {qualifier} integer, got {v}")
    return int(v)


def check_hidden(hidden: Any) -> tuple[int, ...]:
    """Return the hidden-layer widths ``hidden`` as a tuple of positive ints, or raise
    ``ValueError`` naming the bad entry (a width of 0 made a network with no units)."""
    if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence | np.ndarray):
        raise ValueError(f"hidden must be a sequence of layer widths, got {hidden!r}")
    return tuple(check_integer(h, f"hidden[{i}]", minimum=1) for i, h in enumerate(hidden))


def check_nonnegative(value: Any, name: str) -> float:
    """Return ``value`` as a finite float ``>= 0``, or raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be a non-negative number, got the bool {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}") from exc
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return v


def collect_errors(*checks: Callable[[], Any]) -> tuple[list[Any], list[str]]:
    """Run every check and gather the messages of the ``ValueError`` s they raise.

    Returns ``(results, messages)`` with ``None`` in ``results`` where a check failed, so that
    a function can report all its bad arguments in one error instead of the first only.
    """
    results: list[Any] = []
    messages: list[str] = []
    for check in checks:
        try:
            results.append(check())
        except ValueError as exc:
            results.append(None)
            messages.append(str(exc))
    return results, messages


def json_depth(text: str) -> int:
    """Greatest nesting depth of ``[``/``{`` in the JSON ``text``, without parsing it.

    Brackets inside string literals do not count: a ``"`` opens or closes a string unless an
    odd number of backslashes precedes it. Vectorised, linear in ``len(text)`` and free of
    recursion: meant to be called *before* :func:`json.loads`, whose recursive parser raises
    ``RecursionError`` on a document nested a few thousand deep.
    """
    code = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    if code.size == 0:
        return 0
    pos = np.arange(code.size)
    backslash = code == ord("\\")
    # index of the last byte at or before i that is not a backslash (-1 if none)
    last_plain = np.maximum.accumulate(np.where(backslash, -1, pos))
    run_before = pos - 1 - np.concatenate([[-1], last_plain[:-1]])  # backslashes just before i
    quote = (code == ord('"')) & (run_before % 2 == 0)
    outside = np.cumsum(quote) % 2 == 0
    step = (
        (code == ord("[")).astype(np.int64)
        + (code == ord("{"))
        - (code == ord("]"))
        - (code == ord("}"))
    )
    return int(np.cumsum(np.where(outside, step, 0)).max(initial=0))
