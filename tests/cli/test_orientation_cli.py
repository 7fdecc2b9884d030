"""`protoseg score` reorients as the model card says; --reorient/--no-reorient override (issue 17)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from click.testing import CliRunner

import engine
from cli.main import cli
from tests import models


def _ok(result):
    assert result.exit_code == 0, result.output + (repr(result.exception) if result.exception else "")
    return result


def test_score_follows_the_card_orientation_and_the_flags_override_it(tmp_path):
    meta = models.unet_metadata(ndim=3, size=8)
    meta["input"]["orientation"] = "LPS"
    model = models.save(models.unet(ndim=3, size=8, batch="N", metadata=meta), tmp_path / "m.onnx")
    data = tmp_path / "cases"
    data.mkdir()
    vol = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(data / "a.nii.gz"))  # stored RAS
    runner = CliRunner()
    expected = {(): "LPS", ("--reorient",): "LPS", ("--no-reorient",): None}
    for flags, want in expected.items():
        store = tmp_path / f"run{len(flags)}{flags[0] if flags else ''}.h5"
        _ok(runner.invoke(cli, ["score", str(model), str(data), "-o", str(store), "-q", *flags]))
        st = engine.open_store(store)
        assert st.config.get("reorient") == want, flags
        grids = st.case_grids()
        assert grids["orientation"][0] == (want or "RAS") and grids["file_orientation"][0] == "RAS"
    help_text = _ok(runner.invoke(cli, ["score", "--help"])).output
    assert "--reorient / --no-reorient" in help_text and "orientation" in help_text
    res = runner.invoke(cli, ["estimate", str(tmp_path / "run0.h5"), "--no-reorient"])
    assert res.exit_code == 2 and "--reorient apply when scoring" in res.output
    out = json.loads(_ok(runner.invoke(cli, ["score", str(model), str(data), "-o", str(tmp_path / "j.h5"),
                                             "--json"])).stdout)
    assert out["cases"] == 1 and out["failed"] == 0
