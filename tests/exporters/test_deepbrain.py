"""The shipped deepbrain.onnx (issue 4's real case) and the script that reproduces it."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from engine.model.metadata import read_metadata  # noqa: E402
from exporters._common import run_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "cli" / "data" / "deepbrain"
MODEL = DATA / "deepbrain.onnx"
COLIN = Path("/usr/share/mricron/templates")
HIDDEN = [
    "conv3d", "conv3d_1", "conv3d_2", "conv3d_3", "conv3d_4", "conv3d_5", "conv3d_transpose",
    "concat", "conv3d_6", "conv3d_transpose_1", "concat_1", "conv3d_7", "conv3d_transpose_2",
    "concat_2", "conv3d_8",
]


def _script():
    spec = importlib.util.spec_from_file_location("convert_deepbrain", ROOT / "scripts" / "convert_deepbrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_model_card_and_outputs():
    assert MODEL.stat().st_size < 2 * 1024 * 1024
    proto = onnx.load(MODEL)
    onnx.checker.check_model(proto)
    assert [o.name for o in proto.graph.output] == ["prob"] + HIDDEN
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "img" and dims[0].dim_param  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [128, 128, 128, 1]
    meta = read_metadata(proto)
    assert meta["framework"] == "tensorflow"
    assert meta["input"] == {"name": "img", "layout": "NDHWC", "size": [128, 128, 128]}
    assert meta["prediction"] == {"output": "prob", "activation": "sigmoid", "layout": "NDHWC",
                                  "classes": [0], "threshold": 0.5}
    assert meta["preprocessing"]["resize"] is True and meta["preprocessing"]["scaling"] == "minmax"
    assert set(meta["hidden"]) == set(HIDDEN)
    assert all(v["layout"] == "NDHWC" for v in meta["hidden"].values())
    assert meta["hidden"]["conv3d_1"]["layer"] == "conv3d_1/Relu"
    assert meta["hidden"]["concat"]["layer"] == "concat"


def test_licence_notice_shipped():
    text = (DATA / "LICENSE-deepbrain.txt").read_text()
    assert "MIT License" in text and "Ivan Itzcovich" in text
    assert "Permission is hereby granted" in text
    assert "deepbrain" in (DATA / "README.md").read_text()


@pytest.mark.skipif(not (COLIN / "ch2.nii.gz").exists(), reason="Colin27 (Debian mricron-data) not installed")
def test_segments_colin27_with_onnxruntime_only():
    nib = pytest.importorskip("nibabel")
    from engine.resize import resize_linear

    image = np.asarray(nib.load(COLIN / "ch2.nii.gz").dataobj, dtype=np.float32)
    brain = np.asarray(nib.load(COLIN / "ch2bet.nii.gz").dataobj) > 0
    small = resize_linear(image, (128, 128, 128))
    small = (small - small.min()) / (small.max() - small.min())
    out = run_onnx(MODEL, {"img": small[None, ..., None].astype(np.float32)}, ["prob", "conv3d_8", "conv3d_4"])
    assert out["conv3d_8"].shape[:4] == (1, 128, 128, 128)  # channels last, full resolution
    assert out["conv3d_4"].shape[:4] == (1, 32, 32, 32)
    prob = out["prob"][0, ..., 0]
    assert np.all((prob >= 0) & (prob <= 1))
    pred = resize_linear(prob, image.shape) > 0.5
    dice = 2 * np.logical_and(pred, brain).sum() / (pred.sum() + brain.sum())
    assert dice > 0.9  # SPEC §6: about 0.93


@pytest.mark.slow
def test_conversion_reproduces(tmp_path):
    """Needs TensorFlow and the wheel: set PROTOSEG_DEEPBRAIN_WHEEL=/path/deepbrain-0.1-py3-none-any.whl."""
    wheel = os.environ.get("PROTOSEG_DEEPBRAIN_WHEEL")
    if not wheel or not Path(wheel).exists():
        pytest.skip("set PROTOSEG_DEEPBRAIN_WHEEL to a downloaded deepbrain-0.1 wheel (no downloads in tests)")
    if not (COLIN / "ch2.nii.gz").exists():
        pytest.skip("Colin27 (Debian mricron-data) not installed")
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    summary = _script().convert(Path(wheel), tmp_path / "deepbrain.onnx", COLIN)
    assert summary["outputs"] == ["prob"] + HIDDEN
    assert summary["max_abs_diff"]["prob"] < 1e-4
    assert summary["dice_vs_ch2bet"] > 0.9
    assert (tmp_path / "LICENSE-deepbrain.txt").read_text() == (DATA / "LICENSE-deepbrain.txt").read_text()
    fresh = onnx.load(tmp_path / "deepbrain.onnx")
    assert read_metadata(fresh) == read_metadata(onnx.load(MODEL))
