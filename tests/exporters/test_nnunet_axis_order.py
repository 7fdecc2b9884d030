"""Issue 17 follow-up: an exported nnU-Net model is fed the axes it was trained on. nnU-Net's
default readers give the network each file's axes reversed (SimpleITK's (z, y, x) view;
NibabelIO's ``get_fdata().transpose((2, 1, 0))``), then permuted by the plans'
``transpose_forward``; the exporter writes that as the card's orientation, and a scoring run
feeds every NIfTI/NRRD case so. A trained-model folder, a NIfTI case, an LPS NRRD case and the
same arrays pre-transposed as ``.npy`` are built here."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("dynamic_network_architectures.architectures.unet")

import engine  # noqa: E402
from engine.model.card import resolve_model_card  # noqa: E402
from engine.model.metadata import read_metadata  # noqa: E402
from engine.model.session import Session  # noqa: E402
from engine.run import score_dataset  # noqa: E402
from exporters import nnunet  # noqa: E402
from tests.engine.test_maps_export import _nrrd_lps, _ras  # noqa: E402
from tests.exporters.test_nnunet import make_nnunet_folder  # noqa: E402

TRANSPOSE_FORWARD = [2, 0, 1]
FILE_SHAPE = (6, 8, 12)  # nnU-Net's view (z, y, x) = (12, 8, 6), transposed: (6, 12, 8), multiples of (2, 4, 4)


def _nnunet_view(file_array: np.ndarray) -> np.ndarray:
    """What nnU-Net's preprocessing hands the network (before normalising): the file's array
    reversed as its readers give it, then ``data.transpose([0, *[i + 1 for i in tf]])``."""
    data = file_array.transpose(2, 1, 0)[None]
    return data.transpose([0, *[i + 1 for i in TRANSPOSE_FORWARD]])[0]


def _edit_plans(folder, **changes) -> None:
    path = folder / "plans.json"
    plans = json.loads(path.read_text())
    plans.update(changes)
    path.write_text(json.dumps(plans))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nnunet_axes")
    folder = make_nnunet_folder(root, dim=3)
    _edit_plans(folder, image_reader_writer="SimpleITKIO", transpose_forward=TRANSPOSE_FORWARD,
                transpose_backward=list(np.argsort(TRANSPOSE_FORWARD).tolist()))
    result = nnunet.export(folder, root / "m.onnx")
    i, j, k = np.meshgrid(*[np.arange(n) for n in FILE_SHAPE], indexing="ij")
    vol = (i + 10.0 * j + 100.0 * k + 0.5 * np.sin(i * j + k)).astype(np.float32)  # no symmetry
    mask = ((i >= 2) & (j < 5) & (k >= 3)).astype(np.uint8)
    files = root / "files"
    files.mkdir()
    aff = _ras(spacing=(0.8, 0.8, 2.5))
    nib.save(nib.Nifti1Image(vol, aff), str(files / "ras.nii.gz"))
    nib.save(nib.Nifti1Image(mask, aff), str(files / "ras_mask.nii.gz"))
    lps = aff.copy()
    lps[:2] *= -1
    flipped = np.ascontiguousarray(vol[::-1, :, ::-1])  # an LPS file of other voxels
    _nrrd_lps(files / "lps.nrrd", flipped, lps)
    _nrrd_lps(files / "lps_mask.nrrd", np.ascontiguousarray(mask[::-1, :, ::-1]), lps)
    arrays = root / "arrays"  # the user's own pre-transposed arrays: no affine, fed as stored
    arrays.mkdir()
    for name, v, m in (("ras", vol, mask), ("lps", flipped, np.ascontiguousarray(mask[::-1, :, ::-1]))):
        np.save(arrays / f"{name}.npy", np.ascontiguousarray(_nnunet_view(v)))
        np.save(arrays / f"{name}_mask.npy", np.ascontiguousarray(_nnunet_view(m)))
    return {"root": root, "folder": folder, "model": result.path, "result": result, "files": files,
            "arrays": arrays, "vol": vol, "flipped": flipped}


def test_default_readers_write_the_reversed_file_axes_permuted_by_transpose_forward(exported, tmp_path):
    plan = nnunet.read_plan(exported["folder"], configuration="3d_fullres")
    assert plan.transpose_forward == tuple(TRANSPOSE_FORWARD)
    assert plan.orientation == "xzy"  # "zyx"[t] for t in transpose_forward
    assert not any("axes reversed" in n or "transpose_forward" in n for n in plan.notes)  # handled: no warning
    card = read_metadata(onnx.load(exported["model"]))
    assert card["input"]["orientation"] == "xzy" and card["extra"]["transpose_forward"] == TRANSPOSE_FORWARD
    assert not any("axis order" in m or "reversed" in m for m in exported["result"].messages)
    assert resolve_model_card(exported["model"]).orientation == "xzy"


def test_the_model_is_fed_what_nnunet_feeds_it_and_scores_like_pretransposed_arrays(exported, monkeypatch):
    fed: list[np.ndarray] = []
    run = Session.run

    def spy(self, feeds, outputs=None):
        fed.append(np.array(feeds["input"]))
        return run(self, feeds, outputs)

    monkeypatch.setattr(Session, "run", spy)
    st = engine.open_store(score_dataset(exported["model"], exported["files"], exported["root"] / "files.h5",
                                         batch_size=1, reorient=None).store)
    assert st.config["reorient"] == "xzy"
    ids = [str(c) for c in st.cases["id"]]
    assert ids == ["lps", "ras"] and list(st.cases["status"]) == ["ok", "ok"]
    card = resolve_model_card(exported["model"])  # nnU-Net's z-score, whole case
    assert fed and all(f.shape == (1, 1, 6, 12, 8) for f in fed)  # one case a batch, the network's axes
    for array in (exported["vol"], exported["flipped"]):
        want = card.preprocess(_nnunet_view(array)[None])[None]
        assert any(np.allclose(f, want, rtol=1e-6, atol=1e-6) for f in fed)
        assert not any(np.allclose(f, card.preprocess(array[None])[None].reshape(f.shape)) for f in fed)
    grids = st.case_grids()
    assert list(grids["file_orientation"]) == ["LPS", "RAS"]
    assert list(grids["orientation"]) == ["LSP", "RSA"]  # "xzy" of each file's own codes
    npy = engine.open_store(score_dataset(exported["model"], exported["arrays"], exported["root"] / "npy.h5",
                                          batch_size=1, reorient=None).store)
    assert [str(c) for c in npy.cases["id"]] == ids and list(npy.case_grids()["orientation"]) == ["", ""]
    for key in ("score", "tp", "fp", "fn"):
        np.testing.assert_array_equal(st.layer_scores()[key], npy.layer_scores()[key])
    np.testing.assert_array_equal(st.input_scores()["score"], npy.input_scores()["score"])
    np.testing.assert_array_equal(st.output_dice(), npy.output_dice())
    assert np.isfinite(st.layer_scores()["score"]).any()


def test_no_reorient_feeds_file_order(exported, monkeypatch):
    shapes: list[tuple[int, ...]] = []
    run = Session.run

    def spy(self, feeds, outputs=None):
        shapes.append(tuple(feeds["input"].shape))
        return run(self, feeds, outputs)

    monkeypatch.setattr(Session, "run", spy)
    st = engine.open_store(score_dataset(exported["model"], exported["files"], exported["root"] / "off.h5",
                                         batch_size=1, reorient=False).store)
    assert "reorient" not in st.config
    assert list(st.case_grids()["orientation"]) == ["LPS", "RAS"]
    assert shapes and set(shapes) == {(1, 1, *FILE_SHAPE)}


@pytest.mark.parametrize("reader, transpose, orientation", [
    ("SimpleITKIO", [0, 1, 2], "zyx"),
    ("NibabelIO", [1, 0, 2], "yzx"),
    (None, [0, 1, 2], "zyx"),  # no reader named: nnU-Net's default (SimpleITKIO)
    ("NibabelIOWithReorient", [2, 0, 1], "RSA"),
    ("SimpleITKIOWithReorient", [0, 1, 2], "SAR"),
    ("Tiff3DIO", [0, 1, 2], None),
])
def test_orientation_per_reader(tmp_path, reader, transpose, orientation):
    folder = make_nnunet_folder(tmp_path, dim=3)
    _edit_plans(folder, image_reader_writer=reader, transpose_forward=transpose)
    plan = nnunet.read_plan(folder, configuration="3d_fullres")
    assert plan.orientation == orientation and plan.notes == ()


def test_other_readers_with_a_transpose_are_noted_not_guessed(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=3)
    _edit_plans(folder, image_reader_writer="Tiff3DIO", transpose_forward=[1, 0, 2])
    plan = nnunet.read_plan(folder, configuration="3d_fullres")
    assert plan.orientation is None
    assert [n for n in plan.notes if "TIFF" in n and "[1, 0, 2]" in n and "so permuted" in n]
    _edit_plans(folder, image_reader_writer="MyReader")
    plan = nnunet.read_plan(folder, configuration="3d_fullres")
    assert plan.orientation is None and any("'MyReader'" in n and "[1, 0, 2]" in n for n in plan.notes)


def test_a_2d_configuration_of_3d_data_is_noted(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2)
    _edit_plans(folder, transpose_forward=[2, 0, 1], transpose_backward=[1, 2, 0],
                original_median_shape_after_transp=[40, 32, 48])
    plan = nnunet.read_plan(folder, configuration="2d")
    assert plan.orientation is None
    note = [n for n in plan.notes if n.startswith("a 2-D configuration of 3-D data")]
    assert note and "across the file's x axis" in note[0] and "rows along its z axis" in note[0]
    assert "3d_fullres" in note[0] and "\n" not in note[0]
    # 2-D images: nnU-Net plans them as volumes of one slice, transpose_forward of 3 entries
    _edit_plans(folder, transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2],
                original_median_shape_after_transp=[1, 32, 48])
    plan = nnunet.read_plan(folder, configuration="2d")
    assert plan.orientation is None and plan.notes == ()
