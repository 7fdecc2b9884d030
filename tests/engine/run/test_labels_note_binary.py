"""``_labels_note`` reads a binary mask's labels from its min and max: the note (and the
error of a multi-class model) must be those of ``np.unique`` over every mask."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from engine.datasets import Case
from engine.errors import CaseError
from engine.run.batch import _labels_note

rng = np.random.default_rng(5)
MASKS = {
    "binary": [(rng.random((6, 7)) > 0.5).astype(np.uint8) for _ in range(3)],
    "empty and full": [np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8)],
    "one label 255": [np.where(rng.random((5, 5)) > 0.5, 255, 0).astype(np.uint8)],
    "labels 0..3": [rng.integers(0, 4, (6, 6)).astype(np.uint8), np.ones((3, 3), np.uint8)],
    "uint16": [rng.integers(0, 2, (4, 4)).astype(np.uint16), np.full((2, 2), 300, np.uint16)],
    "bool": [rng.random((4, 4)) > 0.5],
    "int8": [rng.integers(0, 2, (4, 4)).astype(np.int8)],
    "no mask": [None, (rng.random((4, 4)) > 0.5).astype(np.uint8)],
}


def _naive(plan, cases, ok):
    seen = set()
    for i in ok:
        if cases[i].mask is None:
            continue
        vals = {int(v) for v in np.unique(cases[i].mask)}
        if not plan.binary_model and sorted(vals - set(plan.classes) - {0}):
            return "error"
        seen |= vals - {0}
    return len(seen) > 1 if plan.binary_model else ()


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("binary", [True, False])
def test_the_labels_seen_are_those_of_np_unique(name, binary):
    plan = SimpleNamespace(binary_model=binary, classes=[1] if binary else [1, 2])
    cases = [Case(str(i), None, m) for i, m in enumerate(MASKS[name])]
    ok = list(range(len(cases)))
    want = _naive(plan, cases, ok)
    if want == "error":
        with pytest.raises(CaseError):
            _labels_note(plan, cases, ok)
        return
    got = _labels_note(plan, cases, ok)
    assert (len(got) == 1) == bool(want) if binary else got == ()
