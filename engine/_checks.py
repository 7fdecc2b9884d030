"""Small shared validation helpers: one-line errors saying what was received and expected."""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["check_choice", "as_array", "check_not_empty", "check_unit_interval", "as_binary_uint8"]


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``; else raise ValueError listing them."""
    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"{name}={value!r} is not valid; expected one of {', '.join(map(repr, choices))}{hint}"
        )
    return value


def as_array(value: Any, name: str) -> np.ndarray:
    """``np.asarray`` with a clear TypeError for objects that are not arrays of numbers."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{name} must be array-like; received {type(value).__name__} ({exc})") from None
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise TypeError(
            f"{name} must be a numeric array; received dtype {arr.dtype} "
            f"(from {type(value).__name__}); pass a NumPy array of numbers"
        )
    return arr


def check_not_empty(arr: np.ndarray, name: str) -> None:
    """Raise ValueError when any axis of ``arr`` has length 0."""
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); every axis must have length >= 1")


def check_unit_interval(arr: np.ndarray, name: str) -> None:
    """Raise ValueError unless every value of ``arr`` is finite and within [0, 1]."""
    if arr.dtype == np.bool_:
        return
    lo = arr.min()
    hi = arr.max()
    if not (lo >= 0 and hi <= 1):  # NaN fails both comparisons
        if np.isnan(lo) or np.isnan(hi) or not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or Inf; expected values within [0, 1]: clean or fill it first")
        raise ValueError(
            f"{name} has values in [{float(lo):g}, {float(hi):g}]; expected values within [0, 1] "
            "(pass a probability or a binary map, not logits or labels)"
        )


def as_binary_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """Return ``arr`` as a C-contiguous uint8 array of 0/1; ValueError for other values."""
    if arr.dtype == np.bool_:
        return np.ascontiguousarray(arr).view(np.uint8)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be boolean or numeric; received dtype {arr.dtype}")
    ok = (arr == 0) | (arr == 1)
    if not ok.all():
        bad = arr[~ok].ravel()[0]
        raise ValueError(
            f"{name} must be binary (0/1 or bool); received a value {bad!r}; threshold it first "
            "(e.g. reference > 0.5)"
        )
    return np.ascontiguousarray(arr, dtype=np.uint8)
