"""The one JSON-safe conversion used by every part of protoseg that writes JSON.

Store attributes, calibration files, report tables and the CLI's ``--json`` output all go
through :func:`jsonable`: numpy scalars and arrays become Python numbers and lists,
structured arrays become lists of row dicts, paths become strings, sets become sorted
lists, and non-finite floats (NaN, ±Inf) become ``None`` — JSON has no NaN, and an
undefined score must stay visibly undefined rather than turn into a number.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["jsonable", "dumps", "text"]


def text(value: Any) -> str:
    """``str`` that decodes bytes (HDF5 strings may come back as bytes)."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", "replace")
    return str(value)


def jsonable(obj: Any, *, default: Callable[[Any], Any] | None = None) -> Any:
    """Return ``obj`` as plain JSON-safe Python (NaN/Inf → None).

    Parameters
    ----------
    obj : any
        Nested dicts, lists, tuples, numpy arrays/scalars, paths, sets and plain values.
    default : callable, optional
        Called on a value of any other type; its result is converted in turn. Without it
        such a value raises ``TypeError`` naming the type (a store must not hold ``repr``s).

    Returns
    -------
    object
        Only dicts with string keys, lists, str, int, float (finite), bool and None.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (bytes, np.bytes_, np.str_)):
        return text(obj)
    if isinstance(obj, Mapping):
        return {text(k): jsonable(v, default=default) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        if obj.dtype.names:
            return [{n: jsonable(row[n], default=default) for n in obj.dtype.names} for row in obj]
        return jsonable(obj.tolist(), default=default)
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, default=default) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(jsonable(v, default=default) for v in obj)
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return jsonable(obj.item(), default=default)
    if default is not None:
        return jsonable(default(obj))
    raise TypeError(f"cannot write {type(obj).__name__} value {obj!r} as JSON; "
                    "pass numbers, strings, lists or dicts")


def dumps(obj: Any, *, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """``json.dumps(jsonable(obj))``, refusing NaN so the text is valid JSON everywhere."""
    kwargs.setdefault("allow_nan", False)
    return json.dumps(jsonable(obj, default=default), **kwargs)
