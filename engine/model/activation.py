"""Does the prediction hold what its model card says? Checks on the values themselves.

The card's ``activation`` tells what the prediction output *already holds*:

- ``sigmoid`` — probabilities in [0, 1], one independent channel per class;
- ``softmax`` — class probabilities in [0, 1] summing to 1 over the channel axis;
- ``logits`` — raw scores (the engine applies sigmoid to one channel, softmax to several).

Declaring ``sigmoid``/``softmax`` for raw scores makes the engine read logits as
probabilities, so :func:`check_activation` refuses it with one line naming the observed
range and the fix; :func:`infer_activation` says what values look like. Both read only
finite values and never copy the array to float64 (the channel sums are float64, one per
position). Exporters call the check on the prediction they compute for their numeric check;
scoring calls it on the first batch.

Tolerances absorb float rounding: values may lie in ``[-VALUE_TOL, 1 + VALUE_TOL]`` and
channel sums within ``SUM_TOL`` of 1.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engine.errors import option
from engine.model.metadata import ACTIVATIONS

__all__ = ["ActivationError", "check_activation", "infer_activation", "channel_axis_of",
           "VALUE_TOL", "SUM_TOL"]

#: Values of probabilities may stray this far outside [0, 1] (float rounding).
VALUE_TOL = 1e-4
#: Softmax channel sums may differ this much from 1 (float32 accumulation over channels).
SUM_TOL = 1e-3

_CHANNELS_LAST = ("NWC", "NHWC", "NDHWC")


class ActivationError(ValueError):
    """The prediction's values contradict the declared activation.

    Attributes
    ----------
    declared : str
        The activation declared (``"sigmoid"`` or ``"softmax"``).
    suggested : str
        What the values look like: ``"logits"`` (values outside [0, 1]) or ``"sigmoid"``
        (probabilities whose channels do not sum to 1).
    observed : str
        ``"values"`` or ``"channel sums"``: what ``low``/``high`` range over.
    low, high : float
        The observed range.
    """

    def __init__(self, message: str, *, declared: str, suggested: str, observed: str,
                 low: float, high: float) -> None:
        super().__init__(message)
        self.declared = declared
        self.suggested = suggested
        self.observed = observed
        self.low = float(low)
        self.high = float(high)

    def with_note(self, note: str) -> "ActivationError":
        """The same error with ``note`` appended to its one-line message."""
        return ActivationError(f"{self.args[0]}{note}", declared=self.declared, suggested=self.suggested,
                               observed=self.observed, low=self.low, high=self.high)


def channel_axis_of(layout: str | None, ndim: int) -> int | None:
    """The channel axis of a prediction of rank ``ndim`` read in ``layout``, as the engine reads it.

    ``None`` when the prediction has no channel axis (rank one less than the layout: one
    channel). Without a layout, axis 1 for rank >= 3, else ``None``.
    """
    if layout is None:
        return 1 if ndim >= 3 else None
    if ndim == len(layout) - 1:
        return None
    if ndim != len(layout):
        raise ValueError(f"a prediction of rank {ndim} cannot be read in layout {layout!r} "
                         f"(rank {len(layout)}, or {len(layout) - 1} without a channel axis)")
    return ndim - 1 if layout in _CHANNELS_LAST else 1


def _value_range(values: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the finite values; ``None`` when there are none."""
    if values.size == 0:
        return None
    finite = np.isfinite(values)
    if finite.all():
        return float(values.min()), float(values.max())
    if not finite.any():
        return None
    return (float(values.min(where=finite, initial=np.inf)),
            float(values.max(where=finite, initial=-np.inf)))


def _channel_sums(values: np.ndarray, channel_axis: int | None) -> tuple[float, float, int] | None:
    """(min, max) of the per-position channel sums over positions with finite values, and the
    number of channels; ``None`` when no position is finite."""
    if channel_axis is None:
        sums, n = values.astype(np.float64, copy=False).ravel(), 1
    else:
        n = values.shape[channel_axis]
        sums = values.sum(axis=channel_axis, dtype=np.float64)
    finite = np.isfinite(sums)
    if not finite.any():
        return None
    sums = sums if finite.all() else sums[finite]
    return float(sums.min()), float(sums.max()), int(n)


def _prepare(values: Any, channel_axis: int | None, layout: str | None) -> tuple[np.ndarray, int | None]:
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"prediction values must be a real numeric array; got dtype {arr.dtype}")
    if layout is not None:
        channel_axis = channel_axis_of(layout, arr.ndim)
    elif channel_axis is not None:
        if not -arr.ndim <= channel_axis < arr.ndim:
            raise ValueError(f"channel_axis={channel_axis} is out of range for values of rank {arr.ndim}")
        channel_axis %= arr.ndim
    return arr, channel_axis


def infer_activation(values: Any, channel_axis: int | None = 1, *, layout: str | None = None,
                     value_tol: float = VALUE_TOL, sum_tol: float = SUM_TOL) -> str:
    """What the values look like: ``"softmax"``, ``"sigmoid"`` or ``"logits"``.

    Parameters
    ----------
    values : array-like
        The prediction (batch first).
    channel_axis : int or None
        Its channel axis; ``None`` when it has none (one channel).
    layout : str, optional
        The prediction's layout (``"NCHW"``, ``"NHWC"``...); when given, the channel axis is
        taken from it (:func:`channel_axis_of`) and ``channel_axis`` is ignored.
    value_tol, sum_tol : float
        Tolerances (see the module docstring).

    Returns
    -------
    str
        ``"logits"`` when a finite value lies outside ``[-value_tol, 1 + value_tol]`` (or no
        value is finite: nothing shows probabilities); else ``"softmax"`` when there are
        several channels and every finite position's channels sum to 1 within ``sum_tol``;
        else ``"sigmoid"``. Values in [0, 1] are only *consistent* with probabilities:
        small raw scores can lie there too.
    """
    arr, axis = _prepare(values, channel_axis, layout)
    rng = _value_range(arr)
    if rng is None or rng[0] < -value_tol or rng[1] > 1 + value_tol:
        return "logits"
    sums = _channel_sums(arr, axis)
    if sums is not None and sums[2] > 1 and abs(sums[0] - 1) <= sum_tol and abs(sums[1] - 1) <= sum_tol:
        return "softmax"
    return "sigmoid"


def check_activation(values: Any, activation: str, channel_axis: int | None = 1,
                     where: str = "the prediction", *, layout: str | None = None,
                     value_tol: float = VALUE_TOL, sum_tol: float = SUM_TOL) -> None:
    """Raise when the prediction's values contradict ``activation``.

    Parameters
    ----------
    values : array-like
        The prediction (batch first), as the model outputs it.
    activation : {"sigmoid", "softmax", "logits"}
        What the card says the output already holds.
    channel_axis : int or None
        The channel axis; ``None`` when the prediction has none (one channel).
    where : str
        What the values are, for the message (``"prediction output 'prob'"``).
    layout : str, optional
        The prediction's layout; when given it decides the channel axis
        (:func:`channel_axis_of`), as the engine reads the output.
    value_tol, sum_tol : float
        Tolerances: values in ``[-value_tol, 1 + value_tol]``, channel sums within
        ``sum_tol`` of 1.

    Raises
    ------
    ActivationError
        (a ``ValueError``) with one line: the declared activation, the observed range, the fix.

        - ``sigmoid`` or ``softmax`` and a finite value outside [0, 1] → suggests ``logits``;
        - ``softmax`` with values in [0, 1] whose channels do not sum to 1 (a single channel
          included) → suggests ``sigmoid`` (independent per-channel probabilities), or
          ``logits`` for raw scores.
    ValueError
        For an unknown activation or a layout the values' rank does not fit.

    Notes
    -----
    ``logits`` is never refused (raw scores can take any value); ``sigmoid`` on channels that
    sum to 1 is accepted (the engine reads sigmoid and softmax probabilities alike). NaN and
    Inf are ignored (the non-finite checks report them).

    Examples
    --------
    >>> check_activation(np.array([[[-2.0, 3.0]]]), "sigmoid", where="prediction output 'y'")
    Traceback (most recent call last):
    ...
    engine.model.activation.ActivationError: prediction output 'y': activation='sigmoid' \
declares probabilities in [0, 1], but its values range from -2 to 3; they look like raw scores: \
pass activation='logits'
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    if activation == "logits":
        return
    arr, axis = _prepare(values, channel_axis, layout)
    declared = option("activation", activation)
    rng = _value_range(arr)
    if rng is None:
        return
    low, high = rng
    if low < -value_tol or high > 1 + value_tol:
        raise ActivationError(
            f"{where}: {declared} declares probabilities in [0, 1], but its values range from "
            f"{low:.4g} to {high:.4g}; they look like raw scores: pass {option('activation', 'logits')}",
            declared=activation, suggested="logits", observed="values", low=low, high=high)
    if activation == "sigmoid":
        return
    sums = _channel_sums(arr, axis)
    if sums is None:
        return
    s_low, s_high, n = sums
    if abs(s_low - 1) <= sum_tol and abs(s_high - 1) <= sum_tol:
        return
    if n == 1:
        what = f"but it has a single channel, whose values range from {s_low:.4g} to {s_high:.4g}"
    else:
        what = f"but the sums over its {n} channels range from {s_low:.4g} to {s_high:.4g}"
    raise ActivationError(
        f"{where}: {declared} declares class probabilities summing to 1, {what}; "
        f"independent per-channel probabilities are {option('activation', 'sigmoid')} "
        f"(raw scores: {option('activation', 'logits')})",
        declared=activation, suggested="sigmoid", observed="channel sums", low=s_low, high=s_high)
