"""engine.datasets, issue 17: a 4-D image is channels only when the model card says so, nnU-Net's
one-file-per-channel raw layout, and reorienting to any axis codes. Every file is built here."""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from engine.datasets import DatasetError, open_dataset
from engine.run.manifest import dataset_manifest

rng = np.random.default_rng(170)


def _nifti(path, arr, affine=None, *, time_unit=None, intent=None) -> None:
    img = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine)
    if time_unit is not None:
        img.header.set_xyzt_units("mm", time_unit)
    if intent is not None:
        img.header.set_intent(intent)
    nib.save(img, str(path))


def _quiet_open(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ok case warns about nothing
        ds = open_dataset(*args, **kwargs)
        return ds, list(ds)


# ------------------------------------------------------------------ 4-D by the card

def test_4d_nifti_is_channels_when_the_model_takes_that_many(tmp_path):
    multi = rng.random((4, 5, 6, 2)).astype(np.float32)
    _nifti(tmp_path / "a.nii.gz", multi)
    _nifti(tmp_path / "v.nii.gz", multi, time_unit="sec", intent="vector")
    _, cases = _quiet_open(tmp_path, channels=2)
    for case in cases:
        assert case.ok and case.image.shape == (2, 4, 5, 6)
        np.testing.assert_array_equal(case.image, np.moveaxis(multi, -1, 0))


def test_4d_nifti_for_a_one_channel_model_is_skipped_naming_volume(tmp_path):
    from engine.errors import cli_messages

    stack = rng.random((4, 5, 6, 3)).astype(np.float32)
    _nifti(tmp_path / "a.nii.gz", stack)
    with pytest.warns(UserWarning, match="holds 3 volumes"):
        case = open_dataset(tmp_path, channels=1)[0]
    assert case.status == "multi-volume" and case.image is None and not case.ok
    msg = case.message
    assert "a.nii.gz" in msg and "(4, 5, 6, 3)" in msg and "not a time series" in msg
    assert "takes 1 channel" in msg and "volume=0" in msg and "0 to 2" in msg and "\n" not in msg
    with cli_messages(), pytest.warns(UserWarning, match="--volume 0"):
        open_dataset(tmp_path, channels=1)[0]
    _, (picked,) = _quiet_open(tmp_path, channels=1, volume=2)
    assert picked.ok and picked.image.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(picked.image[0], stack[..., 2])
    with pytest.warns(UserWarning, match="out of range"):
        assert open_dataset(tmp_path, channels=1, volume=3)[0].status == "multi-volume"
    with pytest.raises(DatasetError, match="holds 3 volumes"):
        open_dataset(tmp_path, channels=1, strict=True)[0]


def test_4d_nifti_with_another_channel_count_names_both_numbers(tmp_path):
    _nifti(tmp_path / "a.nii.gz", rng.random((4, 5, 6, 2)).astype(np.float32))
    with pytest.warns(UserWarning, match="wrong|channels"):
        case = open_dataset(tmp_path, channels=4)[0]
    assert case.status == "wrong-channels" and case.image is None
    assert "read as 2 channels" in case.message and "the model takes 4 channels" in case.message
    assert "CASE_0000" in case.message  # how to give it the channels it takes


def test_time_series_stay_time_series_whatever_the_card(tmp_path):
    _nifti(tmp_path / "ts.nii.gz", rng.random((4, 5, 6, 2)).astype(np.float32), time_unit="sec")
    for channels in (1, 2):
        with pytest.warns(UserWarning, match="time series"):
            assert open_dataset(tmp_path, channels=channels)[0].status == "time-series"


def test_vector_layout_and_no_card_keep_the_old_reading(tmp_path):
    vec5 = rng.random((4, 5, 6, 1, 3)).astype(np.float32)
    _nifti(tmp_path / "v.nii.gz", vec5)
    _, (no_card,) = _quiet_open(tmp_path)  # no card: a 4th axis holds channels
    assert no_card.image.shape == (3, 4, 5, 6)
    with pytest.warns(UserWarning, match="vector layout"):
        assert open_dataset(tmp_path, channels=1)[0].status == "multi-volume"
    _, (one,) = _quiet_open(tmp_path, channels=1, volume=1)
    np.testing.assert_array_equal(one.image[0], vec5[:, :, :, 0, 1])


def test_nrrd_list_axis_follows_the_card(tmp_path):
    import nrrd

    vec = rng.random((2, 4, 5, 6)).astype(np.float32)
    dirs = np.full((4, 3), np.nan)
    dirs[1:] = np.diag([-2.0, -1.0, 3.0])
    nrrd.write(str(tmp_path / "v.nrrd"), vec, index_order="F", header={
        "space": "left-posterior-superior", "kinds": ["list", "domain", "domain", "domain"],
        "space directions": dirs, "space origin": np.zeros(3)})
    _, (two,) = _quiet_open(tmp_path, channels=2)
    np.testing.assert_array_equal(two.image, vec)
    with pytest.warns(UserWarning, match="kinds name axis 0 'list'"):
        assert open_dataset(tmp_path, channels=1)[0].status == "multi-volume"
    with pytest.warns(UserWarning, match="model takes 3 channels"):
        assert open_dataset(tmp_path, channels=3)[0].status == "wrong-channels"
    _, (one,) = _quiet_open(tmp_path, channels=1, volume=1)
    np.testing.assert_array_equal(one.image[0], vec[1])
    np.testing.assert_allclose(one.affine, np.diag([2.0, 1.0, 3.0, 1.0]))  # the spatial axes kept


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_channels_is_validated(tmp_path, bad):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="channels="):
        open_dataset(tmp_path, channels=bad)


# ------------------------------------------------------------------ nnU-Net's raw layout

def _nnunet_dataset(root, cases=("liver_1", "liver_2"), channels=2, *, affine=None, labels=True,
                    folder="imagesTs"):
    images = root / folder
    images.mkdir(parents=True)
    if labels:
        (root / folder.replace("images", "labels")).mkdir()
    arrays = {}
    for case in cases:
        arrays[case] = rng.random((channels, 4, 5, 6)).astype(np.float32)
        for c in range(channels):
            _nifti(images / f"{case}_{c:04d}.nii.gz", arrays[case][c], affine)
        if labels:
            _nifti(root / folder.replace("images", "labels") / f"{case}.nii.gz",
                   (arrays[case][0] > 0.5).astype(np.uint8), affine)
    return arrays


@pytest.mark.parametrize("where", ["dataset", "images"])
def test_nnunet_channel_files_are_stacked_in_suffix_order(tmp_path, where):
    arrays = _nnunet_dataset(tmp_path / "Dataset042_Liver", cases=("liver_2", "liver_10"), channels=3)
    source = tmp_path / "Dataset042_Liver" / ("imagesTs" if where == "images" else "")
    ds, cases = _quiet_open(source)
    assert ds.ids == ["liver_2", "liver_10"] and ds.has_masks
    for case in cases:
        assert case.ok and case.image.shape == (3, 4, 5, 6)
        np.testing.assert_array_equal(case.image, arrays[case.id])
        np.testing.assert_array_equal(case.mask, (arrays[case.id][0] > 0.5).astype(np.uint8))
        assert case.path.endswith(f"{case.id}_0000.nii.gz") and case.mask_path.endswith(f"{case.id}.nii.gz")
        assert case.source_format == "nifti"
    # a resumed run notices a change in any channel file, not only the first
    names = [f[0] for f in dataset_manifest(ds).files[0]]
    prefix = ("imagesTs/", "labelsTs/") if where == "dataset" else ("", "")
    assert names == [f"{prefix[0]}liver_2_000{c}.nii.gz" for c in range(3)] + [f"{prefix[1]}liver_2.nii.gz"]


def test_nnunet_layout_errors_say_what_to_fix(tmp_path):
    root = tmp_path / "Dataset001_X"
    _nnunet_dataset(root, folder="imagesTr")
    _nnunet_dataset(root, folder="imagesTs")
    with pytest.raises(DatasetError, match=r"both imagesTr/ and imagesTs/.*imagesTs"):
        open_dataset(root)
    (root / "imagesTs" / "liver_1_0001.nii.gz").rename(root / "imagesTs" / "liver_1_0002.nii.gz")
    with pytest.raises(DatasetError, match=r"'liver_1'.*\['_0000', '_0002'\] but not \['_0001'\]"):
        open_dataset(root / "imagesTs")
    _nifti(root / "imagesTr" / "notes.nii.gz", np.zeros((4, 5, 6), np.float32))
    with pytest.raises(DatasetError, match="not named CASE_XXXX"):
        open_dataset(root / "imagesTr")


def test_nnunet_channel_files_on_different_grids_are_skipped(tmp_path):
    root = tmp_path / "d"
    _nnunet_dataset(root, cases=("a", "b", "c"), labels=False)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    _nifti(root / "imagesTs" / "a_0001.nii.gz", rng.random((4, 5, 6)).astype(np.float32), shifted)
    _nifti(root / "imagesTs" / "b_0001.nii.gz", rng.random((4, 5, 7)).astype(np.float32))
    _nifti(root / "imagesTs" / "c_0001.nii.gz", rng.random((4, 5, 6, 2)).astype(np.float32))
    with pytest.warns(UserWarning):
        a, b, c = list(open_dataset(root))
    assert a.status == b.status == "grid-mismatch"
    assert "a_0000.nii.gz" in a.message and "a_0001.nii.gz" in a.message and "origin (5, 0, 0)" in a.message
    assert "shape (4, 5, 7)" in b.message
    assert c.status == "multi-volume" and "c_0001.nii.gz" in c.message  # each file is one channel


def test_channel_files_elsewhere_are_grouped_only_for_a_multichannel_model(tmp_path):
    arrays = {}
    for case in ("a", "b"):
        arrays[case] = rng.random((2, 6, 5)).astype(np.float32)
        for c in range(2):
            np.save(tmp_path / f"{case}_{c:04d}.npy", arrays[case][c])
        np.save(tmp_path / f"{case}_mask.npy", (arrays[case][0] > 0.5).astype(np.uint8))
    ds, cases = _quiet_open(tmp_path, channels=2, spatial_ndim=2)
    assert ds.ids == ["a", "b"] and all(c.ok and c.image.shape == (2, 6, 5) for c in cases)
    np.testing.assert_array_equal(cases[1].image, arrays["b"])
    assert cases[0].mask is not None
    with pytest.warns(UserWarning, match="no matching image"):  # no card: one file, one case
        plain = open_dataset(tmp_path, spatial_ndim=2)
    assert plain.ids == ["a_0000", "a_0001", "b_0000", "b_0001"]


# ------------------------------------------------------------------ reorient to any codes

def test_reorient_to_the_codes_given(tmp_path):
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    vol = rng.random((4, 5, 6)).astype(np.float32)
    ras = np.diag([2.0, 1.0, 3.0, 1.0])
    ras[:3, 3] = (5.0, 6.0, 7.0)
    for codes in ("RAS", "LPS", "ASR"):
        t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
        _nifti(tmp_path / f"{codes.lower()}.nii.gz", apply_orientation(vol, t), ras @ inv_ornt_aff(t, vol.shape))
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(("S", "A", "R")))
    want, want_affine = apply_orientation(vol, t), ras @ inv_ornt_aff(t, vol.shape)
    ds, cases = _quiet_open(tmp_path, reorient="sar")
    assert ds.orientation == "SAR" and ds.reorient
    for case in cases:
        assert case.orientation == "SAR" and case.file_orientation == case.id.upper()
        np.testing.assert_array_equal(case.image[0], want)
        np.testing.assert_allclose(case.affine, want_affine, atol=1e-5)
    assert open_dataset(tmp_path, reorient=True).orientation == "RAS"
    assert open_dataset(tmp_path).orientation is None
    with pytest.raises(ValueError, match="reorient='RAR'"):
        open_dataset(tmp_path, reorient="RAR")
