"""`protoseg score` permutes each file's axes as the card's orientation "zyx" says (nnU-Net's
readers), --no-reorient turns it off, --reorient keeps it, and `protoseg maps` writes the maps
back on the image file's grid (issue 17 follow-up)."""
from __future__ import annotations

import nibabel as nib
import numpy as np
from click.testing import CliRunner

import engine
from cli.main import cli
from tests import models


def _ok(result):
    assert result.exit_code == 0, result.output + (repr(result.exception) if result.exception else "")
    return result


def test_score_permutes_file_axes_as_the_card_says_and_maps_go_back(tmp_path):
    meta = models.unet_metadata(ndim=3, size="D")
    meta["input"]["orientation"] = "zyx"
    meta["preprocessing"] = {"resize": False, "scaling": "none", "mean": None, "std": None}
    model = models.save(models.unet(ndim=3, size="D", batch="N", metadata=meta), tmp_path / "m.onnx")
    data = tmp_path / "cases"
    data.mkdir()
    i, j, k = np.meshgrid(np.arange(4), np.arange(8), np.arange(12), indexing="ij")
    vol = ((i + 10 * j + 100 * k) / 1000.0).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # stored LPS
    nib.save(nib.Nifti1Image(vol, affine), str(data / "a.nii.gz"))
    runner = CliRunner()
    for flags, want, codes in (((), "zyx", "SPL"), (("--reorient",), "zyx", "SPL"),
                               (("--no-reorient",), None, "LPS")):
        store = tmp_path / f"run{'_'.join(f.strip('-') for f in flags)}.h5"
        _ok(runner.invoke(cli, ["score", str(model), str(data), "-o", str(store), "-q", "--maps", "1", *flags]))
        st = engine.open_store(store)
        assert st.config.get("reorient") == want, flags
        grids = st.case_grids()
        assert grids["orientation"][0] == codes and grids["file_orientation"][0] == "LPS"
        assert st.maps("a")["_image"].shape == ((12, 8, 4) if want else (4, 8, 12))
        out = tmp_path / f"maps_{store.stem}"
        _ok(runner.invoke(cli, ["maps", str(store), "-o", str(out)]))
        img = nib.load(str(out / "a_image.nii.gz"))
        np.testing.assert_allclose(img.affine, affine, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(img.dataobj), vol)  # back in the file's voxel order
    help_text = "".join(_ok(runner.invoke(cli, ["score", "--help"])).output.split())  # wrapping aside
    assert "'zyx':reversed" in help_text and "--no-reorientkeepsvoxelsinfileorder,eitherway" in help_text
