"""Status codes: why a score is undefined (SPEC §2).

Every score the engine produces comes with a status of the same shape. A score is
finite only when its status is :attr:`Status.OK`; every other status names the reason
the score is NaN — with one exception the caller asks for: with ``empty="one"`` a
score whose map and reference are both empty is 1.0 and keeps :attr:`Status.EMPTY_DICE`,
so aggregates can still tell such cases apart. Codes are stored as ``uint8`` in arrays and in HDF5 stores; their
meaning is fixed (new codes may be added, existing ones never change).
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

__all__ = ["Status", "describe", "status_names"]


class Status(IntEnum):
    """Why a ProtoSeg map or an SA score is (un)defined."""

    #: Score defined.
    OK = 0
    #: ``Σ g·m = 0``: the guide has no foreground inside the mask, so the foreground
    #: prototype does not exist.
    EMPTY_FOREGROUND = 1
    #: ``Σ (1-g)·m = 0``: no background inside the mask, background prototype undefined.
    EMPTY_BACKGROUND = 2
    #: The tissue mask is empty: neither prototype exists.
    EMPTY_MASK = 3
    #: ``|b| + |y| = 0``: nothing predicted by the map and nothing in the reference;
    #: Dice is 0/0 (NaN by default, 1.0 with ``empty="one"``).
    EMPTY_DICE = 4
    #: The features held NaN or Inf and the caller asked to skip such samples.
    NONFINITE = 5
    #: Not computed (e.g. the case could not be read, or was not part of this run).
    NOT_COMPUTED = 6
    #: The score needs the case's ground truth, and the case has no mask.
    NO_REFERENCE = 7


_REASONS = {
    Status.OK: "ok",
    Status.EMPTY_FOREGROUND: "guide has no foreground inside the mask (no foreground prototype)",
    Status.EMPTY_BACKGROUND: "guide has no background inside the mask (no background prototype)",
    Status.EMPTY_MASK: "tissue mask is empty (no prototype)",
    Status.EMPTY_DICE: "map and reference are both empty (Dice 0/0)",
    Status.NONFINITE: "features contain NaN or Inf (skipped)",
    Status.NOT_COMPUTED: "not computed",
    Status.NO_REFERENCE: "the case has no mask (no ground truth to score against)",
}


def describe(code: int | Status) -> str:
    """Return the one-line human reason for a status code."""
    try:
        return _REASONS[Status(int(code))]
    except ValueError:
        return f"unknown status code {int(code)}"


def status_names(codes: np.ndarray) -> np.ndarray:
    """Map an array of status codes to their enum names (``"OK"``, ``"EMPTY_DICE"``...)."""
    codes = np.asarray(codes)
    names = np.array([s.name for s in Status] + ["UNKNOWN"], dtype=object)
    idx = np.where(codes < len(Status), codes, len(Status)).astype(np.intp)
    return names[idx]
