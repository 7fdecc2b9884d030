"""The protoseg CLI through click's CliRunner: success and error paths, exit codes, --json."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from tests import models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture()
def unet_path(tmp_path):
    return models.save(models.unet(batch="N", size=32, metadata=True), tmp_path / "unet.onnx")


def _smooth_threshold_model(size: int = 32):
    """x → Conv(4 smoothing kernels of growing width) → Relu → Conv 1×1 (logits) → Sigmoid.

    Its prediction is 'smoothed intensity above 0.5': right on clean blobs, worse with noise,
    so that true Dice varies across cases and label-free estimates have something to rank.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from engine.model.metadata import new_metadata, write_metadata

    w1 = np.zeros((4, 1, 5, 5), np.float32)
    for k in range(4):
        r = k // 2 + 1
        w1[k, 0, 2 - r:3 + r, 2 - r:3 + r] = 1.0 / (2 * r + 1) ** 2
    b1 = np.zeros(4, np.float32)
    w2 = np.full((1, 4, 1, 1), 2.5, np.float32)
    b2 = np.array([-5.0], np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["smooth"], name="smooth", pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["smooth"], ["relu"], name="relu"),
             helper.make_node("Conv", ["relu", "w2", "b2"], ["logits"], name="logits"),
             helper.make_node("Sigmoid", ["logits"], ["prob"], name="prob")]
    graph = helper.make_graph(nodes, "smooth_threshold",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, size, size])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, size, size])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    write_metadata(model, new_metadata(
        input={"name": "x", "layout": "NCHW", "size": [size, size]},
        prediction={"output": "prob", "activation": "sigmoid", "classes": [1], "threshold": 0.5},
        preprocessing={"resize": True, "scaling": "none"}))
    return model


@pytest.fixture()
def smooth_path(tmp_path):
    return models.save(_smooth_threshold_model(), tmp_path / "smooth.onnx")


@pytest.fixture()
def data(tmp_path):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:32, :32]
    images, masks = [], []
    for i in range(16):
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 10)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
        noise = 0.2 + 0.15 * (i % 8)  # graded difficulty, so the output's Dice varies
        images.append(m + noise * rng.standard_normal((32, 32)).astype(np.float32))
        masks.append(m)
    path = tmp_path / "cases.npz"
    np.savez(path, images=np.stack(images), masks=np.stack(masks),
             ids=np.array([f"c{i}" for i in range(16)]),
             groups=np.array(["abcd"[i // 4] for i in range(16)]))
    return path


def _ok(result):
    assert result.exit_code == 0, result.output + (repr(result.exception) if result.exception else "")
    return result


def _one_line_error(result, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


def test_version_and_help(runner):
    out = _ok(runner.invoke(cli, ["--version"])).output
    assert re.search(r"protoseg, version \d+\.\d+", out)
    assert "demo" in _ok(runner.invoke(cli, ["--help"])).output


def _all_commands():
    names = []
    for name, cmd in cli.commands.items():
        if hasattr(cmd, "commands"):
            names += [f"{name} {sub}" for sub in cmd.commands]
        else:
            names.append(name)
    return sorted(names)


@pytest.mark.parametrize("command", _all_commands())
def test_every_command_has_help_with_an_example(runner, command):
    out = _ok(runner.invoke(cli, command.split() + ["--help"])).output
    assert "Example" in out, f"{command} --help has no example"


def test_inspect_table_and_json(runner, unet_path):
    out = _ok(runner.invoke(cli, ["inspect", str(unet_path)])).output
    assert "hidden tensors" in out and "block/enc1" in out
    data = json.loads(_ok(runner.invoke(cli, ["inspect", str(unet_path), "--json"])).output)
    assert set(data) >= {"inputs", "outputs", "hidden"}
    assert [i["name"] for i in data["inputs"]] == ["x"]
    assert [o["name"] for o in data["outputs"]] == ["prob"]
    hidden = {t["name"]: t for t in data["hidden"]}
    assert hidden["enc1"]["layer"] == "block/enc1" and hidden["enc1"]["op"] == "Relu"
    assert hidden["enc1"]["shape"][1:] == [4, 32, 32] and hidden["enc1"]["dtype"] == "float32"
    for t in data["hidden"]:
        assert set(t) >= {"name", "layer", "op", "shape", "dtype"}


def test_inspect_errors_are_one_line(runner, tmp_path):
    bad = models.write_truncated(tmp_path / "t.onnx")
    _one_line_error(runner.invoke(cli, ["inspect", str(bad)]))
    msg = _one_line_error(runner.invoke(cli, ["inspect", str(tmp_path / "missing.onnx")]))
    assert "missing.onnx" in msg
    # --debug shows the traceback instead
    res = runner.invoke(cli, ["--debug", "inspect", str(bad)])
    assert res.exit_code != 0 and res.exception is not None and not isinstance(res.exception, SystemExit)


def test_score_prints_a_layer_table_and_json(runner, unet_path, data, tmp_path):
    store = tmp_path / "run.h5"
    out = _ok(runner.invoke(cli, ["score", str(unet_path), str(data), "-o", str(store),
                                  "--level", "both", "--maps", "1"])).output
    assert "SA (mean ± sd)" in out and "block/enc1" in out and str(store) in out
    res = json.loads(_ok(runner.invoke(cli, ["score", str(unet_path), str(data), "-o", str(store),
                                             "--level", "both", "--maps", "1", "--json"])).output)
    assert res["cases"] == 16 and res["failed"] == 0 and res["resumed_skipped"] == 16
    import engine

    st = engine.open_store(store)
    means = np.nanmean(st.layer_scores()["score"][:, 0, :], axis=0)
    got = {r["tensor"]: r["mean"] for r in res["layers"]}
    for li, name in enumerate(st.layers["name"]):
        assert got[name] == pytest.approx(means[li])


def test_score_usage_and_domain_errors(runner, unet_path, data, tmp_path):
    store = str(tmp_path / "r.h5")
    res = runner.invoke(cli, ["score", str(unet_path), str(data), "-o", store, "--resume", "--overwrite"])
    assert res.exit_code == 2 and "contradict" in res.output
    res = runner.invoke(cli, ["score", str(unet_path), str(data), "-o", store, "--level", "neurons"])
    assert res.exit_code == 2
    msg = _one_line_error(runner.invoke(cli, ["score", str(unet_path), str(data), "-o", store,
                                              "--layers", "enc3"]))
    assert "enc3" in msg and "enc" in msg.split("enc3", 1)[1]
    _ok(runner.invoke(cli, ["score", str(unet_path), str(data), "-o", store, "-q"]))
    msg = _one_line_error(runner.invoke(cli, ["score", str(unet_path), str(data), "-o", store,
                                              "--resize", "downsample"]))
    assert "resize" in msg and "--overwrite" in msg
    msg = _one_line_error(runner.invoke(cli, ["score", str(unet_path), str(data), "-o", store,
                                              "--no-resume"]))
    assert "exists" in msg or "already" in msg
    _ok(runner.invoke(cli, ["score", str(unet_path), str(data), "-o", store, "--resize", "downsample",
                            "--overwrite", "-q"]))
    assert not (tmp_path / "missing").exists()


def test_estimate_ranks_flags_and_validates(runner, smooth_path, data, tmp_path):
    unet_path = smooth_path
    res = runner.invoke(cli, ["estimate", str(unet_path), str(data), "-o", str(tmp_path / "e.h5"),
                              "--flag-lowest", "2", "--json"])
    out = json.loads(_ok(res).output)
    assert out["estimators"] == ["paper", "all-layers"]
    ranking = out["ranking"]
    assert [r["rank"] for r in ranking] == list(range(1, 17))
    vals = [r["paper"] for r in ranking]
    finite = [v for v in vals if v is not None]
    assert finite == sorted(finite)
    n_nan = sum(v is None for v in vals)
    # NaN estimates (nothing defined: e.g. an empty prediction) are always flagged, first
    assert [r["flag"] for r in ranking] == [True] * max(2, n_nan) + [False] * (16 - max(2, n_nan))
    assert all(r["reason"] == "estimate undefined" for r in ranking[:n_nan])
    assert {v["name"] for v in out["validation"]} >= {"paper", "all-layers", "predicted_fraction"}
    table = _ok(runner.invoke(cli, ["estimate", str(unet_path), str(data), "-o", str(tmp_path / "e.h5"),
                                    "--flag-lowest", "2"])).output
    assert "validation against true Dice" in table
    res = runner.invoke(cli, ["estimate", str(unet_path), str(data), "-o", str(tmp_path / "x.h5"),
                              "--flag-lowest", "2", "--flag-below", "0.5"])
    assert res.exit_code == 2


def test_estimate_calibration_is_fitted_then_reused(runner, smooth_path, data, tmp_path):
    unet_path = smooth_path
    cal = tmp_path / "cal.json"
    _ok(runner.invoke(cli, ["estimate", str(unet_path), str(data), "-o", str(tmp_path / "a.h5"),
                            "--calibration", str(cal), "--json"]))
    assert cal.exists()
    out = json.loads(_ok(runner.invoke(cli, ["estimate", str(unet_path), str(data), "-o",
                                             str(tmp_path / "b.h5"), "--calibration", str(cal),
                                             "--estimator", "calibrated", "--json"])).output)
    assert out["estimators"] == ["calibrated"]


def test_report_writes_html_and_markdown(runner, unet_path, data, tmp_path):
    store = tmp_path / "run.h5"
    _ok(runner.invoke(cli, ["score", str(unet_path), str(data), "-o", str(store), "-q"]))
    html = Path(_ok(runner.invoke(cli, ["report", str(store), "-o", str(tmp_path / "rep")])).output.strip())
    assert html.name == "report.html" and html.stat().st_size > 1000
    md = json.loads(_ok(runner.invoke(cli, ["report", str(store), "-o", str(tmp_path / "md"),
                                            "--format", "md", "--json"])).output)
    assert Path(md["report"]).suffix == ".md"
    _one_line_error(runner.invoke(cli, ["report", str(unet_path), "-o", str(tmp_path / "bad")]))


def test_export_onnx_adds_names_and_a_model_card(runner, tmp_path):
    src = models.save(models.unet(batch="N", size=32), tmp_path / "plain.onnx")
    out = tmp_path / "named.onnx"
    res = json.loads(_ok(runner.invoke(cli, ["export", "onnx", str(src), "-o", str(out),
                                             "--activation", "sigmoid", "--json"])).output)
    assert Path(res["path"]) == out and out.exists()
    import engine
    from engine.model.metadata import read_metadata
    import onnx

    assert read_metadata(onnx.load(str(out)))["prediction"]["activation"] == "sigmoid"
    assert any(t.exported for t in engine.list_hidden_tensors(out))


def test_export_torch_from_a_factory_function(runner, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "t.onnx"
    res = runner.invoke(cli, ["export", "torch", "tests.cli._torch_factory:make_net", "-o", str(out),
                              "--input-shape", "1,1,32,32", "--activation", "sigmoid", "--json"])
    data = json.loads(_ok(res).output)
    assert out.exists() and len(data["outputs"]) > 1
    msg = _one_line_error(runner.invoke(cli, ["export", "torch", "tests.cli._torch_factory:nope",
                                              "-o", str(out), "--input-shape", "1,1,32,32"]))
    assert "nope" in msg


def _readme_commands() -> set[str]:
    text = (ROOT / "README.md").read_text()
    found = set()
    pattern = r"(?:^\s*(?:\$ )?|`)protoseg ((?:[a-z]+)(?: (?:torch|tensorflow|onnx|nnunet|monai-bundle))?)"
    for m in re.finditer(pattern, text, re.M):
        found.add(m.group(1))
    return found


def test_readme_and_commands_agree():
    documented = _readme_commands()
    commands = set(_all_commands())
    groups = {name for name, cmd in cli.commands.items() if hasattr(cmd, "commands")}
    documented_leaf = {d for d in documented if d not in groups}
    missing = commands - documented_leaf
    gone = {d for d in documented_leaf if d not in commands}
    assert not missing, f"commands missing from README.md: {sorted(missing)}"
    assert not gone, f"README.md names commands that do not exist: {sorted(gone)}"


def test_score_skips_a_time_series_naming_volume_and_volume_scores_it(runner, tmp_path):
    """A 4-D NIfTI whose header says time is one case skipped with a followable fix (--volume)."""
    import nibabel as nib

    import engine

    model = models.save(models.unet(ndim=3, batch="N", size=8, metadata=True), tmp_path / "u3.onnx")
    data = tmp_path / "cases"
    data.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), np.eye(4)),
                 str(data / f"{name}.nii.gz"))
    series = nib.Nifti1Image(rng.random((8, 8, 8, 3)).astype(np.float32), np.eye(4))
    series.header.set_xyzt_units("mm", "sec")
    nib.save(series, str(data / "fmri.nii.gz"))

    store = tmp_path / "run.h5"
    res = _ok(runner.invoke(cli, ["score", str(model), str(data), "-o", str(store), "--json"]))
    out = json.loads(res.stdout)
    assert out["cases"] == 3 and out["failed"] == 1
    st = engine.open_store(store)
    assert dict(zip(st.cases["id"], st.cases["status"]))["fmri"] == "time-series"
    # one line on stderr per skipped case, without Python's warning decoration
    msgs = [line for line in res.stderr.splitlines() if "fmri" in line]
    assert msgs and all(line.startswith("protoseg: case 'fmri' skipped: ") for line in msgs)
    assert "UserWarning" not in res.stderr
    assert len(msgs) == 1 and "fmri.nii.gz" in msgs[0] and "--volume 0" in msgs[0]
    assert "volume=" not in msgs[0] and "spatial_ndim" not in msgs[0]

    out = json.loads(_ok(runner.invoke(cli, ["score", str(model), str(data), "-o",
                                             str(tmp_path / "v.h5"), "--volume", "2", "--json"])).output)
    assert out["cases"] == 3 and out["failed"] == 0
    assert engine.open_store(tmp_path / "v.h5").config["volume"] == 2


def test_volume_option_is_documented_and_validated(runner, unet_path, data, tmp_path):
    for command in ("score", "estimate"):
        assert "--volume" in _ok(runner.invoke(cli, [command, "--help"])).output
    res = runner.invoke(cli, ["score", str(unet_path), str(data), "-o", str(tmp_path / "r.h5"),
                              "--volume", "-1"])
    assert res.exit_code == 2 and "--volume" in res.output


# ---------------------------------------------------------------- dynamic shapes (issue 14)

def test_inspect_resolves_symbolic_dims_for_an_input_shape(runner, tmp_path):
    path = models.save(models.unet(batch="N", size="S"), tmp_path / "dyn.onnx")
    plain = _ok(runner.invoke(cli, ["inspect", str(path)])).stdout
    assert "Nx4xunk__0xunk__1" in plain  # symbolic dims shown as such
    out = json.loads(_ok(runner.invoke(cli, ["inspect", str(path), "--input-shape", "1,1,64,48",
                                             "--json"])).stdout)
    enc1 = next(t for t in out["hidden"] if t["name"] == "enc1")
    pool1 = next(t for t in out["hidden"] if t["name"] == "pool1")
    assert enc1["resolved_shape"] == [4, 64, 48] and pool1["resolved_shape"] == [4, 32, 24]
    assert enc1["bytes_per_case"] == 4 * 64 * 48 * 4
    assert out["bytes_per_case"] == sum(t["bytes_per_case"] for t in out["hidden"])
    bad = runner.invoke(cli, ["inspect", str(path), "--input-shape", "1,64,48"])
    assert bad.exit_code == 2 and "has 3 dims" in bad.output


def test_a_size_the_model_cannot_take_is_one_line_and_input_size_scores_it(runner, tmp_path):
    path = models.save(models.unet(batch="N", size="S"), tmp_path / "dyn.onnx")
    data = tmp_path / "odd.npz"
    np.savez(data, images=np.random.default_rng(0).random((3, 1, 33, 33)).astype(np.float32))
    res = runner.invoke(cli, ["score", str(path), str(data), "-o", str(tmp_path / "a.h5"), "-q"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "spatial size (33, 33)" in lines[0] and "--input-size 34,34" in lines[0]
    assert not (tmp_path / "a.h5").exists()
    _ok(runner.invoke(cli, ["score", str(path), str(data), "-o", str(tmp_path / "b.h5"), "-q",
                            "--input-size", "34,34"]))
    import engine

    assert engine.open_store(tmp_path / "b.h5").config["model_card"]["input_size"] == [34, 34]
    bad = runner.invoke(cli, ["score", str(path), str(data), "-o", str(tmp_path / "c.h5"), "-q",
                              "--input-size", "34"])
    assert bad.exit_code == 1 and "--input-size 34: expected 2 positive integers" in bad.stderr


def test_declaring_sigmoid_for_raw_scores_stops_score_with_the_range(runner, tmp_path):
    path = models.save(models.unet(batch="N", head="logits"), tmp_path / "logits.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, images=np.random.default_rng(1).random((2, 1, 32, 32)).astype(np.float32))
    res = runner.invoke(cli, ["score", str(path), str(data), "-o", str(tmp_path / "a.h5"), "-q",
                              "--activation", "sigmoid"])
    assert res.exit_code == 1
    line = res.stderr.strip()
    assert "\n" not in line and "--activation sigmoid declares probabilities" in line
    assert "--activation logits" in line
    _ok(runner.invoke(cli, ["score", str(path), str(data), "-o", str(tmp_path / "b.h5"), "-q"]))


# ---------------------------------------------------------------- messages (issue 18)

def _folder_with_bad_masks(root: Path, good: int, bad: int) -> Path:
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(5)
    for i in range(good + bad):
        img = (rng.random((32, 32)) * 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"case{i:02d}.png")
        side = 32 if i < good else 16  # the bad ones: a mask on another grid
        Image.fromarray(((rng.random((side, side)) > 0.5) * 255).astype(np.uint8)).save(
            root / f"case{i:02d}_mask.png")
    return root


def test_skipped_cases_are_one_line_each_capped_and_the_summary_says_why(runner, tmp_path):
    from cli.main import MAX_CASE_LINES

    path = models.save(models.unet(batch="N", metadata=True), tmp_path / "u.onnx")
    data = _folder_with_bad_masks(tmp_path / "cases", good=2, bad=MAX_CASE_LINES + 3)
    res = _ok(runner.invoke(cli, ["score", str(path), str(data), "-o", str(tmp_path / "a.h5")]))
    skipped = [line for line in res.stderr.splitlines() if " skipped: " in line]
    assert len(skipped) == MAX_CASE_LINES
    assert skipped[0].startswith("protoseg: case 'case02' skipped: mask ")
    assert "Warning" not in res.stderr and "warnings.warn" not in res.stderr
    assert "... and 3 more skipped cases (-v lists them" in res.stderr
    # the summary's NaN reasons are the cases' own statuses, not NOT_COMPUTED
    assert f"mask-shape-mismatch: {MAX_CASE_LINES + 3}" in res.stdout and "NOT_COMPUTED" not in res.stdout
    everything = _ok(runner.invoke(cli, ["-v", "score", str(path), str(data), "-o", str(tmp_path / "b.h5")]))
    assert sum(" skipped: " in line for line in everything.stderr.splitlines()) == MAX_CASE_LINES + 3
    assert "more skipped" not in everything.stderr


def test_deterministic_is_recorded_in_the_configuration(runner, tmp_path):
    import engine

    path = models.save(models.unet(batch="N", metadata=True), tmp_path / "u.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, images=np.random.default_rng(2).random((2, 1, 32, 32)).astype(np.float32))
    _ok(runner.invoke(cli, ["score", str(path), str(data), "-o", str(tmp_path / "a.h5"), "-q",
                            "--deterministic"]))
    _ok(runner.invoke(cli, ["score", str(path), str(data), "-o", str(tmp_path / "b.h5"), "-q"]))
    a, b = engine.open_store(tmp_path / "a.h5"), engine.open_store(tmp_path / "b.h5")
    assert a.config["deterministic"] is True and "deterministic" not in b.config
    np.testing.assert_array_equal(a.layer_scores()["score"], b.layer_scores()["score"])
