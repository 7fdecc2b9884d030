"""Errors that carry their context as attributes, not as text to be parsed later.

A kernel knows the *sample* (its position in the batch) that went wrong; the scoring run
knows which *case* and *file* that sample is and which *tensor* was being scored. Each
stage adds what it knows by raising the next error ``from`` the previous one, keeping the
attributes, so the CLI prints one line and a caller can read ``err.case_id`` directly.
"""
from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["NonFiniteFeaturesError", "CaseError", "OutOfMemoryError", "CaseSkippedWarning", "option",
           "cli_messages"]

#: How messages name an option: as the Python keyword (``nonfinite='skip'``) or, while the
#: CLI runs, as its flag (``--nonfinite skip``) — advice must be followable from where the
#: user stands, never both mixed.
_STYLE: contextvars.ContextVar[str] = contextvars.ContextVar("protoseg_option_style", default="python")
#: Keywords whose flag is not simply ``--`` + the keyword with dashes.
_FLAGS = {"save_maps": "--maps", "card": "--card", "store": "-o/--output", "guide_kind": "--soft-guide",
          "estimators": "--estimator"}


def option(name: str, value: Any = True) -> str:
    """Name an option in a message the way the caller spells it.

    ``option("nonfinite", "skip")`` is ``nonfinite='skip'`` for Python callers and
    ``--nonfinite skip`` inside :func:`cli_messages`; ``option("overwrite")`` is
    ``overwrite=True`` or ``--overwrite``.
    """
    if _STYLE.get() == "cli":
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        return flag if value is True else f"{flag} {value}"
    return f"{name}={value!r}"


@contextmanager
def cli_messages() -> Iterator[None]:
    """Within this block, :func:`option` names CLI flags (the ``protoseg`` command sets it)."""
    token = _STYLE.set("cli")
    try:
        yield
    finally:
        _STYLE.reset(token)


class NonFiniteFeaturesError(ValueError):
    """Features hold NaN or Inf; ``sample`` is the first affected position in the batch.

    Attributes
    ----------
    sample : int
        Index along the batch axis of the first affected sample.
    n_samples : int
        How many samples of the batch are affected.
    """

    def __init__(self, message: str, *, sample: int, n_samples: int = 1) -> None:
        super().__init__(message)
        self.sample = int(sample)
        self.n_samples = int(n_samples)


class CaseError(ValueError):
    """Scoring stopped on one case; the message and the attributes name it.

    Attributes
    ----------
    case_id : str
        The dataset's id of the case.
    path : str
        The file (or ``file.h5:images[i]``) the case was read from; ``""`` when unknown.
    tensor : str or None
        The hidden tensor being scored, when the failure is specific to one.
    """

    def __init__(self, message: str, *, case_id: str, path: str = "",
                 tensor: str | None = None) -> None:
        where = f"case {case_id!r}" + (f" ({path})" if path else "")
        super().__init__(f"{where}: {message}")
        self.case_id = str(case_id)
        self.path = str(path)
        self.tensor = tensor


class OutOfMemoryError(MemoryError):
    """A batch could not be allocated; the message says what and what to lower.

    Raised by the scoring loop ``from`` the original ``MemoryError`` (or onnxruntime's
    allocation failure). The batches finished before it are kept in the store's parts, so
    the same call with a smaller batch or budget resumes.

    Attributes
    ----------
    case_ids : tuple of str
        The cases of the batch that failed.
    batch_size : int
        The batch size in force.
    needed : int or None
        Bytes of hidden tensors the largest pass exposes for this batch, when known.
    budget : int or None
        The memory budget in bytes (``max_memory``, or the automatic limit).
    """

    def __init__(self, message: str, *, case_ids: tuple[str, ...] = (), batch_size: int = 0,
                 needed: int | None = None, budget: int | None = None) -> None:
        super().__init__(message)
        self.case_ids = tuple(str(c) for c in case_ids)
        self.batch_size = int(batch_size)
        self.needed = needed
        self.budget = budget


class CaseSkippedWarning(UserWarning):
    """A case was skipped (unreadable, wrong channels, time series...) and the run goes on.

    ``str()`` is the whole message (``case 'x': why; case skipped``); ``case_id`` and
    ``reason`` (the why alone) let a front end word it its own way (the CLI prints
    ``case 'x' skipped: why``, one line each).
    """

    def __init__(self, case_id: str, reason: str) -> None:
        super().__init__(f"case {case_id!r}: {reason}; case skipped")
        self.case_id = case_id
        self.reason = reason
