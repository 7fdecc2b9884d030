"""Saved maps out to viewers (issue 17): grids recorded in the store, --reorient through a
real scoring run, NIfTI/NRRD export on the image's grid, `protoseg maps`, and the report's
anatomical slices. Every file is built here, in tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from click.testing import CliRunner
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

import engine
from engine.resize import resize_linear
from engine.run import score_dataset
from engine.store.maps_export import export_maps, file_stem
from tests import models

ROOT = Path(__file__).resolve().parents[2]
rng = np.random.default_rng(17)


def _twin(vol: np.ndarray, ras_affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """``vol`` (RAS, with ``ras_affine``) stored in orientation ``codes``, and its affine:
    the same voxels at the same places in space."""
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    return apply_orientation(vol, t), ras_affine @ inv_ornt_aff(t, vol.shape)


def _ras(spacing=(1.5, 1.0, 2.0), origin=(-12.0, 8.0, 30.0)) -> np.ndarray:
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = origin
    return aff


def _volume(shape=(16, 16, 16)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth volume (a blob) and its mask, so that maps are not all one value."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    centre = np.array([0.2, -0.1, 0.1])[:, None, None, None]
    dist = np.sqrt(((grid - centre) ** 2).sum(0))
    vol = (np.exp(-3 * dist ** 2) + 0.05 * rng.random(shape)).astype(np.float32)
    return vol, (dist < 0.5).astype(np.uint8)


def _nifti_pair(folder: Path, name: str, vol, mask, affine) -> None:
    nib.save(nib.Nifti1Image(vol, affine), str(folder / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(folder / f"{name}_mask.nii.gz"))


def _nrrd_lps(path: Path, arr: np.ndarray, ras_affine: np.ndarray) -> None:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras_affine
    nrrd.write(str(path), arr, header={"space": "left-posterior-superior",
                                       "space directions": lps[:3, :3].T,
                                       "space origin": lps[:3, 3]}, index_order="F")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "unet3d.onnx"
    return models.save(models.unet(ndim=3, size=16, batch="N", metadata=True), path)


@pytest.fixture(scope="module")
def twins(tmp_path_factory, model):
    """One RAS case and its LPS twin (and an ASR one), scored with --reorient, maps saved;
    and the same data scored without."""
    folder = tmp_path_factory.mktemp("twins")
    data = folder / "data"
    data.mkdir()
    vol, mask = _volume()
    aff = _ras()
    _nifti_pair(data, "ras", vol, mask, aff)
    for name, codes in (("lps", "LPS"), ("asr", "ASR")):
        v, a = _twin(vol, aff, codes)
        _nifti_pair(data, name, v, _twin(mask, aff, codes)[0], a)
    reoriented = score_dataset(model, data, folder / "reoriented.h5", save_maps=3, reorient=True,
                               batch_size=1, level="both").store
    plain = score_dataset(model, data, folder / "plain.h5", save_maps=["lps", "ras"],
                          batch_size=1).store
    return {"data": data, "affine": aff, "vol": vol, "mask": mask,
            "reoriented": engine.open_store(reoriented), "plain": engine.open_store(plain)}


# ------------------------------------------------------------------ --reorient

def test_reorient_scores_flipped_twins_exactly_like_the_ras_case(twins):
    st = twins["reoriented"]
    ids = list(st.cases["id"])
    assert sorted(ids) == ["asr", "lps", "ras"] and list(st.cases["status"]) == ["ok"] * 3
    r = ids.index("ras")
    layer, units = st.layer_scores(), st.unit_scores(0)
    assert np.isfinite(layer["score"][r]).any()
    for other in ("lps", "asr"):
        o = ids.index(other)
        np.testing.assert_array_equal(layer["score"][o], layer["score"][r])
        np.testing.assert_array_equal(layer["tp"][o], layer["tp"][r])
        np.testing.assert_array_equal(units["score"][o], units["score"][r])
        np.testing.assert_array_equal(st.input_scores()["score"][o], st.input_scores()["score"][r])
        np.testing.assert_array_equal(st.output_dice()[o], st.output_dice()[r])
    assert st.config["reorient"] == "RAS"
    assert "reorient" not in twins["plain"].config  # older stores (without the key) resume


def test_store_records_each_saved_case_grid(twins):
    aff = twins["affine"]
    for case, codes in (("ras", "RAS"), ("lps", "LPS"), ("asr", "ASR")):
        grid = twins["reoriented"].map_grid(case)
        assert grid.orientation == "RAS" and grid.file_orientation == codes
        assert grid.shape == (16, 16, 16) and grid.format == "nifti"
        np.testing.assert_allclose(grid.affine, aff, atol=1e-5)
    plain = twins["plain"].map_grid("lps")
    assert plain.orientation == plain.file_orientation == "LPS"
    np.testing.assert_allclose(plain.affine, _twin(twins["vol"], aff, "LPS")[1], atol=1e-5)
    with pytest.raises(KeyError, match="no maps saved for case 'asr'"):
        twins["plain"].map_grid("asr")


# ------------------------------------------------------------------ export

def test_export_round_trip_on_the_model_grid(twins, tmp_path):
    st = twins["plain"]
    files = export_maps(st, tmp_path / "out", cases=["lps"])
    maps = st.maps("lps")
    source = nib.load(str(twins["data"] / "lps.nii.gz"))
    layer_names = {n for n, v in maps.items() if isinstance(v, dict)}
    assert {f.name for f in files} == layer_names | {"_image", "_prediction", "_reference"}
    assert len(files) == 2 * len(layer_names) + 3
    for f in files:
        assert f.path.name.startswith("lps_") and f.path.name.endswith(".nii.gz")
        img = nib.load(str(f.path))
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
        assert img.shape == source.shape and not f.resampled
        data = np.asarray(img.dataobj)
        if f.kind == "binary":
            assert data.dtype == np.uint8 and img.header.get_intent()[0] == "label"
            np.testing.assert_array_equal(data, maps[f.name]["binary"])
        elif f.kind == "probability":
            assert data.dtype == np.float32
            np.testing.assert_array_equal(data, maps[f.name]["probability"].astype(np.float32))
        elif f.kind == "image":
            np.testing.assert_array_equal(data, maps["_image"])
        elif f.kind == "prediction":
            np.testing.assert_array_equal(data, maps["_prediction"][0])
        else:
            np.testing.assert_array_equal(data, maps["_reference"][0].astype(np.uint8))
    dec = tmp_path / "out" / "lps_dec.nii.gz"
    assert dec.exists() and (tmp_path / "out" / "lps_dec_probability.nii.gz").exists()
    # the reference lies where the source mask lies, in the mask's own voxel order
    np.testing.assert_array_equal(
        np.asarray(nib.load(str(tmp_path / "out" / "lps_reference.nii.gz")).dataobj),
        np.asarray(nib.load(str(twins["data"] / "lps_mask.nii.gz")).dataobj))


@pytest.mark.parametrize("case", ["lps", "asr"])
def test_export_of_reoriented_maps_goes_back_to_the_file_grid(twins, tmp_path, case):
    """After --reorient the store holds RAS arrays; the files are back on the image file's
    grid, voxel for voxel, with its affine (what a viewer's segmentation layer wants)."""
    files = export_maps(twins["reoriented"], tmp_path, cases=[case], layers=["dec"])
    ref = nib.load(str(tmp_path / f"{case}_reference.nii.gz"))
    mask = nib.load(str(twins["data"] / f"{case}_mask.nii.gz"))
    np.testing.assert_array_equal(np.asarray(ref.dataobj), np.asarray(mask.dataobj))
    np.testing.assert_allclose(ref.affine, mask.affine, atol=1e-5)
    assert all(f.shape == mask.shape and not f.resampled for f in files)
    ras_binary = twins["reoriented"].maps(case)["dec"]["binary"]
    exported = nib.load(str(tmp_path / f"{case}_dec.nii.gz"))
    np.testing.assert_array_equal(np.asarray(nib.as_closest_canonical(exported).dataobj), ras_binary)
    names = {f.name for f in files}
    assert {"dec", "_image", "_prediction", "_reference"} <= names
    assert all(n.startswith(("dec#unit", "_")) or n == "dec" for n in names)


def test_export_resamples_back_to_the_image_grid_when_the_card_resized(model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    vol, mask = _volume((20, 12, 18))
    aff = _ras(spacing=(0.8, 1.3, 1.0))
    _nifti_pair(data, "big", vol, mask, aff)
    st = engine.open_store(score_dataset(model, data, tmp_path / "run.h5", save_maps=1).store)
    maps = st.maps("big")
    assert maps["_image"].shape == (16, 16, 16)  # the card resized the input
    files = export_maps(st, tmp_path / "out")
    assert files and all(f.resampled and f.shape == (20, 12, 18) for f in files)
    for f in files:
        img = nib.load(str(f.path))
        assert img.shape == (20, 12, 18)
        np.testing.assert_allclose(img.affine, aff, atol=1e-5)
        if f.kind in ("binary", "reference"):
            assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1}
    prob = np.asarray(nib.load(str(tmp_path / "out" / "big_dec_probability.nii.gz")).dataobj)
    np.testing.assert_allclose(prob, resize_linear(maps["dec"]["probability"].astype(np.float32),
                                                   (20, 12, 18)), rtol=1e-6)
    ref = np.asarray(nib.load(str(tmp_path / "out" / "big_reference.nii.gz")).dataobj)
    assert (ref == mask).mean() > 0.95  # nearest neighbour there and back


def test_nrrd_images_export_as_nrrd_unless_asked(model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    vol, mask = _volume()
    aff = _ras()
    _nrrd_lps(data / "n.nrrd", vol, aff)
    _nrrd_lps(data / "n_mask.nrrd", mask, aff)
    st = engine.open_store(score_dataset(model, data, tmp_path / "run.h5", save_maps=1).store)
    assert st.map_grid("n").format == "nrrd"
    files = export_maps(st, tmp_path / "out", layers=["dec"])
    src_header = nrrd.read_header(str(data / "n.nrrd"))
    for f in files:
        assert f.path.suffix == ".nrrd"
        arr, header = nrrd.read(str(f.path), index_order="F")
        assert arr.shape == (16, 16, 16) and header["space"] == "left-posterior-superior"
        np.testing.assert_allclose(header["space directions"], src_header["space directions"])
        np.testing.assert_allclose(header["space origin"], src_header["space origin"])
    binary, _ = nrrd.read(str(tmp_path / "out" / "n_dec.nrrd"), index_order="F")
    np.testing.assert_array_equal(binary, st.maps("n")["dec"]["binary"])
    nifti = export_maps(st, tmp_path / "nii", layers=["dec"], format="nifti")
    assert all(f.path.name.endswith(".nii.gz") for f in nifti)
    np.testing.assert_allclose(nib.load(str(nifti[0].path)).affine, aff, atol=1e-5)


def test_layer_selection_by_tensor_layer_or_map_name(twins, tmp_path):
    st = twins["reoriented"]
    by_tensor = {f.name for f in export_maps(st, tmp_path / "a", cases=["ras"], layers=["enc1"])}
    assert {n for n in by_tensor if not n.startswith("_")} >= {"enc1"}
    assert all(n.startswith(("enc1", "_")) for n in by_tensor)
    assert any("#unit" in n for n in by_tensor)  # the layer's saved best units come with it
    by_layer = {f.name for f in export_maps(st, tmp_path / "b", cases=["ras"], layers=["block/enc1"])}
    assert by_layer == by_tensor
    unit = next(n for n in by_tensor if "#unit" in n)
    one = export_maps(st, tmp_path / "c", cases=["ras"], layers=[unit])
    assert {f.name for f in one} == {unit, "_image", "_prediction", "_reference"}
    assert (tmp_path / "c" / f"ras_{file_stem(unit)}.nii.gz").exists() and "#" not in file_stem(unit)


def test_export_errors_name_what_exists(twins, tmp_path, model):
    st = twins["plain"]
    with pytest.raises(KeyError, match=r"case 'lpz' is not in the store; .*\['lps'"):
        export_maps(st, tmp_path, cases=["lpz"])
    with pytest.raises(KeyError, match="'asr' was scored but its maps were not saved"):
        export_maps(st, tmp_path, cases=["asr"])
    with pytest.raises(KeyError, match=r"no saved maps of layer 'dek'.*closest \['dec'"):
        export_maps(st, tmp_path, layers=["dek"])
    with pytest.raises(ValueError, match="format='png'"):
        export_maps(st, tmp_path, format="png")
    bare = score_dataset(model, twins["data"], tmp_path / "bare.h5", max_cases=1).store
    with pytest.raises(ValueError, match=r"has no saved maps; score again with save_maps='ID'"):
        export_maps(bare, tmp_path)


def test_store_without_grids_exports_with_an_identity_affine(tmp_path):
    """tests/data/store-v1.h5 (protoseg 0.1.0) has maps but no grid."""
    st = engine.open_store(ROOT / "tests" / "data" / "store-v1.h5")
    assert st.map_grid("b") is None
    with pytest.warns(UserWarning, match="no recorded affine"):
        files = export_maps(st, tmp_path)
    assert files and all(not f.resampled for f in files)
    np.testing.assert_array_equal(nib.load(str(files[0].path)).affine, np.eye(4))


# ------------------------------------------------------------------ CLI

def test_cli_maps_writes_files_and_json(twins, tmp_path):
    from cli.main import cli

    runner = CliRunner()
    store = str(twins["plain"].path)
    res = runner.invoke(cli, ["maps", store, "-o", str(tmp_path / "m"), "--case", "ras",
                              "--layer", "dec"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 5 and all(Path(p).exists() for p in lines)
    assert "5 file(s) for 1 case(s)" in res.stderr
    res = runner.invoke(cli, ["maps", store, "-o", str(tmp_path / "j"), "--json", "--format", "nrrd",
                              "--layer", "dec"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert {r["case"] for r in rows} == {"lps", "ras"} and all(r["path"].endswith(".nrrd") for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--case", "raz"], "case 'raz' is not in the store"),
    (["--layer", "dek"], "no saved maps of layer 'dek'"),
])
def test_cli_maps_errors_are_one_line(twins, tmp_path, args, message):
    from cli.main import cli

    res = CliRunner().invoke(cli, ["maps", str(twins["plain"].path), "-o", str(tmp_path)] + args)
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0]


def test_cli_maps_without_maps_or_output(twins, tmp_path, model):
    from cli.main import cli

    bare = score_dataset(model, twins["data"], tmp_path / "bare.h5", max_cases=1).store
    res = CliRunner().invoke(cli, ["maps", str(bare), "-o", str(tmp_path / "m")])
    assert res.exit_code == 1 and "no saved maps; score again with --maps ID" in res.output
    res = CliRunner().invoke(cli, ["maps", str(bare)])
    assert res.exit_code == 2 and "-o/--output" in res.output


# ------------------------------------------------------------------ report orientation

def test_report_slices_are_drawn_in_anatomical_orientation():
    """A voxel at the patient's right, anterior, superior corner of an LPS volume lands at the
    top left of the axial and coronal slices (radiological view) and the top left of the
    sagittal one (anterior on the left), and the views are named and labelled."""
    from engine.report import figures

    vol = np.zeros((6, 7, 8), dtype=np.float32)
    vol[5, 6, 7] = 1.0  # RAS: right-most, anterior-most, superior-most
    lps, aff = _twin(vol, np.eye(4), "LPS")
    ras = figures._to_ras(lps, aff)
    np.testing.assert_array_equal(ras, vol)
    views = figures._on_screen([np.take(ras, i, axis=a) for a, i in enumerate((5, 6, 7))])
    for v in views:
        assert v[0, 0] == 1.0
    fig = figures.fig_maps(lps, lps > 0.5, lps, [figures.MapPanel("conv", lps > 0.5, lps)],
                           affine=aff)
    texts = [t.get_text() for t in fig.texts]
    for name in ("sagittal", "coronal", "axial"):
        assert any(t.startswith(name) for t in texts)
    assert {"R", "L", "A", "P", "S", "I"} <= set(texts)
    plain = [t.get_text() for t in figures.fig_maps(lps, None, None, []).texts]
    assert not {"R", "L"} & set(plain) and any(t.startswith("axis 0") for t in plain)
