"""The third shipped network (cli/data/lungct, issue 20) and the evaluation's offline data rule.

The shipped lung-CT U-Net loads, its card is valid and names the hidden layers, and it scores
synthetic chest-CT-like slices through :func:`engine.score_dataset`; the experiment scripts
refuse missing data with one line naming ``make setup-eval`` and never try to download.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.model.card import resolve_model_card
from engine.run import score_dataset

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "cli" / "data" / "lungct" / "lungct.onnx"
HIDDEN = ("enc1", "enc2", "enc3", "bottleneck", "up3", "dec3", "up2", "dec2", "up1", "dec1")


def _script(name: str):
    """Import ``scripts/<name>.py`` (not a package) as a module."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _chest_slices(n: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic axial chest CT in HU: air outside, a soft-tissue body, two dark lungs.

    Lung size varies across the slices (apex to base); the mask is the two lungs.
    """
    yy, xx = np.mgrid[:size, :size] / size
    images, masks = [], []
    for i in range(n):
        r = 0.10 + 0.06 * i / max(n - 1, 1)
        body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
        lungs = (((xx - 0.32) / r) ** 2 + ((yy - 0.48) / (1.5 * r)) ** 2 < 1) | \
                (((xx - 0.68) / r) ** 2 + ((yy - 0.48) / (1.5 * r)) ** 2 < 1)
        img = np.where(body, 40.0, -1000.0)
        img = np.where(lungs, -850.0, img)
        images.append(img.astype(np.float32))
        masks.append(lungs.astype(np.uint8))
    return np.stack(images), np.stack(masks)


@pytest.fixture()
def no_download(monkeypatch):
    """Any subprocess (pip) or URL access fails the test: nothing may be downloaded."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args[:1]}")

    for name in ("run", "Popen", "check_call", "check_output", "call"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_the_shipped_card_is_valid_and_names_the_hidden_layers():
    card = resolve_model_card(MODEL)
    assert card.layout == "NCHW" and tuple(card.input_size) == (64, 64)
    assert card.prediction_output == "prob" and card.activation == "sigmoid" and card.threshold == 0.5
    assert card.scaling == "none"  # the network takes HU: clip and scaling are its first operations
    assert set(card.hidden_layers.values()) == set(HIDDEN)
    assert MODEL.stat().st_size < 1_000_000


def test_the_shipped_model_scores_synthetic_chest_slices(tmp_path):
    images, masks = _chest_slices(4)
    data = tmp_path / "chest.npz"
    np.savez(data, images=images, masks=masks, ids=np.array([f"s{i}" for i in range(4)]))
    summary = score_dataset(MODEL, data, tmp_path / "s.h5", layers="auto", level="both",
                            guide="prediction", reference="prediction", batch_size=4, progress=None)
    assert summary.n_scored == 4 and summary.n_failed == 0
    st = engine.open_store(summary.store)
    assert set(HIDDEN) <= {str(n) for n in st.layers["name"]}
    score = st.layer_scores()["score"]
    ok = np.isfinite(score)
    assert ok.any() and np.all((score[ok] >= 0) & (score[ok] <= 1))
    dice = st.output_dice()[:, 0]  # against the synthetic lungs: the network finds them
    assert np.all(dice > 0.5), dice


def test_the_network_takes_hounsfield_units_and_clips_them():
    import onnxruntime as ort

    card = resolve_model_card(MODEL)
    images, _ = _chest_slices(2, size=64)
    x = np.stack([card.preprocess(img[None]) for img in images]).astype(np.float32)
    np.testing.assert_array_equal(x[:, 0], images)  # the card leaves HU as they are
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    prob = sess.run([card.prediction_output], {card.input_name: x})[0]
    assert prob.shape == (2, 1, 64, 64) and prob.min() >= 0 and prob.max() <= 1
    # beyond the clip range [-1000, 400] HU nothing changes: -3000 reads as -1000, 3000 as 400
    far = np.where(x < -999, -3000.0, np.where(x > 0, 3000.0, x)).astype(np.float32)
    near = np.clip(far, -1000, 400)
    a, b = (sess.run([card.prediction_output], {card.input_name: v})[0] for v in (far, near))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_lung_reference_keeps_lungs_and_tumour_and_drops_outside_air():
    train = _script("train_lungct")
    hu = np.full((48, 48, 3), -1000.0, np.float32)
    hu[2:46, 2:46] = 40.0                       # body
    hu[6:16, 10:36] = -850.0                    # a lung
    hu[30:40, 10:36] = -850.0                   # the other lung
    tumour = np.zeros(hu.shape, np.uint8)
    tumour[30:34, 36:40] = 1                    # dense tumour beside the lung: only the label has it
    ref = train.lung_reference(hu, tumour)
    assert ref[10, 20, 1] == 1 and ref[35, 20, 1] == 1 and ref[32, 38, 1] == 1
    assert ref[0, 0, 1] == 0 and ref[23, 20, 1] == 0 and ref[10, 42, 1] == 0  # outside air, mediastinum, body


def test_lungct_cases_refuse_missing_data_in_one_line_without_downloading(tmp_path, no_download):
    ev = _script("evaluate_estimators")
    with pytest.raises(FileNotFoundError) as err:
        ev.build_lungct_cases(tmp_path, tmp_path / "nothing-here")
    msg = str(err.value)
    assert "\n" not in msg and "make setup-eval" in msg and "lung1_image.nrrd" in msg


def test_the_lungct_experiment_stops_with_one_line(tmp_path, capsys, no_download):
    ev = _script("evaluate_estimators")
    rc = ev.main(["lungct", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "nothing-here")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "make setup-eval" in err


def test_mni152_without_nilearn_names_the_setup_command(monkeypatch, no_download):
    train = _script("train_unet2d")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(FileNotFoundError) as err:
        train.find_wheel(None)
    assert "\n" not in str(err.value) and "make setup-eval" in str(err.value)


def test_ct_corruptions_move_the_mask_only_with_the_image_and_name_their_family():
    ev = _script("evaluate_estimators")
    hu, mask = _chest_slices(2, size=64)
    rng = np.random.default_rng(0)
    for kind in ev.CT_CORRUPTIONS:
        x, m = ev.corrupt_ct(hu, mask, kind, 2, rng)
        assert x.shape == hu.shape and x.dtype == np.float32
        if kind == "shift":
            assert np.array_equal(m[:, 12:], mask[:, :-12]) and not m[:, :12].any()
        else:
            assert np.array_equal(m, mask) and not np.array_equal(x, hu), kind
    with pytest.raises(ValueError, match="expected one of"):
        ev.corrupt_ct(hu, mask, "crop", 1, rng)
    assert ev._family("lung2_z017_noise2") == "noise" and ev._family("lung2_z017_clean") == "clean"
    assert ev._family("colin27_gamma3") == "contrast"  # deepbrain ids still parse
