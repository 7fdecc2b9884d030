"""engine.model.activation: what the prediction holds, checked on its values."""
from __future__ import annotations

import numpy as np
import pytest

from engine.errors import cli_messages
from engine.model.activation import (
    SUM_TOL,
    VALUE_TOL,
    ActivationError,
    channel_axis_of,
    check_activation,
    infer_activation,
)

RNG = np.random.default_rng(0)


def _softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


LOGITS = RNG.normal(scale=3.0, size=(2, 3, 8, 8)).astype(np.float32)


def test_infer_activation_tells_the_three_kinds_apart():
    assert infer_activation(LOGITS) == "logits"
    assert infer_activation(_softmax(LOGITS)) == "softmax"
    assert infer_activation(_sigmoid(LOGITS)) == "sigmoid"
    assert infer_activation(_sigmoid(LOGITS[:, :1])) == "sigmoid"  # one channel is never softmax
    assert infer_activation(_sigmoid(LOGITS[:, 0]), None) == "sigmoid"  # no channel axis
    # channels last: the layout (or the axis) decides which axis sums to 1
    nhwc = np.moveaxis(_softmax(LOGITS), 1, -1)
    assert infer_activation(nhwc, layout="NHWC") == "softmax"
    assert infer_activation(nhwc, -1) == "softmax"
    assert infer_activation(nhwc, layout="NCHW") == "sigmoid"
    # nothing finite: no evidence of probabilities
    assert infer_activation(np.full((1, 2, 2, 2), np.nan)) == "logits"
    assert infer_activation(np.zeros((0, 2, 4, 4))) == "logits"


def test_tolerance_edges_of_values():
    base = _sigmoid(LOGITS).astype(np.float64)
    inside = base.copy()
    inside[0, 0, 0, 0], inside[0, 0, 0, 1] = -VALUE_TOL, 1 + VALUE_TOL  # exactly on the edges
    check_activation(inside, "sigmoid")
    assert infer_activation(inside) == "sigmoid"
    for bad in (-2 * VALUE_TOL, 1 + 2 * VALUE_TOL):
        outside = base.copy()
        outside[1, 2, 3, 4] = bad
        assert infer_activation(outside) == "logits"
        with pytest.raises(ActivationError) as err:
            check_activation(outside, "sigmoid")
        assert err.value.suggested == "logits" and err.value.observed == "values"
    # looser tolerances are the caller's choice
    check_activation(outside, "sigmoid", value_tol=1e-2)


def test_tolerance_edges_of_channel_sums():
    p = RNG.uniform(0.1, 0.9, size=(2, 1, 8, 8))
    probs = np.concatenate([p, 1 - p], axis=1)
    near = probs.copy()
    near[:, 0] += 0.9 * SUM_TOL  # sums 1 + 0.9 tol: inside
    check_activation(near, "softmax")
    assert infer_activation(near) == "softmax"
    far = probs.copy()
    far[1, 0, 3, 3] -= 1.5 * SUM_TOL  # one position's sum 1 - 1.5 tol: outside
    with pytest.raises(ActivationError, match="activation='sigmoid'") as err:
        check_activation(far, "softmax")
    assert err.value.low == pytest.approx(1 - 1.5 * SUM_TOL) and err.value.high == pytest.approx(1)
    assert infer_activation(far) == "sigmoid"
    # float32 softmax over many channels stays within the tolerance
    many = _softmax(RNG.normal(scale=5.0, size=(2, 150, 16, 16)).astype(np.float32))
    check_activation(many, "softmax")


def test_sigmoid_or_softmax_declared_on_logits_names_the_range_and_the_fix():
    with pytest.raises(ActivationError) as err:
        check_activation(LOGITS, "sigmoid", where="prediction output 'out'")
    msg = str(err.value)
    lo, hi = float(LOGITS.min()), float(LOGITS.max())
    assert msg.startswith("prediction output 'out': activation='sigmoid'")
    assert f"{lo:.4g}" in msg and f"{hi:.4g}" in msg and "activation='logits'" in msg
    assert "\n" not in msg
    assert (err.value.declared, err.value.suggested) == ("sigmoid", "logits")
    assert err.value.low == pytest.approx(lo) and err.value.high == pytest.approx(hi)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ActivationError, match="activation='logits'"):
        check_activation(LOGITS, "softmax")


def test_messages_name_flags_inside_the_cli():
    with cli_messages():
        with pytest.raises(ActivationError) as err:
            check_activation(LOGITS, "softmax")
    msg = str(err.value)
    assert "--activation softmax" in msg and "--activation logits" in msg and "activation=" not in msg


def test_softmax_declared_on_independent_probabilities_suggests_sigmoid():
    with pytest.raises(ActivationError) as err:
        check_activation(_sigmoid(LOGITS), "softmax", where="p")
    assert err.value.suggested == "sigmoid" and err.value.observed == "channel sums"
    assert "3 channels" in str(err.value) and "activation='sigmoid'" in str(err.value)
    # one channel (with or without a channel axis) cannot hold a softmax over classes
    with pytest.raises(ActivationError, match="single channel"):
        check_activation(_sigmoid(LOGITS[:, :1]), "softmax")
    with pytest.raises(ActivationError, match="single channel"):
        check_activation(_sigmoid(LOGITS[:, 0]), "softmax", None)


def test_accepted_cases():
    check_activation(LOGITS, "logits")  # raw scores may be anything
    check_activation(_softmax(LOGITS), "logits")  # not refused: logits can take any value
    check_activation(_softmax(LOGITS), "softmax")
    check_activation(_softmax(LOGITS), "sigmoid")  # channels summing to 1 are fine for sigmoid
    check_activation(_sigmoid(LOGITS), "sigmoid")
    nhwc = np.moveaxis(_softmax(LOGITS), 1, -1)
    check_activation(nhwc, "softmax", layout="NHWC")
    with pytest.raises(ActivationError):
        check_activation(nhwc, "softmax", layout="NCHW")  # sums over the wrong axis


def test_nonfinite_values_are_ignored():
    probs = _softmax(LOGITS)
    probs[0, :, 1, 1] = np.nan
    probs[1, 0, 2, 2] = np.inf
    check_activation(probs, "softmax")
    check_activation(probs, "sigmoid")
    assert infer_activation(probs) == "softmax"
    check_activation(np.full((1, 2, 3, 3), np.nan, dtype=np.float32), "softmax")


def test_channel_axis_of_mirrors_the_engine():
    assert channel_axis_of("NCHW", 4) == 1
    assert channel_axis_of("NHWC", 4) == 3
    assert channel_axis_of("NDHWC", 5) == 4
    assert channel_axis_of("NCHW", 3) is None  # no channel axis: one channel
    assert channel_axis_of(None, 4) == 1 and channel_axis_of(None, 2) is None
    with pytest.raises(ValueError, match="rank 2"):
        channel_axis_of("NCHW", 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigmoid, softmax, logits"):
        check_activation(LOGITS, "relu")
    with pytest.raises(ValueError, match="out of range"):
        check_activation(LOGITS, "softmax", 4)
    with pytest.raises(TypeError, match="numeric"):
        check_activation(np.array(["a"]), "sigmoid")
