"""Export-time check of the declared activation on the exporters' own check run.

``--activation`` says what the prediction output *already holds*; the exporters run the model
anyway to compare it with the framework, and that run refuses ``sigmoid``/``softmax`` on raw
scores (or ``softmax`` on channels that do not sum to 1) before anything is written.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")

from cli.main import cli  # noqa: E402
from engine.model.activation import ActivationError  # noqa: E402
from engine.model.metadata import read_metadata, write_metadata  # noqa: E402
from exporters.onnx import expose  # noqa: E402
from tests import models  # noqa: E402

HERE = "tests.exporters.test_activation_check"
_NUMBER = r"-?\d+(\.\d+)?(e[-+]?\d+)?"


# ------------------------------------------------------------------ torch factories (CLI specs)


def _net(head: str, channels: int = 1, unused_sigmoid: bool = False):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Conv2d(4, channels, 1)
            if unused_sigmoid:  # registered last but never applied (trained with BCEWithLogits)
                self.unused = nn.Sigmoid()

        def forward(self, x):
            y = self.head(self.enc(x)) * 4.0  # raw conv scores, well outside [0, 1]
            if head == "sigmoid":
                return torch.sigmoid(y)
            if head == "softmax":
                return torch.softmax(y, dim=1)
            return y

    torch.manual_seed(0)
    return Net()


def logits_net():
    return _net("logits", unused_sigmoid=True)


def logits2_net():
    return _net("logits", channels=2)


def sigmoid_net():
    return _net("sigmoid")


def softmax3_net():
    return _net("softmax", channels=3)


# ------------------------------------------------------------------ helpers


@pytest.fixture()
def runner():
    return CliRunner()


def _error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


def _range_in(msg: str) -> tuple[float, float]:
    m = re.search(rf"range from ({_NUMBER}) to ({_NUMBER})", msg)
    assert m, msg
    return float(m.group(1)), float(m.group(4))


# ------------------------------------------------------------------ torch


def test_torch_sigmoid_declared_on_logits_fails_naming_the_range(runner, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "net.onnx"
    msg = _error_line(runner.invoke(cli, ["export", "torch", f"{HERE}:logits_net", "-o", str(out),
                                          "--input-shape", "1,1,16,16", "--activation", "sigmoid"]))
    assert "prediction output 'output'" in msg and "--activation sigmoid" in msg
    assert "--activation logits" in msg and "activation=" not in msg
    low, high = _range_in(msg)
    assert low < 0 or high > 1
    assert "not written" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing left behind


def test_torch_softmax_declared_on_logits_fails(runner, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "net.onnx"
    msg = _error_line(runner.invoke(cli, ["export", "torch", f"{HERE}:logits2_net", "-o", str(out),
                                          "--input-shape", "1,1,16,16", "--activation", "softmax"]))
    assert "--activation softmax" in msg and "--activation logits" in msg
    _range_in(msg)
    assert list(tmp_path.iterdir()) == []


def test_torch_sigmoid_output_declared_sigmoid_passes(runner, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "net.onnx"
    result = runner.invoke(cli, ["export", "torch", f"{HERE}:sigmoid_net", "-o", str(out),
                                 "--input-shape", "1,1,16,16", "--activation", "sigmoid"])
    assert result.exit_code == 0, result.output
    assert read_metadata(onnx.load(str(out)))["prediction"]["activation"] == "sigmoid"


def test_torch_guessed_activation_follows_the_values(tmp_path):
    """A guess is corrected by the check run, with a message, instead of failing."""
    torch = pytest.importorskip("torch")
    from exporters import torch as texp

    x = torch.rand(1, 1, 16, 16)
    # the last registered leaf is an (unused) nn.Sigmoid: guessed 'sigmoid', the values say logits
    result = texp.export(logits_net(), x, tmp_path / "a.onnx", exporter="torchscript")
    assert result.metadata["prediction"]["activation"] == "logits"
    assert read_metadata(onnx.load(str(result.path)))["prediction"]["activation"] == "logits"
    assert any("guessed" in m and "'logits'" in m for m in result.messages), result.messages
    # torch.softmax in forward (no module): guessed from the graph's Softmax node
    result = texp.export(softmax3_net(), x, tmp_path / "b.onnx", exporter="torchscript")
    assert result.metadata["prediction"]["activation"] == "softmax"
    # an explicit argument is never corrected: it is refused
    with pytest.raises(ActivationError, match="activation='logits'") as err:
        texp.export(logits_net(), x, tmp_path / "c.onnx", exporter="torchscript",
                    prediction_activation="sigmoid")
    assert err.value.suggested == "logits"
    assert not (tmp_path / "c.onnx").exists()


# ------------------------------------------------------------------ ONNX from anywhere


def test_onnx_softmax_declared_on_channels_not_summing_to_one(runner, tmp_path):
    src = models.save(models.unet(batch="N", size=16, head="sigmoid", n_classes=2), tmp_path / "src.onnx")
    out = tmp_path / "named.onnx"
    msg = _error_line(runner.invoke(cli, ["export", "onnx", str(src), "-o", str(out),
                                          "--activation", "softmax"]))
    assert "--activation softmax" in msg and "2 channels" in msg
    assert "--activation sigmoid" in msg and "--activation logits" in msg
    low, high = _range_in(msg)
    assert low < 1 - 1e-3 or high > 1 + 1e-3
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src.onnx"]


def test_onnx_softmax_declared_on_logits_suggests_logits(runner, tmp_path):
    src = models.save(models.unet(batch="N", size=16, head="logits", n_classes=3), tmp_path / "src.onnx")
    msg = _error_line(runner.invoke(cli, ["export", "onnx", str(src), "-o", str(tmp_path / "o.onnx"),
                                          "--activation", "softmax"]))
    assert "values range from" in msg and "--activation logits" in msg
    # the right declaration passes, and so do the guesses
    result = runner.invoke(cli, ["export", "onnx", str(src), "-o", str(tmp_path / "o.onnx"),
                                 "--activation", "logits"])
    assert result.exit_code == 0, result.output
    soft = models.save(models.unet(batch="N", size=16, head="softmax", n_classes=3), tmp_path / "soft.onnx")
    assert expose(soft, tmp_path / "s.onnx").metadata["prediction"]["activation"] == "softmax"
    assert expose(soft, tmp_path / "s2.onnx", activation="sigmoid").metadata["prediction"]["activation"] == "sigmoid"


def test_onnx_activation_from_a_wrong_model_card_is_refused(tmp_path):
    proto = models.unet(batch="N", size=16, head="logits", n_classes=1)
    write_metadata(proto, models.unet_metadata(head="sigmoid", size=16, out_name="logits"))
    src = models.save(proto, tmp_path / "carded.onnx")
    with pytest.raises(ActivationError, match="model card.*activation='logits'"):
        expose(src, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
    # the argument overrides the card
    assert expose(src, tmp_path / "o.onnx", activation="logits").metadata["prediction"]["activation"] == "logits"


def test_onnx_guess_looks_through_a_final_transpose(tmp_path):
    """tf2onnx-style channels-last model: Softmax → Transpose; guessed softmax, summed over C."""
    src = models.save(models.unet(batch="N", size=16, layout="NHWC", head="softmax", n_classes=3),
                      tmp_path / "t.onnx")
    result = expose(src, tmp_path / "o.onnx")
    pred = result.metadata["prediction"]
    assert (pred["activation"], pred["layout"]) == ("softmax", "NHWC")
    assert not result.messages
    with pytest.raises(ActivationError, match="3 channels"):  # 3 channels, not 16 rows
        expose(models.save(models.unet(batch="N", size=16, layout="NHWC", head="sigmoid", n_classes=3),
                           tmp_path / "t2.onnx"), tmp_path / "o2.onnx", activation="softmax")


# ------------------------------------------------------------------ the shared step


def _card(activation, layout="NCHW", output="y"):
    from exporters._common import build_metadata

    return build_metadata(framework="onnx", source="test", input_name="x", input_layout=layout,
                          input_size=None, prediction=output, activation=activation)


def test_verify_activation_given_guessed_and_skipped():
    from exporters._common import verify_activation

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(1, 3, 4, 4)).astype(np.float32)
    soft = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    proto = onnx.ModelProto()
    # guessed logits, but every position's channels sum to 1: recorded softmax, card rewritten
    card, messages = _card("logits"), []
    verify_activation(proto, card, soft, given="guessed", path="m.onnx", messages=messages)
    assert card["prediction"]["activation"] == "softmax" and len(messages) == 1
    assert read_metadata(proto)["prediction"]["activation"] == "softmax"
    # declared logits on softmax values: kept, with a warning naming the fix
    card, messages = _card("logits"), []
    verify_activation(proto, card, soft, given="argument", path="m.onnx", messages=messages)
    assert card["prediction"]["activation"] == "logits"
    assert len(messages) == 1 and "activation='softmax'" in messages[0]
    # guessed softmax on probabilities that do not sum to 1: corrected to sigmoid
    card, messages = _card("softmax"), []
    verify_activation(proto, card, 1 / (1 + np.exp(-logits)), given="guessed", path="m.onnx",
                      messages=messages)
    assert card["prediction"]["activation"] == "sigmoid" and "channel sums" in messages[0]
    # the card's own activation is a declaration: refused, saying where it came from
    with pytest.raises(ActivationError, match="model card.*'m.onnx' not written"):
        verify_activation(proto, _card("sigmoid"), logits, given="card", path="m.onnx", messages=[])
    # a prediction the layout cannot describe (a class vector) is left alone
    messages = []
    verify_activation(proto, _card("sigmoid"), rng.normal(size=(1, 5)), given="argument",
                      path="m.onnx", messages=messages)
    assert messages == []


# ------------------------------------------------------------------ TensorFlow (one test: slow import)


def test_keras_sigmoid_declared_on_a_linear_head_fails(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    keras = pytest.importorskip("keras")
    from exporters import tensorflow as tfexp

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 1), name="img")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="enc")(inp)
    out = keras.layers.Conv2D(1, 1, activation="linear", name="head",
                              kernel_initializer=keras.initializers.Constant(3.0))(h)
    model = keras.Model(inp, out)
    target = tmp_path / "k.onnx"
    with pytest.raises(ActivationError, match="activation='logits'") as err:
        tfexp.export(model, target, prediction_activation="sigmoid",
                     check_input=np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32))
    assert err.value.declared == "sigmoid" and "'head'" in str(err.value)
    assert not target.exists()
