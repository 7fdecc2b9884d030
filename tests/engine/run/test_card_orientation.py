"""A scoring run reorients as the model card's ``orientation`` says (issue 17), records the
orientation used in the configuration and every case's affine and orientations in the store,
and reads a 4-D image as the card's channels. Model and data are built here."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import engine
from engine.run import score_dataset
from tests import models
from tests.engine.test_maps_export import _nifti_pair, _ras, _twin, _volume


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("card_orientation")
    meta = models.unet_metadata(ndim=3, size=16)
    meta["input"]["orientation"] = "RAS"
    model = models.save(models.unet(ndim=3, size=16, batch="N", metadata=meta), root / "ras.onnx")
    plain = models.save(models.unet(ndim=3, size=16, batch="N", metadata=True), root / "plain.onnx")
    data = root / "data"
    data.mkdir()
    vol, mask = _volume()
    aff = _ras()
    _nifti_pair(data, "ras", vol, mask, aff)
    for name, codes in (("lps", "LPS"), ("asr", "ASR")):
        v, a = _twin(vol, aff, codes)
        _nifti_pair(data, name, v, _twin(mask, aff, codes)[0], a)
    np.save(data / "arr.npy", vol)
    np.save(data / "arr_mask.npy", mask)
    (data / "broken.nii.gz").write_bytes(b"not a nifti file")
    return {"root": root, "model": model, "plain": plain, "data": data, "affine": aff, "vol": vol}


def _rows(st) -> dict[str, int]:
    return {str(c): i for i, c in enumerate(st.cases["id"])}


def _score(setup, name: str, model: str = "model", **kw):
    with pytest.warns(UserWarning, match="broken"):
        return engine.open_store(score_dataset(setup[model], setup["data"], setup["root"] / f"{name}.h5",
                                               batch_size=2, **kw).store)


def test_the_card_orientation_reorients_every_case_without_the_flag(setup):
    st = _score(setup, "card", reorient=None)  # None: as the card says (the CLI's default)
    assert st.config["reorient"] == "RAS" and st.config["model_card"]["orientation"] == "RAS"
    rows, grids = _rows(st), st.case_grids()
    layer = st.layer_scores()
    for name, codes in (("ras", "RAS"), ("lps", "LPS"), ("asr", "ASR")):
        r = rows[name]
        assert grids["orientation"][r] == "RAS" and grids["file_orientation"][r] == codes
        np.testing.assert_allclose(grids["affine"][r], setup["affine"], atol=1e-5)
        np.testing.assert_array_equal(layer["score"][r], layer["score"][rows["ras"]])
    for name in ("arr", "broken"):  # no affine (.npy), unreadable: NaN and no codes
        assert np.isnan(grids["affine"][rows[name]]).all() and grids["orientation"][rows[name]] == ""
    assert st.cases["status"][rows["broken"]] == "unreadable"


def test_no_reorient_overrides_the_card_and_a_flag_without_card_means_ras(setup):
    st = _score(setup, "off", reorient=False)
    assert "reorient" not in st.config
    rows, grids = _rows(st), st.case_grids()
    assert grids["orientation"][rows["lps"]] == grids["file_orientation"][rows["lps"]] == "LPS"
    np.testing.assert_allclose(grids["affine"][rows["lps"]], _twin(setup["vol"], setup["affine"], "LPS")[1],
                               atol=1e-5)
    st = _score(setup, "codes", reorient="lpi")  # axis codes of one's own
    assert st.config["reorient"] == "LPI"
    assert set(st.case_grids()["orientation"][[_rows(st)[n] for n in ("ras", "lps", "asr")]]) == {"LPI"}
    st = _score(setup, "flag", model="plain", reorient=True)
    assert st.config["reorient"] == "RAS" and "orientation" not in st.config["model_card"]
    st = _score(setup, "none", model="plain", reorient=None)
    assert "reorient" not in st.config  # no card orientation, no flag: file order


def test_a_4d_image_is_read_as_the_cards_channels(setup, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    vol, mask = _volume()
    nib.save(nib.Nifti1Image(np.stack([vol, 1 - vol], -1), np.eye(4)), str(data / "two.nii.gz"))
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(data / "one.nii.gz"))
    with pytest.warns(UserWarning, match="holds 2 volumes"):
        st = engine.open_store(score_dataset(setup["plain"], data, tmp_path / "r.h5", reorient=None).store)
    assert dict(zip(st.cases["id"], st.cases["status"])) == {"one": "ok", "two": "multi-volume"}
    st = engine.open_store(score_dataset(setup["plain"], data, tmp_path / "v.h5", volume=1).store)
    assert list(st.cases["status"]) == ["ok", "ok"]
