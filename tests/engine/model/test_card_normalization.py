"""The model card's per-channel normalization (nnU-Net's CTNormalization and ZScoreNormalization
as nnU-Net computes them) and its ``orientation`` field (issue 17)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine.model.card import ModelCard, resolve_model_card
from engine.model.metadata import check_orientation
from tests.models import unet, unet_metadata


def _card(**kw) -> ModelCard:
    base = dict(input_name="x", layout="NCHW", input_size=None, channels=1, prediction_output="y",
                activation="sigmoid", classes=(0,), resize=False)
    base.update(kw)
    return ModelCard(**base)


# ----------------------------------------------------------------- naive twins: nnU-Net's code
# nnunetv2/preprocessing/normalization/default_normalization_schemes.py, target_dtype float32,
# applied channel by channel (DefaultPreprocessor._normalize)

def _nnunet_ct(image: np.ndarray, props: dict) -> np.ndarray:
    """CTNormalization.run: clip to the foreground percentiles, subtract the mean, divide."""
    image = image.astype(np.float32, copy=True)
    np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
    image -= props["mean"]
    image /= max(props["std"], 1e-8)
    return image


def _nnunet_zscore(image: np.ndarray) -> np.ndarray:
    """ZScoreNormalization.run with use_mask_for_norm False: the whole image's mean and std."""
    image = image.astype(np.float32, copy=True)
    mean, std = image.mean(), image.std()
    image -= mean
    image /= max(std, 1e-8)
    return image


finite = st.floats(-3000, 3000, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(2, 2), st.integers(1, 6), st.integers(1, 7), st.integers(1, 5)),
              elements=finite),
       st.floats(-1000, 0), st.floats(1, 1500), st.floats(-100, 100), st.floats(0, 300))
def test_ct_normalization_matches_nnunet(image, lo, hi, mean, std):
    """Each channel with its own foreground properties, nnU-Net's float32 code as the twin."""
    props = [{"percentile_00_5": lo, "percentile_99_5": hi, "mean": mean, "std": std},
             {"percentile_00_5": -95.0, "percentile_99_5": 250.0, "mean": 80.5, "std": 60.25}]
    card = _card(layout="NCDHW", channels=2, normalization=[
        {"kind": "ct", "clip": [p["percentile_00_5"], p["percentile_99_5"]], "mean": p["mean"], "std": p["std"]}
        for p in props])
    got = card.preprocess(image)
    assert got.dtype == np.float32 and got.shape == image.shape
    for c in range(2):
        want = _nnunet_ct(image[c], props[c])
        scale = max(abs(float(lo)), abs(float(hi)), 250.0, abs(mean)) / max(props[c]["std"], 1e-8)
        np.testing.assert_allclose(got[c], want, rtol=1e-5, atol=2e-6 * scale)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(2, 7)),
              elements=st.floats(-500, 500, allow_nan=False, width=32)))
def test_zscore_matches_nnunet_without_mask(image):
    got = _card(channels=image.shape[0], scaling="zscore").preprocess(image)
    for c in range(image.shape[0]):
        want = _nnunet_zscore(image[c])
        if np.ptp(image[c]) == 0:  # constant: nnU-Net gives rounding / 1e-8, protoseg exactly 0
            assert np.all(got[c] == 0)
            continue
        np.testing.assert_allclose(got[c], want, rtol=1e-4, atol=1e-4)


def test_zscore_divides_by_at_least_1e_8_as_nnunet():
    """A channel whose std lies below nnU-Net's floor is divided by 1e-8, not by its std."""
    image = np.array([[[-1e-9, 1e-9], [1e-9, -1e-9]]], dtype=np.float32)
    got = _card(scaling="zscore").preprocess(image)
    np.testing.assert_allclose(got, _nnunet_zscore(image[0])[None], rtol=1e-5)
    np.testing.assert_allclose(np.abs(got), 0.1, rtol=1e-5)  # 1e-9 / 1e-8, not 1e-9 / 1e-9


def _nnunet_zscore_masked(data: np.ndarray) -> np.ndarray:
    """crop_to_nonzero's mask (create_nonzero_mask: any channel != 0, binary_fill_holes; seg -1
    outside) then ZScoreNormalization.run with use_mask_for_norm True, channel by channel."""
    from scipy.ndimage import binary_fill_holes

    nonzero = data[0] != 0
    for c in range(1, data.shape[0]):
        nonzero |= data[c] != 0
    mask = binary_fill_holes(nonzero)
    out = data.astype(np.float32, copy=True)
    for c in range(out.shape[0]):
        image = out[c]
        mean, std = image[mask].mean(), image[mask].std()
        image[mask] = (image[mask] - mean) / max(std, 1e-8)
    return out


@pytest.mark.parametrize("shape", [(2, 9, 11), (1, 6, 7, 8)])
def test_zscore_nonzero_matches_nnunet_use_mask_for_norm(shape):
    """A brain-like case: zero outside an irregular region with a zero hole inside it (filled,
    so normalised) and a channel that is zero where the other is not (the union counts)."""
    rng = np.random.default_rng(7)
    image = rng.normal(300.0, 80.0, size=shape).astype(np.float32)
    grid = np.indices(shape[1:]).astype(float)
    centre = (np.asarray(shape[1:], float)[:, None] - 1) / 2
    r = np.sqrt(((grid.reshape(len(shape) - 1, -1) - centre) ** 2).sum(0)).reshape(shape[1:])
    image[:, r > min(shape[1:]) / 2.6] = 0.0
    image[:, r < 1.0] = 0.0  # a hole: filled, so inside the mask
    if shape[0] > 1:
        image[1, r > min(shape[1:]) / 3.5] = 0.0  # channel 1's support is smaller than channel 0's
    card = _card(layout="NCHW" if len(shape) == 3 else "NCDHW", channels=shape[0],
                 normalization=[{"kind": "zscore_nonzero"}])
    got = card.preprocess(image)
    want = _nnunet_zscore_masked(image)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.all(got[:, r > min(shape[1:]) / 2.6] == 0)  # the outside is kept
    assert np.all(got[:, r < 1.0] != 0)  # the filled hole is normalised


def test_mixed_kinds_per_channel_and_non_finite_values_stay():
    rng = np.random.default_rng(3)
    image = rng.normal(40.0, 200.0, size=(3, 5, 6)).astype(np.float32)
    image[0, 0, 0], image[0, 0, 1], image[0, 0, 2] = np.nan, np.inf, -np.inf
    ct = {"kind": "ct", "clip": [-95.0, 250.0], "mean": 80.5, "std": 0.0}  # std 0: divided by 1e-8
    card = _card(channels=3, normalization=[ct, {"kind": "zscore"}, {"kind": "meanstd", "mean": 2, "std": 4}])
    got = card.preprocess(image)
    props = {"percentile_00_5": -95.0, "percentile_99_5": 250.0, "mean": 80.5, "std": 0.0}
    finite = np.isfinite(image[0])
    np.testing.assert_allclose(got[0][finite], _nnunet_ct(image[0], props)[finite], rtol=1e-5)
    assert np.isnan(got[0, 0, 0]) and got[0, 0, 1] == np.inf and got[0, 0, 2] == -np.inf
    np.testing.assert_allclose(got[1], _nnunet_zscore(image[1]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[2], (image[2] - 2) / 4, rtol=1e-6)
    one = _card(channels=3, normalization={"kind": "minmax"}).preprocess(image[1:2].repeat(3, 0))
    np.testing.assert_allclose(one[0], (image[1] - image[1].min()) / np.ptp(image[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalization, match", [
    ([{"kind": "ct", "clip": [1, 0], "mean": 0, "std": 1}], r"lo <= hi"),
    ([{"kind": "ct", "clip": [0, 1], "mean": 0}], r"expected kind and \['clip', 'mean', 'std'\]"),
    ([{"kind": "ct", "clip": [0, 1], "mean": 0, "std": -1}], ">= 0"),
    ([{"kind": "ct", "clip": [0, float("nan")], "mean": 0, "std": 1}], "finite"),
    ([{"kind": "zscore", "mean": 3}], "has keys"),
    ([{"kind": "percentile"}], r"kind='percentile'.*'ct'"),
    ([{"kind": "zscore"}] * 3, "3 entries; expected 1 .* or channels=2"),
    ([{"kind": "meanstd", "mean": 0, "std": 0}], "non-zero"),
    ("ct", "expected a list"),
])
def test_normalization_is_validated(normalization, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _card(channels=2, normalization=normalization)


def test_scaling_and_normalization_exclude_each_other():
    with pytest.raises(ValueError, match="replaces scaling"):
        _card(scaling="zscore", normalization=[{"kind": "zscore"}])
    assert _card(normalization="none").normalization is None
    assert _card(normalization=[]).normalization is None


def test_a_later_source_replaces_the_other_kind(tmp_path):
    """Metadata < TOML < overrides: a later scaling drops an earlier normalization and back."""
    ct = {"kind": "ct", "clip": [-95.0, 250.0], "mean": 80.5, "std": 60.25}
    meta = unet_metadata()
    meta["preprocessing"] = {"resize": True, "scaling": "none", "normalization": [ct]}
    model = unet(metadata=meta)
    card = resolve_model_card(model)
    assert card.scaling == "none" and card.normalization == (ct,) and card.assumed == []
    assert resolve_model_card(model, overrides={"scaling": "minmax"}).normalization is None
    toml = tmp_path / "card.toml"
    toml.write_text('[preprocessing]\nnormalization = [{kind = "zscore"}]\n')
    plain = unet(metadata=True)  # its metadata scales minmax
    card = resolve_model_card(plain, toml=toml)
    assert card.scaling == "none" and card.normalization == ({"kind": "zscore"},)
    assert card.to_dict()["normalization"] == [{"kind": "zscore"}]


# ----------------------------------------------------------------- orientation

def test_orientation_is_checked_and_upper_cased():
    assert _card(layout="NCDHW", orientation="lps").orientation == "LPS"
    assert _card(layout="NCDHW", orientation="none").orientation is None
    for bad in ("RAR", "RA", "XYZ", 3):
        with pytest.raises(ValueError, match="one of R/L, one of A/P and one of S/I"):
            _card(layout="NCDHW", orientation=bad)
    with pytest.raises(ValueError, match="applies to 3-D models"):
        _card(layout="NCHW", orientation="RAS")
    assert check_orientation("PIR") == "PIR"


def test_orientation_from_metadata_and_overrides():
    meta = unet_metadata(ndim=3, size=8)
    meta["input"]["orientation"] = "RAS"
    model = unet(ndim=3, size=8, metadata=meta)
    assert resolve_model_card(model).orientation == "RAS"
    assert resolve_model_card(model, overrides={"orientation": "LPS"}).orientation == "LPS"
    assert resolve_model_card(model, overrides={"input": {"orientation": "none"}}).orientation is None
