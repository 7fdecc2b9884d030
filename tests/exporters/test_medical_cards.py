"""Issue 17: what nnU-Net plans and MONAI bundles put in the model card beyond the network —
nnU-Net's CTNormalization (and mixed schemes) as a per-channel normalization the engine applies,
the orientation nnU-Net's readers (with transpose_forward) and MONAI's Orientationd bring volumes to."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("dynamic_network_architectures.architectures.unet")
pytest.importorskip("monai.bundle")

from engine.model.card import resolve_model_card  # noqa: E402
from engine.model.metadata import read_metadata  # noqa: E402
from exporters import monai as mexp  # noqa: E402
from exporters import nnunet  # noqa: E402
from tests.engine.model.test_card_normalization import _nnunet_ct, _nnunet_zscore  # noqa: E402
from tests.exporters.test_monai import _UNET3D, make_bundle  # noqa: E402
from tests.exporters.test_nnunet import make_nnunet_folder  # noqa: E402

_CT0 = {"percentile_00_5": -95.0, "percentile_99_5": 250.0, "mean": 80.5, "std": 60.25}


def _edit_plans(folder, **changes) -> None:
    path = folder / "plans.json"
    plans = json.loads(path.read_text())
    for key, value in changes.items():
        if key in ("normalization_schemes", "use_mask_for_norm"):
            for config in plans["configurations"].values():
                config[key] = value
        else:
            plans[key] = value
    path.write_text(json.dumps(plans))


# ------------------------------------------------------------------ nnU-Net: normalisation

def test_ct_plans_export_a_card_whose_preprocess_is_nnunets(tmp_path):
    """A 2-D configuration, channel 0 CT and channel 1 z-score: exported, then the engine's
    preprocess compared with nnU-Net's own normalisation code, channel by channel."""
    folder = make_nnunet_folder(tmp_path, dim=2, norm="CTNormalization", channels=2)
    _edit_plans(folder, normalization_schemes=["CTNormalization", "ZScoreNormalization"])
    plan = nnunet.read_plan(folder, configuration="2d")
    assert plan.scaling == "none" and plan.notes == ()
    assert plan.card_normalization == ({"kind": "ct", "clip": [-95.0, 250.0], "mean": 80.5, "std": 60.25},
                                       {"kind": "zscore"})
    result = nnunet.export(folder, tmp_path / "ct.onnx", input_size=[8, 12])
    card = read_metadata(onnx.load(result.path))
    assert card["preprocessing"]["normalization"] == [dict(n) for n in plan.card_normalization]
    assert card["extra"]["normalization"][0]["scheme"] == "CTNormalization"
    engine_card = resolve_model_card(result.path)
    assert engine_card.scaling == "none" and not any("scaling" in a for a in engine_card.assumed)
    image = np.random.default_rng(11).normal(60.0, 400.0, size=(2, 12, 20)).astype(np.float32)
    x = engine_card.preprocess(image)
    np.testing.assert_allclose(x[0], _nnunet_ct(image[0], _CT0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x[1], _nnunet_zscore(image[1]), rtol=1e-4, atol=1e-4)
    assert x.shape == (2, 12, 20)  # size multiple 4: no padding needed


def test_uniform_schemes_stay_a_scaling_and_unknown_ones_are_noted(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2, channels=2)
    _edit_plans(folder, normalization_schemes=["RGBTo01Normalization"] * 2)
    plan = nnunet.read_plan(folder, configuration="2d")
    assert (plan.scaling, plan.mean, plan.std, plan.card_normalization) == ("meanstd", (0.0, 0.0), (255.0, 255.0),
                                                                           None)
    _edit_plans(folder, normalization_schemes=["RescaleTo01Normalization", "NoNormalization"])
    plan = nnunet.read_plan(folder, configuration="2d")
    assert plan.scaling == "none" and plan.card_normalization == ({"kind": "minmax"}, {"kind": "none"})
    _edit_plans(folder, normalization_schemes=["ZScoreNormalization", "MyNormalization"])
    plan = nnunet.read_plan(folder, configuration="2d")
    assert plan.scaling == "none" and plan.card_normalization is None
    assert any("MyNormalization" in n and "cannot express" in n for n in plan.notes)
    _edit_plans(folder, normalization_schemes=["CTNormalization"] * 2,
                foreground_intensity_properties_per_channel={"0": _CT0})
    with pytest.raises(ValueError, match="channel 1 .* no entry"):
        nnunet.read_plan(folder, configuration="2d")


# ------------------------------------------------------------------ nnU-Net: orientation

@pytest.mark.parametrize("reader, transpose, orientation", [
    ("NibabelIOWithReorient", [0, 1, 2], "SAR"),
    ("NibabelIOWithReorient", [2, 0, 1], "RSA"),
    # the default reader: each file's own axes reversed, then transposed (no reorientation)
    ("SimpleITKIO", [0, 1, 2], "zyx"),
    ("SimpleITKIO", [2, 0, 1], "xzy"),
])
def test_orientation_from_the_reader_and_transpose_forward(tmp_path, reader, transpose, orientation):
    folder = make_nnunet_folder(tmp_path, dim=3)
    _edit_plans(folder, image_reader_writer=reader, transpose_forward=transpose)
    plan = nnunet.read_plan(folder, configuration="3d_fullres")
    assert plan.orientation == orientation
    assert plan.notes == ()  # expressed in the card: nothing left to do by hand


def test_2d_configurations_set_no_orientation(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2)
    _edit_plans(folder, image_reader_writer="NibabelIOWithReorient")
    plan = nnunet.read_plan(folder, configuration="2d")
    assert plan.orientation is None and plan.notes == ()


# ------------------------------------------------------------------ MONAI bundles

def _bundle_with(tmp_path, transforms):
    folder = make_bundle(tmp_path, dim=3)
    config = copy.deepcopy(_UNET3D)
    config["preprocessing"]["transforms"] = transforms
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    return mexp.read_bundle(folder)


def test_monai_orientation_and_clipping(tmp_path):
    load = {"_target_": "LoadImaged", "keys": "image"}
    lps = _bundle_with(tmp_path / "a", [load, {"_target_": "Orientationd", "keys": "image", "axcodes": "LPS"}])
    assert lps.orientation == "LPS" and lps.normalization is None and lps.scaling == "none"
    odd = _bundle_with(tmp_path / "b", [load, {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS",
                                               "labels": [["R", "L"], ["A", "P"], ["S", "I"]]}])
    assert odd.orientation is None and any("axis labels" in n for n in odd.notes)
    clip_then_affine = _bundle_with(tmp_path / "c", [
        load, {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 300, "b_min": 0.0,
               "b_max": 1.0, "clip": True},
        {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": 0.5, "divisor": 0.25}])
    # clip(x, -100, 300) → (x + 100) / 400 → (y - 0.5) / 0.25 = (x - 100) / 100
    assert clip_then_affine.normalization == ({"kind": "ct", "clip": [-100.0, 300.0], "mean": 100.0,
                                               "std": 100.0},)
    zscore_after = _bundle_with(tmp_path / "d", [
        load, {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 300, "b_min": 0.0,
               "b_max": 1.0, "clip": True},
        {"_target_": "NormalizeIntensityd", "keys": "image"}])
    assert zscore_after.normalization is None and zscore_after.scaling == "zscore"
    assert any("clip intensities in a way the model card cannot express" in n for n in zscore_after.notes)
