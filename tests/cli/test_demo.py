"""The demo end to end: the shipped deepbrain ONNX on the shipped Colin27 volume.

One run checks that every output the README promises exists and that the numbers are sane
for real data: deepbrain's prediction agrees with the brain mask (SPEC §6: Dice ≈ 0.93), and
the one store holds the scores and the label-free estimates computed from them.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from cli.main import DEMO_DATA, DEMO_MODEL, cli
from engine import open_store


@pytest.mark.slow
def test_demo_writes_one_store_with_estimates_and_report(tmp_path):
    assert DEMO_MODEL.exists() and (DEMO_DATA / "colin27.nii.gz").exists()
    res = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path / "demo"), "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    out = json.loads(res.stdout)  # notes and progress go to stderr
    assert out["provider"] == "CPUExecutionProvider"
    assert 0.9 < out["output_dice"] < 0.96
    assert len(out["layers"]) == 15
    assert all(0 < r["mean"] <= 1 for r in out["layers"])
    for key in ("paper", "all-layers"):
        assert 0 < out["mean_sa"][key] <= 1
    for key in ("store", "report"):
        assert Path(out[key]).is_file()
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["demo.h5", "report"]
    with h5py.File(out["store"]) as f:
        assert f.attrs["encoding-type"]
    st = open_store(out["store"])
    assert st.has_units and st.config["reference"] == "prediction"
    est = st.estimates()
    assert est is not None and est["paper"][0] == pytest.approx(out["mean_sa"]["paper"])
    html = Path(out["report"]).read_text()
    assert "<img" in html and "http://" not in html and "https://" not in html
