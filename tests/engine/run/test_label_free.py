"""Cases without a mask in a labelled run keep their label-free layer SA (issue 13 #1).

A run scored against the ground truth gives such cases NaN with NO_REFERENCE where the ground
truth is needed; their SA against the prediction (prediction as guide and reference) is kept
in ``label_free_scores``, equal to what a label-free run of the same cases gives.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine.run import score_dataset
from engine.status import Status
from tests import models


def _folder(root: Path, n: int, without_mask: tuple[int, ...]) -> Path:
    root.mkdir()
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[:32, :32] / 32
    for i in range(n):
        m = (yy - rng.uniform(0.3, 0.7)) ** 2 + (xx - rng.uniform(0.3, 0.7)) ** 2 < 0.05
        img = np.clip(m * 110 + rng.normal(70, 30, m.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"c{i}.png")
        if i not in without_mask:
            Image.fromarray(m.astype(np.uint8) * 255).save(root / f"c{i}_mask.png")
    return root


def test_cases_without_a_mask_keep_their_label_free_sa(tmp_path):
    model = models.save(models.unet(batch="N", metadata=True), tmp_path / "u.onnx")
    data = _folder(tmp_path / "cases", 5, without_mask=(1, 3))
    run = score_dataset(model, data, tmp_path / "gt.h5", batch_size=2)
    assert run.n_no_reference == 2
    st = engine.open_store(run.store)
    assert st.config["reference"] == "ground_truth"
    free = st.label_free_scores()
    assert free["score"].shape == st.layer_scores()["score"].shape
    # the others: not computed (their scores against the ground truth are in layer_scores)
    assert (free["status"][[0, 2, 4]] == Status.NOT_COMPUTED).all()
    assert np.isnan(free["score"][[0, 2, 4]]).all()
    # the same numbers as a label-free run of the same cases
    label_free = engine.open_store(score_dataset(model, data, tmp_path / "pred.h5", batch_size=2,
                                                 reference="prediction").store)
    ref = label_free.layer_scores()
    for name in ("score", "status", "tp", "fp", "fn"):
        np.testing.assert_array_equal(free[name][[1, 3]], ref[name][[1, 3]])
    assert np.isfinite(free["score"][[1, 3]]).any()
    # a label-free run has no such block
    with pytest.raises(KeyError, match="label_free_scores"):
        label_free.label_free_scores()
