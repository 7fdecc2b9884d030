"""Tests for engine.datasets: formats, pairing rules, statuses and warnings."""
from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.datasets import Case, DatasetError, open_dataset

rng = np.random.default_rng(0)


def _img2d(h: int = 6, w: int = 5) -> np.ndarray:
    return rng.integers(0, 255, size=(h, w)).astype(np.uint8)


def _mask2d(h: int = 6, w: int = 5) -> np.ndarray:
    return (rng.random((h, w)) > 0.5).astype(np.uint8)


def _write_png(path, arr) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def _write_nifti(path, arr) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))




# ------------------------------------------------------------------ formats

def test_png_gray_and_rgb_round_trip(tmp_path):
    gray, rgb, mask = _img2d(), rng.integers(0, 255, (6, 5, 3)).astype(np.uint8), _mask2d()
    _write_png(tmp_path / "a.png", gray)
    _write_png(tmp_path / "a_mask.png", mask * 255)
    _write_png(tmp_path / "b.png", rgb)
    ds = open_dataset(tmp_path)
    assert ds.ids == ["a", "b"] and len(ds) == 2 and ds.has_masks
    a, b = list(ds)
    assert a.ok and a.image.dtype == np.float32 and a.image.shape == (1, 6, 5)
    np.testing.assert_array_equal(a.image[0], gray)
    np.testing.assert_array_equal(a.mask, mask * 255)
    assert a.mask.dtype == np.uint8
    assert b.image.shape == (3, 6, 5) and b.mask is None
    np.testing.assert_array_equal(b.image, np.moveaxis(rgb, -1, 0))


def test_rgba_png_drops_alpha_and_jpeg_reads(tmp_path):
    rgba = rng.integers(0, 255, (4, 7, 4)).astype(np.uint8)
    _write_png(tmp_path / "x.png", rgba)
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "y.jpg")
    ds = open_dataset(tmp_path)
    x, y = ds["x"], ds["y"]
    np.testing.assert_array_equal(x.image, np.moveaxis(rgba[..., :3], -1, 0))
    assert y.image.shape == (3, 8, 8) and abs(float(y.image.mean()) - 100) < 3


def test_nifti_3d_and_4d_channels(tmp_path):
    vol = rng.random((4, 5, 6)).astype(np.float32)
    multi = rng.random((4, 5, 6, 2)).astype(np.float32)
    labels = rng.integers(0, 3, (4, 5, 6)).astype(np.int16)
    _write_nifti(tmp_path / "s1.nii.gz", vol)
    _write_nifti(tmp_path / "s1_seg.nii.gz", labels)
    _write_nifti(tmp_path / "s2.nii", multi)
    ds = open_dataset(tmp_path)
    s1, s2 = ds
    assert s1.image.shape == (1, 4, 5, 6)
    np.testing.assert_allclose(s1.image[0], vol)
    np.testing.assert_array_equal(s1.mask, labels)  # labels kept, not binarised
    assert s1.mask.dtype == np.uint8
    assert s2.image.shape == (2, 4, 5, 6)
    np.testing.assert_allclose(s2.image, np.moveaxis(multi, -1, 0))


def test_nrrd_round_trip_with_vector_kind(tmp_path):
    import nrrd

    vol = rng.random((3, 4, 5)).astype(np.float32)
    nrrd.write(str(tmp_path / "v.nrrd"), vol, index_order="F")
    vec = rng.random((2, 3, 4, 5)).astype(np.float32)
    nrrd.write(str(tmp_path / "w.nrrd"), vec,
               header={"kinds": ["vector", "domain", "domain", "domain"]}, index_order="F")
    nrrd.write(str(tmp_path / "v_mask.nrrd"), (vol > 0.5).astype(np.uint8), index_order="F")
    ds = open_dataset(tmp_path)
    v, w = ds["v"], ds["w"]
    np.testing.assert_allclose(v.image[0], vol)
    np.testing.assert_array_equal(v.mask, vol > 0.5)
    assert w.image.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(w.image, vec)


def test_tiff_volume_and_rgb(tmp_path):
    import tifffile

    vol = rng.random((3, 4, 5)).astype(np.float32)
    tifffile.imwrite(tmp_path / "vol.tif", vol, photometric="minisblack")
    rgb = rng.integers(0, 255, (4, 5, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb, photometric="rgb")
    ds = open_dataset(tmp_path)
    np.testing.assert_allclose(ds["vol"].image[0], vol)
    assert ds["rgb"].image.shape == (3, 4, 5)
    np.testing.assert_array_equal(ds["rgb"].image, np.moveaxis(rgb, -1, 0))


def test_npy_spatial_ndim_disambiguates(tmp_path):
    arr = rng.random((3, 6, 5)).astype(np.float64)
    np.save(tmp_path / "c.npy", arr)
    assert open_dataset(tmp_path)[0].image.shape == (1, 3, 6, 5)  # default: a volume
    assert open_dataset(tmp_path, spatial_ndim=2)[0].image.shape == (3, 6, 5)
    np.save(tmp_path / "c_mask.npy", np.ones((6, 5), np.uint8))
    case = open_dataset(tmp_path)[0]  # the mask tells: 2 spatial axes
    assert case.ok and case.image.shape == (3, 6, 5)
    np.testing.assert_allclose(case.image, arr.astype(np.float32))


def test_single_image_file(tmp_path):
    _write_png(tmp_path / "only.png", _img2d())
    ds = open_dataset(tmp_path / "only.png")
    assert ds.ids == ["only"] and ds[0].image.shape == (1, 6, 5) and not ds.has_masks


# ------------------------------------------------------------------ array files

@pytest.mark.parametrize("fmt", ["h5", "npz"])
def test_array_file_round_trip(tmp_path, fmt):
    images = rng.random((3, 2, 6, 5)).astype(np.float32)
    masks = rng.integers(0, 2, (3, 6, 5)).astype(np.uint8)
    ids = np.array(["p", "q", "r"])
    groups = np.array(["s1", "s1", "s2"])
    path = tmp_path / f"d.{fmt}"
    if fmt == "h5":
        with h5py.File(path, "w") as f:
            f["images"], f["masks"] = images, masks
            f["ids"] = ids.astype(h5py.string_dtype())
            f["groups"] = groups.astype(h5py.string_dtype())
    else:
        np.savez(path, images=images, masks=masks, ids=ids, groups=groups)
    ds = open_dataset(path)
    assert ds.ids == ["p", "q", "r"] and ds.has_masks
    for i, case in enumerate(ds):
        assert case.ok and case.image.shape == (2, 6, 5)
        np.testing.assert_array_equal(case.image, images[i])
        np.testing.assert_array_equal(case.mask, masks[i])
        assert case.group == groups[i]
    assert open_dataset(path, masks=False)[0].mask is None


def test_array_file_without_channel_axis_and_default_ids(tmp_path):
    images = rng.random((2, 4, 5)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=images)
    ds = open_dataset(tmp_path / "d.npz")
    assert ds.ids == ["0", "1"] and not ds.has_masks
    assert ds[1].image.shape == (1, 4, 5)


def test_array_file_missing_images_is_clear(tmp_path):
    np.savez(tmp_path / "d.npz", pictures=np.zeros((2, 3, 3)))
    with pytest.raises(DatasetError, match="no 'images'.*pictures"):
        open_dataset(tmp_path / "d.npz")


def test_array_file_mask_count_mismatch(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 3, 3)), masks=np.zeros((3, 3, 3)))
    with pytest.raises(DatasetError, match="2 images but 3 masks"):
        open_dataset(tmp_path / "d.npz")


def test_array_file_mask_shape_mismatch_status(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"] = np.zeros((2, 1, 4, 4), np.float32)
        f["masks"] = np.zeros((2, 4, 5), np.uint8)
    with pytest.warns(UserWarning, match="mask-shape|shape"):
        case = open_dataset(tmp_path / "d.h5", spatial_ndim=2)[0]
    assert case.status == "mask-shape-mismatch" and case.mask is None


# ------------------------------------------------------------------ pairing

def test_pairing_images_masks_subfolders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("case2", "case10", "case1"):
        np.save(tmp_path / "images" / f"{name}.npy", np.zeros((4, 4)))
    np.save(tmp_path / "masks" / "case1.npy", np.ones((4, 4), np.uint8))
    np.save(tmp_path / "masks" / "case10_mask.npy", np.ones((4, 4), np.uint8))
    np.save(tmp_path / "masks" / "orphan.npy", np.ones((4, 4), np.uint8))
    with pytest.warns(UserWarning, match="orphan"):
        ds = open_dataset(tmp_path)
    assert ds.ids == ["case1", "case2", "case10"]  # natural order
    assert [c.mask is not None for c in ds] == [True, False, True]


def test_pairing_image_and_label_suffixes(tmp_path):
    np.save(tmp_path / "a_image.npy", np.zeros((4, 4)))
    np.save(tmp_path / "a_label.npy", np.ones((4, 4), np.uint8))
    np.save(tmp_path / "b_img.npy", np.zeros((4, 4)))
    np.save(tmp_path / "b_seg.npy", np.ones((4, 4), np.uint8))
    np.save(tmp_path / "c.npy", np.zeros((4, 4)))
    (tmp_path / "notes.txt").write_text("ignored")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = open_dataset(tmp_path)
        cases = list(ds)
    assert ds.ids == ["a", "b", "c"]
    assert [c.mask is not None for c in cases] == [True, True, False]
    assert all(c.ok for c in cases)


def test_two_images_for_one_id_raise(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    _write_png(tmp_path / "a.png", _img2d(4, 4))
    with pytest.raises(DatasetError, match="two image files for case 'a'"):
        open_dataset(tmp_path)


def test_masks_false_ignores_masks(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    np.save(tmp_path / "a_mask.npy", np.ones((5, 5), np.uint8))
    ds = open_dataset(tmp_path, masks=False)
    assert not ds.has_masks and ds[0].ok and ds[0].mask is None


def test_groups_csv_and_mapping(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    np.save(tmp_path / "b.npy", np.zeros((4, 4)))
    (tmp_path / "groups.csv").write_text("id,group\na,site1\nb,site2\n")
    assert [c.group for c in open_dataset(tmp_path)] == ["site1", "site2"]
    assert [c.group for c in open_dataset(tmp_path, groups={"a": "x"})] == ["x", None]


# ------------------------------------------------------------------ bad cases

def test_unreadable_file_skipped_with_status_and_warning(tmp_path):
    np.save(tmp_path / "good.npy", np.zeros((4, 4)))
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti file at all")
    ds = open_dataset(tmp_path)
    with pytest.warns(UserWarning, match="bad.nii.gz"):
        cases = list(ds)
    bad = next(c for c in cases if c.id == "bad")
    assert bad.status == "unreadable" and bad.image is None and "bad.nii.gz" in bad.message
    assert next(c for c in cases if c.id == "good").ok


def test_strict_raises(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    ds = open_dataset(tmp_path, strict=True)
    with pytest.raises(DatasetError, match="bad.png"):
        ds[0]


def test_mask_shape_mismatch_in_folder(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    np.save(tmp_path / "a_mask.npy", np.ones((4, 5), np.uint8))
    with pytest.warns(UserWarning, match=r"\(4, 5\).*\(4, 4\)"):
        case = open_dataset(tmp_path)[0]
    assert case.status == "mask-shape-mismatch" and case.image is not None
    with pytest.raises(DatasetError, match="mask"):
        open_dataset(tmp_path, strict=True)[0]


def test_unreadable_mask_status(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    (tmp_path / "a_mask.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="a_mask.png"):
        case = open_dataset(tmp_path)[0]
    assert case.status == "mask-unreadable"


def test_bad_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no image files"):
        open_dataset(tmp_path)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="neither a folder"):
        open_dataset(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="spatial_ndim=4"):
        open_dataset(tmp_path, spatial_ndim=4)


def test_unknown_case_id_lists_close_ones(tmp_path):
    np.save(tmp_path / "case1.npy", np.zeros((4, 4)))
    with pytest.raises(KeyError, match="case1"):
        open_dataset(tmp_path)["case2"]


# ------------------------------------------------------------------ masks (property)

def _labels_twin(mask: np.ndarray) -> np.ndarray:
    """Slow obvious rule: integer-valued -> labels, otherwise nonzero -> 1."""
    flat = [float(v) for v in mask.ravel()]
    if all(v == int(v) for v in flat):
        out = np.array([int(v) for v in flat]).reshape(mask.shape)
    else:
        out = np.array([1 if v != 0 else 0 for v in flat]).reshape(mask.shape)
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, 2.0, 0.25, 300.0, 7.0]), min_size=4,
                max_size=12))
def test_mask_values_follow_label_rule(values):
    from engine.datasets import _to_labels

    mask = np.array(values, dtype=np.float32)
    out = _to_labels(mask, mask.shape, "m")
    np.testing.assert_array_equal(out, _labels_twin(mask))
    assert out.dtype == (np.uint16 if out.max() > 255 else np.uint8)


def test_case_dataclass_ok_flag():
    assert Case("a", np.zeros((1, 2, 2), np.float32)).ok
    assert not Case("a", None, status="unreadable").ok


def test_bad_shape_status(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 5, 6)))
    with pytest.warns(UserWarning, match="a.npy"):
        case = open_dataset(tmp_path)[0]
    assert case.status == "bad-shape" and case.image is None
    np.save(tmp_path / "a.npy", np.zeros((4, 5)))
    with pytest.warns(UserWarning, match="expected 3 spatial axes"):
        assert open_dataset(tmp_path, spatial_ndim=3)[0].status == "bad-shape"


def test_hdf5_spatial_ndim_attribute(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"] = np.zeros((2, 3, 4, 5), np.float32)
        f["images"].attrs["spatial_ndim"] = 2
    assert open_dataset(tmp_path / "d.h5")[0].image.shape == (3, 4, 5)
    assert open_dataset(tmp_path / "d.h5", spatial_ndim=3)[0].image.shape == (1, 3, 4, 5)


def test_flat_folder_orphan_mask_warns(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    np.save(tmp_path / "b_mask.npy", np.ones((4, 4), np.uint8))
    with pytest.warns(UserWarning, match="b_mask.npy has no matching image"):
        ds = open_dataset(tmp_path)
    assert ds.ids == ["a"] and not ds.has_masks


def test_groups_csv_bad_row(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    (tmp_path / "groups.csv").write_text("a\n")
    with pytest.raises(DatasetError, match="line 1 has 1 column"):
        open_dataset(tmp_path)


# ------------------------------------------------------------------ time series (4-D NIfTI...)

def _write_nifti_4d(path, arr, *, time_unit="sec", intent=None) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, np.eye(4))
    if time_unit is not None:
        img.header.set_xyzt_units("mm", time_unit)
    if intent is not None:
        img.header.set_intent(intent)
    nib.save(img, str(path))


def test_nifti_time_series_is_skipped_with_its_own_status_and_the_fix(tmp_path):
    from engine.errors import cli_messages

    series = rng.random((4, 5, 6, 3)).astype(np.float32)
    _write_nifti_4d(tmp_path / "fmri.nii.gz", series)
    _write_nifti(tmp_path / "anat.nii.gz", rng.random((4, 5, 6)).astype(np.float32))
    ds = open_dataset(tmp_path)
    with pytest.warns(UserWarning, match="fmri.nii.gz is a time series of 3 volumes"):
        case = ds["fmri"]
    assert case.status == "time-series" and not case.ok and case.image is None
    assert "fmri.nii.gz" in case.message and "(4, 5, 6, 3)" in case.message
    assert "volume=0" in case.message and "0 to 2" in case.message and "split" in case.message
    assert "spatial_ndim" not in case.message and "\n" not in case.message
    assert ds["anat"].ok  # a 3-D file in the same folder is read as before
    with cli_messages(), pytest.warns(UserWarning, match="--volume 0"):
        assert "--volume 0" in open_dataset(tmp_path)["fmri"].message


def test_nifti_volume_picks_that_time_point_for_image_and_series_mask(tmp_path):
    series = rng.random((4, 5, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (4, 5, 6, 3)).astype(np.uint8)
    _write_nifti_4d(tmp_path / "a.nii.gz", series)
    _write_nifti_4d(tmp_path / "a_mask.nii.gz", labels)  # one mask per time point
    static = rng.random((4, 5, 6)).astype(np.float32)
    _write_nifti(tmp_path / "b.nii.gz", static)  # no time axis: volume does not apply
    ds = open_dataset(tmp_path, volume=1)
    assert ds.volume == 1
    a, b = ds["a"], ds["b"]
    assert a.ok and a.image.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(a.image[0], series[..., 1])
    np.testing.assert_array_equal(a.mask, labels[..., 1])
    assert b.ok and b.image.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(b.image[0], static)


def test_nifti_volume_out_of_range_gives_the_number_of_volumes(tmp_path):
    _write_nifti_4d(tmp_path / "a.nii", rng.random((4, 5, 6, 3)).astype(np.float32))
    with pytest.warns(UserWarning, match="out of range"):
        case = open_dataset(tmp_path, volume=3)[0]
    assert case.status == "time-series" and case.image is None
    assert "a.nii" in case.message and "3 volumes" in case.message
    assert "volume=3" in case.message and "0 to 2" in case.message


def test_nifti_channels_stay_channels(tmp_path):
    multi = rng.random((4, 5, 6, 2)).astype(np.float32)
    # a vector intent says "channels" even with a time unit (ITK writes one on every image)
    _write_nifti_4d(tmp_path / "vec.nii.gz", multi, intent="vector")
    _write_nifti_4d(tmp_path / "nounit.nii.gz", multi, time_unit=None)  # nibabel's default
    vec5 = rng.random((4, 5, 6, 1, 3)).astype(np.float32)  # the standard vector layout
    _write_nifti_4d(tmp_path / "vec5.nii.gz", vec5)
    one = rng.random((4, 5, 6, 1)).astype(np.float32)  # one time point: just a volume
    _write_nifti_4d(tmp_path / "one.nii.gz", one)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = open_dataset(tmp_path)
        cases = {c.id: c for c in ds}
    for name in ("vec", "nounit"):
        assert cases[name].ok and cases[name].image.shape == (2, 4, 5, 6)
        np.testing.assert_array_equal(cases[name].image, np.moveaxis(multi, -1, 0))
    assert cases["vec5"].image.shape == (3, 4, 5, 6)
    np.testing.assert_array_equal(cases["vec5"].image, np.moveaxis(vec5[:, :, :, 0], -1, 0))
    np.testing.assert_array_equal(cases["one"].image[0], one[..., 0])


def test_nifti_time_series_intent_in_the_vector_layout(tmp_path):
    series = rng.random((4, 5, 6, 1, 3)).astype(np.float32)
    _write_nifti_4d(tmp_path / "ts.nii.gz", series, time_unit=None, intent="time series")
    with pytest.warns(UserWarning, match="intent is 'time series'"):
        assert open_dataset(tmp_path)[0].status == "time-series"
    case = open_dataset(tmp_path, volume=2)[0]
    assert case.ok and case.image.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(case.image[0], series[:, :, :, 0, 2])


def test_time_series_strict_raises(tmp_path):
    _write_nifti_4d(tmp_path / "a.nii.gz", rng.random((4, 5, 6, 3)).astype(np.float32))
    with pytest.raises(DatasetError, match=r"a.nii.gz is a time series.*volume=0"):
        open_dataset(tmp_path, strict=True)[0]
    with pytest.raises(DatasetError, match="out of range"):
        open_dataset(tmp_path, strict=True, volume=7)[0]


def test_nrrd_and_tiff_time_axes(tmp_path):
    import nrrd
    import tifffile

    vol4 = rng.random((3, 4, 5, 2)).astype(np.float32)
    nrrd.write(str(tmp_path / "n.nrrd"), vol4,
               header={"kinds": ["domain", "domain", "domain", "time"]}, index_order="F")
    movie = rng.random((3, 4, 5)).astype(np.float32)
    tifffile.imwrite(tmp_path / "t.tif", movie, imagej=True, metadata={"axes": "TYX"})
    with pytest.warns(UserWarning, match="time series"):
        cases = list(open_dataset(tmp_path))
    assert [c.status for c in cases] == ["time-series", "time-series"]
    ds = open_dataset(tmp_path, volume=1)
    np.testing.assert_array_equal(ds["n"].image[0], vol4[..., 1])
    np.testing.assert_array_equal(ds["t"].image[0], movie[1])


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_open_dataset_refuses_a_bad_volume(tmp_path, bad):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="volume="):
        open_dataset(tmp_path, volume=bad)


def test_shape_messages_advise_what_the_user_can_do(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 5)))
    with pytest.warns(UserWarning):
        case = open_dataset(tmp_path, spatial_ndim=3)[0]
    assert case.status == "bad-shape"
    assert "spatial_ndim" not in case.message and "save the image with 3 spatial axes" in case.message
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 5, 6)))
    with pytest.warns(UserWarning):
        case = open_dataset(tmp_path)[0]
    assert "spatial_ndim" not in case.message and "1 to 3 spatial axes" in case.message


# ------------------------------------------------------------------ orientation and grids

def _affine(codes: str = "RAS", spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
            shape=(4, 5, 6)) -> np.ndarray:
    """The affine of a grid stored in orientation ``codes`` that lies where the RAS grid
    ``diag(spacing)`` + ``origin`` of ``shape`` lies (its twin, voxels flipped/permuted)."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

    ras = np.diag(list(spacing) + [1.0])
    ras[:3, 3] = origin
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    return ras @ inv_ornt_aff(t, shape)


def _stored(arr: np.ndarray, codes: str) -> np.ndarray:
    """A RAS array as stored in orientation ``codes``."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    return apply_orientation(arr, ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes))))


def _nifti(path, arr, affine) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, affine), str(path))


def _nrrd_lps(path, arr, affine_ras) -> None:
    """``arr`` as an NRRD file in LPS space whose grid is ``affine_ras`` (RAS)."""
    import nrrd

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    nrrd.write(str(path), arr, header={"space": "left-posterior-superior",
                                       "space directions": lps[:3, :3].T,
                                       "space origin": lps[:3, 3]}, index_order="F")


def test_nifti_case_has_its_affine_and_orientation(tmp_path):
    vol = rng.random((4, 5, 6)).astype(np.float32)
    aff = _affine("LPS", spacing=(2.0, 1.5, 3.0), origin=(10.0, -4.0, 7.0))
    _nifti(tmp_path / "a.nii.gz", vol, aff)
    np.save(tmp_path / "b.npy", vol)
    a, b = open_dataset(tmp_path)
    np.testing.assert_allclose(a.affine, aff, atol=1e-5)
    assert a.orientation == a.file_orientation == "LPS" and a.source_format == "nifti"
    assert b.affine is None and b.orientation == "" and b.source_format == "npy"


def test_nrrd_space_directions_become_a_ras_affine(tmp_path):
    """An NRRD in LPS space and a NIfTI of the same grid read the same RAS affine."""
    import nrrd

    vol = rng.random((4, 5, 6)).astype(np.float32)
    aff = _affine("RAS", spacing=(0.5, 2.0, 1.25), origin=(3.0, 4.0, -5.0))
    _nrrd_lps(tmp_path / "n.nrrd", vol, aff)
    _nifti(tmp_path / "n_mask.nii.gz", (vol > 0.5).astype(np.uint8), aff)
    nrrd.write(str(tmp_path / "x.nrrd"), vol, header={"space": "scanner-xyz",
                                                      "space directions": np.eye(3)},
               index_order="F")
    n, x = open_dataset(tmp_path)
    assert n.ok and n.orientation == "RAS" and n.source_format == "nrrd"
    np.testing.assert_allclose(n.affine, aff)
    assert x.ok and x.affine is None  # no anatomical space: no affine


def test_nrrd_channel_axis_keeps_the_spatial_directions(tmp_path):
    import nrrd

    vec = rng.random((2, 4, 5, 6)).astype(np.float32)
    dirs = np.full((4, 3), np.nan)
    dirs[1:] = np.diag([-2.0, -1.0, 3.0])  # LPS: +x is left → R flips sign in RAS
    nrrd.write(str(tmp_path / "v.nrrd"), vec, index_order="F", header={
        "space": "left-posterior-superior", "kinds": ["vector", "domain", "domain", "domain"],
        "space directions": dirs, "space origin": np.zeros(3)})
    case = open_dataset(tmp_path)[0]
    assert case.image.shape == (2, 4, 5, 6)
    np.testing.assert_allclose(case.affine, np.diag([2.0, 1.0, 3.0, 1.0]))


@pytest.mark.parametrize("what, mask_affine, named", [
    ("flip", _affine("LAS"), "orientation LAS"),
    ("spacing", _affine("RAS", spacing=(1.0, 1.0, 1.1)), "spacing (1, 1, 1.1)"),
    ("origin", _affine("RAS", origin=(0.0, 2.0, 0.0)), "origin (0, 2, 0)"),
])
def test_image_and_mask_on_different_grids_are_skipped(tmp_path, what, mask_affine, named):
    vol = rng.random((4, 5, 6)).astype(np.float32)
    _nifti(tmp_path / "a.nii.gz", vol, _affine("RAS"))
    _nifti(tmp_path / "a_mask.nii.gz", (vol > 0.5).astype(np.uint8), mask_affine)
    with pytest.warns(UserWarning, match="different grids"):
        case = open_dataset(tmp_path)[0]
    assert case.status == "grid-mismatch" and case.mask is None and not case.ok
    msg = case.message
    assert "a.nii.gz" in msg and "a_mask.nii.gz" in msg and named in msg
    assert "image shape (4, 5, 6), spacing (1, 1, 1) mm, orientation RAS, origin (0, 0, 0) mm" in msg
    assert "mask shape (4, 5, 6)" in msg and "resample the mask" in msg and "\n" not in msg
    with pytest.raises(DatasetError, match="different grids"):
        open_dataset(tmp_path, strict=True)[0]


def test_grids_within_tolerance_are_one_grid(tmp_path):
    from engine.datasets import GRID_TOLERANCE, same_grid

    vol = rng.random((4, 5, 6)).astype(np.float32)
    aff = _affine("RAS", spacing=(1.0, 1.0, 2.0), origin=(-90.0, 126.0, -72.0))
    near = aff.copy()
    near[:3, :3] *= 1 + GRID_TOLERANCE / 10
    near[:3, 3] += GRID_TOLERANCE / 10
    _nifti(tmp_path / "a.nii.gz", vol, aff)
    _nifti(tmp_path / "a_mask.nii.gz", (vol > 0.5).astype(np.uint8), near)
    _nifti(tmp_path / "b.nii.gz", vol, aff)
    np.save(tmp_path / "b_mask.npy", (vol > 0.5).astype(np.uint8))  # no affine: not compared
    a, b = open_dataset(tmp_path)
    assert a.ok and b.ok and b.mask is not None
    assert not same_grid(aff, near * np.diag([1.0, 1.0, 1.01, 1.0]))


def test_reorient_brings_every_orientation_to_ras(tmp_path):
    """An LPS and a permuted (ASR) twin of a RAS volume read as that volume with --reorient."""
    vol = rng.random((4, 5, 6)).astype(np.float32)
    mask = (vol > 0.5).astype(np.uint8)
    aff = _affine("RAS", spacing=(2.0, 1.0, 3.0), origin=(5.0, 6.0, 7.0))
    for name, codes in (("ras", "RAS"), ("lps", "LPS"), ("asr", "ASR")):
        twin = _affine(codes, spacing=(2.0, 1.0, 3.0), origin=(5.0, 6.0, 7.0))
        _nifti(tmp_path / f"{name}.nii.gz", _stored(vol, codes), twin)
        _nifti(tmp_path / f"{name}_mask.nii.gz", _stored(mask, codes), twin)
    _nrrd_lps(tmp_path / "nrrd.nrrd", _stored(vol, "LPS"), _affine("LPS", (2.0, 1.0, 3.0), (5.0, 6.0, 7.0)))
    plain = {c.id: c for c in open_dataset(tmp_path)}
    assert plain["asr"].image.shape == (1, 5, 6, 4) and plain["lps"].orientation == "LPS"
    cases = {c.id: c for c in open_dataset(tmp_path, reorient=True)}
    for name, codes in (("ras", "RAS"), ("lps", "LPS"), ("asr", "ASR"), ("nrrd", "LPS")):
        c = cases[name]
        assert c.ok and c.orientation == "RAS" and c.file_orientation == codes
        np.testing.assert_array_equal(c.image[0], vol)
        np.testing.assert_allclose(c.affine, aff, atol=1e-5)
        if name != "nrrd":
            np.testing.assert_array_equal(c.mask, mask)
        assert c.image.flags.c_contiguous


def test_reorient_leaves_2d_images_and_files_without_affine(tmp_path):
    img = _img2d()
    _nifti(tmp_path / "a.nii.gz", img.astype(np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]))
    np.save(tmp_path / "b.npy", rng.random((4, 5, 6)).astype(np.float32))
    a, b = open_dataset(tmp_path, reorient=True)
    np.testing.assert_array_equal(a.image[0], img)
    assert a.orientation == "LPS" and b.affine is None and b.image.shape == (1, 4, 5, 6)


def test_describe_grid_names_shape_spacing_orientation_origin():
    from engine.datasets import describe_grid, orientation_codes

    aff = _affine("LPI", spacing=(0.5, 0.5, 2.0), origin=(1.0, 2.0, 3.0))
    text = describe_grid(aff, (4, 5, 6))
    assert text.startswith("shape (4, 5, 6), spacing (0.5, 0.5, 2) mm, orientation LPI, origin (")
    assert orientation_codes(None) == "" and orientation_codes(np.eye(4)) == "RAS"
