"""Tests for engine/model/session.py: provider choice, sessions, batch looping, IOBinding path."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest

from engine.model.graph import expose, list_hidden_tensors
from engine.model.session import cuda_usable, make_session
from tests.models import save, tiny_conv, unet


def _x(batch: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)


def test_cuda_probe_is_silent(capfd):
    cuda_usable.cache_clear()
    result = cuda_usable()
    captured = capfd.readouterr()
    assert isinstance(result, bool)
    assert captured.err == "" and captured.out == ""
    assert cuda_usable() is result  # cached


def test_probe_restores_ort_logging(capfd):
    """After the probe, onnxruntime logs again (the severity was restored, not left silenced)."""
    if cuda_usable() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a machine where CUDA is listed but cannot load")
    capfd.readouterr()
    ort.InferenceSession(tiny_conv().SerializeToString(),
                         providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "CUDA" in capfd.readouterr().err


def test_cpu_session_reports_provider(capfd):
    sess = make_session(tiny_conv(), provider="cpu", optimization="basic", threads=1)
    assert sess.provider == "CPUExecutionProvider"
    assert sess.optimization == "basic"
    assert sess.input_names == ["x"] and sess.output_names == ["y"]
    assert sess.input_shapes["x"][1:] == (1, 8, 8)
    assert sess.fixed_batch is None
    assert sess.ort_session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    auto = make_session(tiny_conv(), provider="auto")
    assert auto.provider == ("CUDAExecutionProvider" if cuda_usable() else "CPUExecutionProvider")
    assert capfd.readouterr().err == ""


def test_cuda_unusable_is_one_line_error():
    if cuda_usable():
        pytest.skip("CUDA works here")
    with pytest.raises(ValueError) as info:
        make_session(tiny_conv(), provider="cuda")
    assert "cuda" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,match", [({"provider": "gpu"}, "provider"),
                                          ({"optimization": "max"}, "optimization"),
                                          ({"threads": -1}, "threads")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_session(tiny_conv(), **kwargs)


def test_model_sources(tmp_path):
    model = tiny_conv()
    path = save(model, tmp_path / "m.onnx")
    x = _x(2, 1, 8, 8)
    want = make_session(model, provider="cpu").run({"x": x})["y"]
    for source in (path, str(path), model.SerializeToString()):
        np.testing.assert_array_equal(make_session(source, provider="cpu").run({"x": x})["y"], want)
    with pytest.raises(FileNotFoundError):
        make_session(tmp_path / "missing.onnx")
    with pytest.raises(TypeError):
        make_session(3.5)
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot load"):
        make_session(tmp_path / "bad.onnx")


def test_fixed_batch_loops_like_per_case_runs():
    model = unet(batch=1)
    exposed = expose(model, list_hidden_tensors(model))
    sess = make_session(exposed, provider="cpu")
    assert sess.fixed_batch == 1
    x = _x(3, 1, 32, 32)
    batched = sess.run({"x": x})
    for i in range(3):
        single = sess.run({"x": x[i:i + 1]})
        for name in sess.output_names:
            assert batched[name].shape[0] == 3
            np.testing.assert_array_equal(batched[name][i:i + 1], single[name])


def test_dynamic_batch_matches_fixed_batch_model():
    x = _x(2, 1, 32, 32, seed=3)
    fixed = make_session(unet(batch=1), provider="cpu").run({"x": x})["prob"]
    dynamic = make_session(unet(batch="N"), provider="cpu").run({"x": x})["prob"]
    np.testing.assert_allclose(fixed, dynamic, rtol=1e-5, atol=1e-6)


def test_run_selected_outputs_and_cast():
    model = unet(batch="N", ndim=3, size=16, layout="NDHWC")
    sess = make_session(expose(model, ["enc1", "dec"]), provider="cpu")
    x64 = _x(2, 16, 16, 16, 1).astype(np.float64)
    out = sess.run({"img": x64}, outputs=["dec"])
    assert list(out) == ["dec"] and out["dec"].shape == (2, 4, 16, 16, 16)
    np.testing.assert_array_equal(out["dec"], sess.run({"img": x64.astype(np.float32)})["dec"])


def test_run_bad_feeds():
    sess = make_session(tiny_conv(), provider="cpu")
    with pytest.raises(ValueError, match="missing"):
        sess.run({"img": _x(1, 1, 8, 8)})
    with pytest.raises(ValueError, match="unknown outputs"):
        sess.run({"x": _x(1, 1, 8, 8)}, outputs=["nope"])
    with pytest.raises(ValueError, match="rank 4"):
        sess.run({"x": np.float32(1.0)})
    with pytest.raises(ValueError, match="rank 4"):
        sess.run({"x": _x(1, 8, 8)})


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_a_fixed_batch_of_two_takes_any_batch_size(batch):
    sess = make_session(tiny_conv(batch=2), provider="cpu")
    assert sess.fixed_batch == 2
    x = _x(batch, 1, 8, 8, seed=batch)
    out = sess.run({"x": x})["y"]
    assert out.shape == (batch, 1, 8, 8)
    # each case as the model would give it in a full batch of its own
    for i in range(batch):
        pair = np.concatenate([x[i:i + 1], x[i:i + 1]])
        np.testing.assert_array_equal(out[i], sess.run({"x": pair})["y"][0])


def test_iobinding_path_gives_the_same_outputs():
    """The CUDA code path (IOBinding, outputs bound to CPU) runs on a CPU session too."""
    model = unet(batch=1)
    sess = make_session(expose(model, list_hidden_tensors(model)), provider="cpu")
    bound = dataclasses.replace(sess, provider="CUDAExecutionProvider")
    x = _x(2, 1, 32, 32, seed=5)
    want, got = sess.run({"x": x}), bound.run({"x": x})
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_deterministic_sessions_ask_cuda_for_no_tf32_and_a_fixed_algorithm():
    from engine.model.session import cuda_provider_options

    assert cuda_provider_options({"user_compute_stream": 7}) == {"user_compute_stream": "7"}
    det = cuda_provider_options({"user_compute_stream": "7"}, deterministic=True)
    assert det == {"user_compute_stream": "7", "use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}
    # on the CPU the session builds and gives the same outputs
    x = _x(2, 1, 8, 8, seed=5)
    a = make_session(tiny_conv(), provider="cpu", deterministic=True).run({"x": x})["y"]
    b = make_session(tiny_conv(), provider="cpu").run({"x": x})["y"]
    np.testing.assert_array_equal(a, b)
