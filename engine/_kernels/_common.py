"""Shared settings of the private Numba kernels: fast-math flags, tile size, status codes."""
from __future__ import annotations

import numpy as np

from engine.status import Status


_FM = {"reassoc", "contract"}


_TILE = 2048  # positions per spatial tile in the channel loops (16 KiB of float64)


_OK = int(Status.OK)


_EMPTY_FOREGROUND = int(Status.EMPTY_FOREGROUND)


_EMPTY_BACKGROUND = int(Status.EMPTY_BACKGROUND)


_EMPTY_MASK = int(Status.EMPTY_MASK)


_NONFINITE = int(Status.NONFINITE)


_EMPTY_DICE = int(Status.EMPTY_DICE)
