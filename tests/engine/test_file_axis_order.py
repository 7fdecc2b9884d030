"""Issue 17 follow-up: an ``orientation`` that permutes each file's voxel axes (``"zyx"``: the
axes reversed, as SimpleITK and nnU-Net's default readers give them). Cases keep their own
orientation, their axes permuted; the store records each case's codes and ``protoseg maps``
puts the maps back on the image file's grid. Models and data are built here."""
from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

import engine
from engine.datasets import open_dataset
from engine.model.card import ModelCard
from engine.model.metadata import check_orientation, file_axis_order
from engine.run import score_dataset
from engine.store.maps_export import export_maps
from tests import models
from tests.engine.test_maps_export import _nrrd_lps, _ras

SHAPE = (8, 12, 16)  # every axis a multiple of the test U-Net's 4, no two alike


def _asymmetric(shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A volume whose every voxel differs (x + 100 y + 10000 z, scaled) and an off-centre mask."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    vol = ((i + 100 * j + 10000 * k) / 200000.0).astype(np.float32)
    mask = ((i < shape[0] // 2) & (j >= shape[1] // 3) & (k < 3 * shape[2] // 4)).astype(np.uint8)
    return vol, mask


# ------------------------------------------------------------------ the value

def test_a_permutation_of_the_file_axes_is_a_valid_orientation_of_cards_and_datasets():
    assert check_orientation("ZYX", file_axes=True) == "zyx"
    assert check_orientation(" yzx", file_axes=True) == "yzx"
    assert check_orientation("ras", file_axes=True) == "RAS"
    assert file_axis_order("zyx") == (2, 1, 0) and file_axis_order("xzy") == (0, 2, 1)
    assert file_axis_order("SAR") is None and file_axis_order(None) is None
    with pytest.raises(ValueError, match=r"orientation='xxy'.*permutation of the file's voxel axes 'xyz'"):
        check_orientation("xxy", file_axes=True)
    with pytest.raises(ValueError, match=r"'xyz' itself is file order: set no orientation"):
        check_orientation("XYZ", file_axes=True)  # the identity is no orientation
    with pytest.raises(ValueError, match=r"Orientation axcodes='zyx': expected 3 axis codes") as err:
        check_orientation("zyx", what="Orientation axcodes")  # MONAI's axcodes stay anatomical
    assert "xyz" not in str(err.value) and "\n" not in str(err.value)
    card = ModelCard(input_name="x", layout="NCDHW", input_size=None, channels=1, prediction_output="p",
                     activation="sigmoid", classes=(0,), orientation="ZYX")
    assert card.orientation == "zyx"
    with pytest.raises(ValueError, match=r"orientation='zyx' applies to 3-D models.*NCHW"):
        ModelCard(input_name="x", layout="NCHW", input_size=None, channels=1, prediction_output="p",
                  activation="sigmoid", classes=(0,), orientation="zyx")


# ------------------------------------------------------------------ datasets

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """One asymmetric volume stored as an RAS NIfTI, an LPS NRRD (same voxels, other header)
    and a .npy, each with its mask."""
    root = tmp_path_factory.mktemp("axis_order")
    folder = root / "data"
    folder.mkdir()
    vol, mask = _asymmetric()
    aff = _ras(spacing=(1.5, 1.0, 2.0))
    nib.save(nib.Nifti1Image(vol, aff), str(folder / "ras.nii.gz"))
    nib.save(nib.Nifti1Image(mask, aff), str(folder / "ras_mask.nii.gz"))
    lps = aff.copy()
    lps[:2] *= -1  # the same array, its axes running toward L, P, S
    _nrrd_lps(folder / "lps.nrrd", vol, lps)
    _nrrd_lps(folder / "lps_mask.nrrd", mask, lps)
    np.save(folder / "arr.npy", vol)
    np.save(folder / "arr_mask.npy", mask)
    return {"root": root, "folder": folder, "vol": vol, "mask": mask, "affine": aff, "lps_affine": lps}


@pytest.mark.parametrize("order", ["zyx", "yzx", "xzy"])
def test_each_case_is_fed_its_file_axes_permuted_with_its_own_codes_permuted(data, order):
    perm = file_axis_order(order)
    ds = open_dataset(data["folder"], reorient=order)
    assert ds.orientation == order and ds.reorient
    for name, codes, affine in (("ras", "RAS", data["affine"]), ("lps", "LPS", data["lps_affine"])):
        case = ds[name]
        assert case.ok and case.file_orientation == codes
        assert case.orientation == "".join(codes[p] for p in perm)  # RAS → SAR, LPS → SPL for "zyx"
        np.testing.assert_array_equal(case.image[0], data["vol"].transpose(perm))
        np.testing.assert_array_equal(case.mask, data["mask"].transpose(perm))
        # the same transform as reorienting to the file's codes permuted (the existing path)
        t = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(case.orientation)))
        np.testing.assert_array_equal(apply_orientation(data["vol"], t), case.image[0])
        # every voxel stays where it was in space
        ijk = np.array([3, 5, 7])
        np.testing.assert_allclose(case.affine @ np.r_[ijk[list(perm)], 1], affine @ np.r_[ijk, 1], atol=1e-5)
    arr = ds["arr"]  # no affine: file order, as with axis codes
    assert arr.affine is None and arr.orientation == ""
    np.testing.assert_array_equal(arr.image[0], data["vol"])


def test_zyx_is_what_simpleitk_and_nnunet_nibabelio_read(data):
    """nnU-Net's NibabelIO: ``get_fdata().transpose((2, 1, 0))``; SimpleITK's GetArrayFromImage
    gives the same (z, y, x) array for either file."""
    ds = open_dataset(data["folder"], reorient="zyx")
    img = nib.load(str(data["folder"] / "ras.nii.gz"))
    np.testing.assert_array_equal(ds["ras"].image[0], img.get_fdata().transpose((2, 1, 0)).astype(np.float32))
    raw, _ = nrrd.read(str(data["folder"] / "lps.nrrd"), index_order="C")  # pynrrd's (z, y, x) view
    np.testing.assert_array_equal(ds["lps"].image[0], raw)


# ------------------------------------------------------------------ a scoring run and its maps

@pytest.fixture(scope="module")
def runs(data) -> dict:
    root = data["root"]
    meta = models.unet_metadata(ndim=3, size="D")
    meta["input"]["orientation"] = "zyx"
    meta["preprocessing"] = {"resize": False, "scaling": "none", "mean": None, "std": None}
    model = models.save(models.unet(ndim=3, size="D", batch="N", metadata=meta), root / "zyx.onnx")
    card = engine.open_store(score_dataset(model, data["folder"], root / "card.h5", save_maps=3, batch_size=1,
                                           reorient=None).store)  # None: as the card says
    off = engine.open_store(score_dataset(model, data["folder"], root / "off.h5", batch_size=1,
                                          reorient=False).store)
    return {"model": model, "card": card, "off": off}


def test_the_card_applies_it_and_the_store_records_each_cases_codes(runs):
    st = runs["card"]
    assert st.config["reorient"] == "zyx" and st.config["model_card"]["orientation"] == "zyx"
    rows = {str(c): i for i, c in enumerate(st.cases["id"])}
    grids = st.case_grids()
    assert list(st.cases["status"]) == ["ok"] * 3
    assert (grids["orientation"][rows["ras"]], grids["file_orientation"][rows["ras"]]) == ("SAR", "RAS")
    assert (grids["orientation"][rows["lps"]], grids["file_orientation"][rows["lps"]]) == ("SPL", "LPS")
    assert grids["orientation"][rows["arr"]] == ""
    layer = st.layer_scores()
    assert np.isfinite(layer["score"][rows["ras"]]).any()
    # the RAS and LPS files hold the same array: permuted alike, they score alike
    np.testing.assert_array_equal(layer["score"][rows["lps"]], layer["score"][rows["ras"]])
    assert "reorient" not in runs["off"].config  # --no-reorient: file order


def test_maps_go_back_onto_each_source_image_voxel_for_voxel(runs, data, tmp_path):
    st = runs["card"]
    files = export_maps(st, tmp_path, cases=["ras", "lps"], layers=["dec"])
    assert files and all(not f.resampled for f in files)
    perm = file_axis_order("zyx")
    for case, ext in (("ras", ".nii.gz"), ("lps", ".nrrd")):
        grid = st.map_grid(case)
        assert grid.shape == tuple(SHAPE[p] for p in perm)  # the model's grid
        maps = st.maps(case)
        np.testing.assert_array_equal(maps["_image"], data["vol"].transpose(perm))  # what the model took
        if ext == ".nii.gz":
            source = nib.load(str(data["folder"] / "ras.nii.gz"))
            for name in ("image", "reference", "dec"):
                img = nib.load(str(tmp_path / f"ras_{name}.nii.gz"))
                assert img.shape == source.shape
                np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
            read = {n: np.asarray(nib.load(str(tmp_path / f"ras_{n}.nii.gz")).dataobj)
                    for n in ("image", "reference", "dec")}
        else:
            read = {n: nrrd.read(str(tmp_path / f"lps_{n}.nrrd"), index_order="F")[0]
                    for n in ("image", "reference", "dec")}
            header = nrrd.read_header(str(tmp_path / "lps_image.nrrd"))
            np.testing.assert_allclose(np.asarray(header["space directions"], dtype=float),
                                       np.asarray(nrrd.read_header(str(data["folder"] / "lps.nrrd"))[
                                           "space directions"], dtype=float), atol=1e-5)
        # the image map is the source array in source order, the reference its mask, and a
        # layer's map is the stored (model-order) map put back: voxels line up
        np.testing.assert_array_equal(read["image"], data["vol"])
        np.testing.assert_array_equal(read["reference"], data["mask"])
        np.testing.assert_array_equal(read["dec"], maps["dec"]["binary"].transpose(np.argsort(perm)))


def test_no_reorient_feeds_file_order(runs):
    st = runs["off"]
    grids = st.case_grids()
    rows = {str(c): i for i, c in enumerate(st.cases["id"])}
    assert grids["orientation"][rows["ras"]] == grids["file_orientation"][rows["ras"]] == "RAS"
    assert grids["orientation"][rows["lps"]] == "LPS"
    assert st.config["model_card"]["orientation"] == "zyx"  # the card says so; the flag wins
