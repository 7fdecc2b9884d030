"""engine.scores (Numba kernels) against the literal NumPy twin in tests/naive.py."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.scores import ProtoSegResult, SAScores, dice, protoseg, sa_scores
from engine.status import Status
from tests import naive

SETTINGS = settings(max_examples=20, deadline=None)
TWIN_STATUS = {
    "ok": Status.OK,
    "empty_mask": Status.EMPTY_MASK,
    "empty_foreground": Status.EMPTY_FOREGROUND,
    "empty_background": Status.EMPTY_BACKGROUND,
}


@st.composite
def cases(draw: st.DrawFn) -> dict:
    """Random inputs: rank, odd ratios up and down, layouts, dtypes, soft/hard guides, masks."""
    nd = draw(st.integers(1, 3))
    hi_src, hi_dst = (7, 9) if nd < 3 else (4, 5)
    src = tuple(draw(st.lists(st.integers(1, hi_src), min_size=nd, max_size=nd)))
    dst = tuple(draw(st.lists(st.integers(1, hi_dst), min_size=nd, max_size=nd)))
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    f = rng.normal(size=(B, C, *src)) * draw(st.sampled_from([1.0, 10.0]))
    if draw(st.booleans()):  # a constant channel
        f[:, 0] = 0.5
    f = f.astype(dtype)
    guide_kind = draw(st.sampled_from(["soft", "hard", "bool"]))
    g = rng.random((B, *dst))
    if guide_kind != "soft":
        g = g > 0.5 if guide_kind == "bool" else (g > 0.5).astype(np.float32)
    mask = None
    if draw(st.booleans()):
        mask = (rng.random((B, *dst)) > 0.3).astype(np.float64)
    ref = rng.random((B, *dst)) > 0.5
    layout = draw(st.sampled_from(["channels_first", "channels_last"]))
    # shapes where the other layout would match the grid exactly are refused on purpose
    other = (C, *src[:-1]) if layout == "channels_first" else (*src[1:], C)
    assume(other != dst)
    return {
        "f": f, "g": g, "mask": mask, "ref": ref, "src": src, "dst": dst,
        "layout": layout,
        "strided": draw(st.booleans()),  # a non-contiguous view: the non-fused kernels
        "resize": draw(st.sampled_from(["upsample", "upsample", "downsample"])),
    }


def _layout(f: np.ndarray, layout: str, strided: bool = False) -> np.ndarray:
    """The features in ``layout``; with ``strided`` a non-contiguous view of the same values.

    C-contiguous channels-first features take the fused kernels, everything else the general
    ones, so both meet the twin. The view takes every other element along the last axis longer
    than 1 (a step along a size-1 axis changes nothing). An array of one element is contiguous
    whatever its strides, so it stays as it is: the engine can only take the fused path for it.
    """
    if layout == "channels_last":
        f = np.moveaxis(f, 1, -1)
    out = np.ascontiguousarray(f)
    long_axes = [k for k, n in enumerate(out.shape) if n > 1]
    if strided and long_axes:
        k = long_axes[-1]
        every_other = (slice(None),) * k + (slice(None, None, 2),)
        big = np.empty(out.shape[:k] + (2 * out.shape[k],) + out.shape[k + 1:], dtype=out.dtype)
        big[every_other] = out
        out = big[every_other]
        assert not out.flags.c_contiguous
    return out


def _twin_inputs(case: dict, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Per-sample features, guide, mask and reference on the grid where the twin compares."""
    f = case["f"][b].astype(np.float64)
    g = np.asarray(case["g"][b], dtype=np.float64)
    m = None if case["mask"] is None else case["mask"][b]
    y = case["ref"][b]
    if case["resize"] == "upsample":
        return naive.resize_linear(f, case["dst"]), g, m, y
    src = case["src"]
    if src == case["dst"]:
        return f, g, m, y
    g = naive.resize_area(g, src)
    m = None if m is None else naive.resize_area(m, src)
    y = naive.resize_area(y.astype(np.float64), src) >= 0.5 - 1e-12
    return f, g, m, y


def _near_ties(margin: np.ndarray, twin: dict) -> np.ndarray:
    scale = max(1.0, float(np.max(np.abs(twin["d_plus"]))), float(np.max(np.abs(twin["d_minus"]))))
    return np.abs(margin) <= 1e-7 * scale


def _check_counts(res: SAScores, idx: tuple, twin: dict, near: np.ndarray, y: np.ndarray) -> None:
    n_near = int(near.sum())
    for name in ("tp", "fp", "fn"):
        assert abs(int(getattr(res, name)[idx]) - twin[name]) <= n_near, (name, idx)
    if n_near == 0:
        expected = twin["score"]
        if np.isnan(expected):
            assert np.isnan(res.score[idx]) and res.status[idx] == Status.EMPTY_DICE
        else:
            assert res.score[idx] == pytest.approx(expected, abs=1e-12)
            assert res.status[idx] == Status.OK


@SETTINGS
@given(cases())
def test_protoseg_matches_twin(case: dict) -> None:
    res = protoseg(_layout(case["f"], case["layout"], case["strided"]), case["g"], mask=case["mask"],
                   resize=case["resize"], layout=case["layout"])
    assert isinstance(res, ProtoSegResult)
    grid = case["dst"] if case["resize"] == "upsample" else case["src"]
    assert res.binary.shape == (len(case["f"]), *grid) and res.binary.dtype == np.bool_
    assert res.probability.dtype == np.float32
    for b in range(len(case["f"])):
        f, g, m, _ = _twin_inputs(case, b)
        twin = naive.protoseg_one(f, g, m)
        assert res.status[b] == TWIN_STATUS[twin["status"]]
        if twin["status"] != "ok":
            assert np.isnan(res.foreground[b]).all() and not res.binary[b].any()
            continue
        np.testing.assert_allclose(res.foreground[b], twin["P"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(res.background[b], twin["N"], rtol=1e-9, atol=1e-9)
        near = _near_ties(twin["margin"], twin)
        np.testing.assert_array_equal(res.binary[b][~near], twin["binary"][~near])
        np.testing.assert_allclose(res.probability[b], twin["probability"], atol=2e-6)


@SETTINGS
@given(cases())
def test_sa_scores_layer_and_unit_match_twin(case: dict) -> None:
    layer, unit = sa_scores(_layout(case["f"], case["layout"], case["strided"]), case["g"], case["ref"],
                            mask=case["mask"], level="both", resize=case["resize"], layout=case["layout"])
    B, C = case["f"].shape[:2]
    assert layer.score.shape == (B,) and unit.score.shape == (B, C)
    assert layer.level == "layer" and unit.level == "unit"
    for b in range(B):
        f, g, m, y = _twin_inputs(case, b)
        twin = naive.sa_one(f, g, y, m)
        if twin["status"] != "ok":
            assert layer.status[b] == TWIN_STATUS[twin["status"]] and np.isnan(layer.score[b])
            assert (unit.status[b] == TWIN_STATUS[twin["status"]]).all() and np.isnan(unit.score[b]).all()
            assert layer.tp[b] == 0 and layer.fp[b] == 0 and layer.fn[b] == int(np.sum(y))
            continue
        _check_counts(layer, (b,), twin, _near_ties(twin["margin"], twin), y)
        for c in range(C):
            tw = naive.sa_one(f[c:c + 1], g, y, m)
            _check_counts(unit, (b, c), tw, _near_ties(tw["margin"], tw), y)


@settings(max_examples=15, deadline=None)
@given(cases(), st.booleans())
def test_nonfinite_raise_and_skip(case: dict, use_inf: bool) -> None:
    f = case["f"].copy()
    B = len(f)
    bad = B - 1
    f[(bad, 0) + tuple(np.array(case["src"]) // 2)] = np.inf if use_inf else np.nan
    f = _layout(f, case["layout"])
    kw = dict(mask=case["mask"], resize=case["resize"], layout=case["layout"])
    with pytest.raises(ValueError, match=f"sample {bad}"):
        sa_scores(f, case["g"], case["ref"], **kw)
    with pytest.raises(ValueError, match=f"sample {bad}"):
        protoseg(f, case["g"], **kw)
    layer, unit = sa_scores(f, case["g"], case["ref"], level="both", nonfinite="skip", **kw)
    assert layer.status[bad] == Status.NONFINITE and np.isnan(layer.score[bad])
    assert (unit.status[bad] == Status.NONFINITE).all() and np.isnan(unit.score[bad]).all()
    res = protoseg(f, case["g"], nonfinite="skip", **kw)
    assert res.status[bad] == Status.NONFINITE and not res.binary[bad].any()
    # the other samples are unaffected
    clean = sa_scores(_layout(case["f"], case["layout"]), case["g"], case["ref"], **kw)
    np.testing.assert_array_equal(layer.score[:bad], clean.score[:bad])


def test_separable_data_gives_the_guide_and_dice_one() -> None:
    # two flat regions: the map must recover the guide exactly, whatever the resize
    g = np.zeros((1, 8, 8))
    g[0, :, 4:] = 1
    f = np.zeros((1, 3, 8, 8), np.float32)
    f[0, :, :, 4:] = [[[1.0]], [[2.0]], [[-1.0]]]
    res = protoseg(f, g)
    np.testing.assert_array_equal(res.binary, g > 0)
    np.testing.assert_allclose(res.foreground[0], [1.0, 2.0, -1.0])
    np.testing.assert_allclose(res.background[0], 0.0)
    s = sa_scores(f, g, g > 0)
    assert s.score.tolist() == [1.0] and s.tp.tolist() == [32] and s.fp.tolist() == [0]
    # the twin too, and for a single channel equal to the guide itself
    assert naive.sa_one(f[0], g[0], g[0] > 0)["score"] == 1.0
    assert naive.sa_one(g, g[0], g[0] > 0)["score"] == 1.0


def test_upsampled_map_equals_materialised_torch_reference() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    f = rng.normal(size=(2, 3, 23, 28)).astype(np.float32)
    yy, xx = np.mgrid[:181, :217]
    g = np.stack([((yy - 90) ** 2 + (xx - 100) ** 2 < 60**2)] * 2).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(f).double(), size=(181, 217), mode="bilinear",
                                         align_corners=False).numpy()
    res = protoseg(f, g)
    s = sa_scores(f, g, g > 0, level="both")
    for b in range(2):
        twin = naive.sa_one(up[b], g[b], g[b] > 0)
        near = _near_ties(twin["margin"], twin)
        np.testing.assert_array_equal(res.binary[b][~near], twin["binary"][~near])
        if not near.any():
            assert s[0].score[b] == pytest.approx(twin["score"], abs=1e-12)
        for c in range(3):
            tw = naive.sa_one(up[b, c:c + 1], g[b], g[b] > 0)
            if not _near_ties(tw["margin"], tw).any():
                assert s[1].score[b, c] == pytest.approx(tw["score"], abs=1e-12)


def test_3d_odd_ratio_matches_twin() -> None:
    rng = np.random.default_rng(6)
    f = rng.normal(size=(1, 2, 3, 4, 5))
    g = rng.random((1, 7, 6, 9))
    y = g > 0.4
    s = sa_scores(f, g, y, level="both")
    fu = naive.resize_linear(f[0], (7, 6, 9))
    twin = naive.sa_one(fu, g[0], y[0])
    assert not _near_ties(twin["margin"], twin).any()
    assert s[0].score[0] == pytest.approx(twin["score"], abs=1e-12)


def test_status_codes_for_undefined_prototypes() -> None:
    f = np.random.default_rng(1).normal(size=(4, 2, 6, 6))
    g = np.full((4, 6, 6), 0.5)
    g[0] = 0.0  # no foreground
    g[1] = 1.0  # no background
    mask = np.ones((4, 6, 6))
    mask[2] = 0.0  # empty mask
    ref = np.ones((4, 6, 6), bool)
    s = sa_scores(f, g, ref, mask=mask)
    assert s.status.tolist() == [Status.EMPTY_FOREGROUND, Status.EMPTY_BACKGROUND, Status.EMPTY_MASK, Status.OK]
    assert np.isnan(s.score[:3]).all() and np.isfinite(s.score[3])
    assert s.fn[:3].tolist() == [36, 36, 36] and s.tp[:3].tolist() == [0, 0, 0]
    r = protoseg(f, g, mask=mask)
    assert r.status.tolist() == s.status.tolist()
    assert np.isnan(r.probability[:3]).all() and not r.binary[:3].any()
    twins = [naive.sa_one(f[b], g[b], ref[b], mask[b]) for b in range(4)]
    assert [TWIN_STATUS[t["status"]] for t in twins] == s.status.tolist()
    assert np.isnan([t["score"] for t in twins[:3]]).all()  # SPEC: undefined prototype -> NaN


@pytest.mark.parametrize("empty,expected", [("nan", np.nan), ("one", 1.0)])
def test_empty_dice(empty: str, expected: float) -> None:
    # a constant feature gives P == N: map all background; with an empty reference Dice is 0/0
    f = np.ones((1, 1, 5, 5))
    g = np.zeros((1, 5, 5))
    g[0, 2] = 1.0
    s = sa_scores(f, g, np.zeros((1, 5, 5), bool), empty=empty, level="both")
    for level in s:
        assert level.status.ravel().tolist() == [Status.EMPTY_DICE]
        np.testing.assert_equal(level.score.ravel(), [expected])


def test_level_both_equals_separate_calls_and_dice_of_map() -> None:
    rng = np.random.default_rng(2)
    f = rng.normal(size=(3, 5, 7, 9)).astype(np.float32)
    g = rng.random((3, 13, 11))
    y = rng.random((3, 13, 11)) > 0.5
    layer, unit = sa_scores(f, g, y, level="both")
    only_layer = sa_scores(f, g, y)
    only_unit = sa_scores(f, g, y, level="unit")
    for a, b in ((layer, only_layer), (unit, only_unit)):
        for name in ("score", "status", "tp", "fp", "fn"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_allclose(layer.score, dice(protoseg(f, g).binary, y, batch=True))


def test_strided_and_channels_last_views_equal_contiguous() -> None:
    rng = np.random.default_rng(3)
    big = rng.normal(size=(2, 6, 10, 14)).astype(np.float32)
    f = big[:, ::2, :, ::2]  # non-contiguous (2, 3, 10, 7)
    g = rng.random((2, 17, 9))
    y = g > 0.5
    ref_layer, ref_unit = sa_scores(np.ascontiguousarray(f), g, y, level="both")
    for feats, layout in ((f, "channels_first"), (np.moveaxis(f, 1, -1), "channels_last")):
        layer, unit = sa_scores(feats, g, y, level="both", layout=layout)
        np.testing.assert_array_equal(layer.tp, ref_layer.tp)
        np.testing.assert_array_equal(unit.tp, ref_unit.tp)
    # guide with an explicit channel axis
    np.testing.assert_array_equal(sa_scores(f, g[:, None], y[:, None]).tp, ref_layer.tp)


def test_downsample_maps_live_on_feature_grid() -> None:
    rng = np.random.default_rng(4)
    f = rng.normal(size=(1, 2, 4, 6))
    g = np.zeros((1, 8, 12))
    g[0, :4] = 1.0
    res = protoseg(f, g, resize="downsample")
    assert res.binary.shape == (1, 4, 6)
    s = sa_scores(f, g, g > 0, resize="downsample")
    twin = naive.sa_one(f[0], naive.resize_area(g[0], (4, 6)), naive.resize_area(g[0], (4, 6)) >= 0.5)
    assert s.score[0] == pytest.approx(twin["score"], abs=1e-12)


def test_features_finer_than_guide_are_resized_down() -> None:
    rng = np.random.default_rng(8)
    f = rng.normal(size=(1, 3, 20, 16))
    g = rng.random((1, 7, 5))
    y = g > 0.5
    s = sa_scores(f, g, y)
    twin = naive.sa_one(naive.resize_linear(f[0], (7, 5)), g[0], y[0])
    assert not _near_ties(twin["margin"], twin).any()
    assert s.score[0] == pytest.approx(twin["score"], abs=1e-12)


def test_dice_function() -> None:
    assert dice([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(2 / 3)
    assert np.isnan(dice([0, 0], [0, 0]))
    assert dice([0, 0], [0, 0], empty="one") == 1.0
    out = dice(np.array([[1, 0], [0, 0]], bool), np.array([[1, 0], [0, 0]], bool), batch=True)
    assert out[0] == 1.0 and np.isnan(out[1])
    a = np.random.default_rng(0).random((3, 20)) > 0.5
    b = np.random.default_rng(1).random((3, 20)) > 0.5
    np.testing.assert_allclose(dice(a, b, batch=True), [naive.dice(x, y) for x, y in zip(a, b)])


def test_float16_features_are_accepted() -> None:
    f = np.random.default_rng(0).normal(size=(1, 2, 6)).astype(np.float16)
    g = (np.arange(6) > 2)[None].astype(float)
    s32 = sa_scores(f.astype(np.float32), g, g > 0)
    s16 = sa_scores(f, g, g > 0)
    np.testing.assert_array_equal(s16.tp, s32.tp)


@pytest.mark.parametrize("src,soft,with_mask", [
    ((256, 256), False, False),  # identity grid, guide read directly
    ((256, 256), True, True),    # identity grid with a mask
    ((224, 232), False, False),  # resized: Rᵀ(1-g) = Rᵀ1 - Rᵀg
    ((224, 232), True, True),    # resized with a mask: both adjoints accumulated
])
def test_fused_kernels_over_several_channel_blocks_match_twin(src: tuple, soft: bool, with_mask: bool) -> None:
    # planes of ~200-256 KiB put 10 channels in three blocks (4 + 4 + 2): prototypes, z and
    # the threshold are accumulated block by block; compare with the twin and with the
    # general (strided) kernels
    rng = np.random.default_rng(11)
    C, dst = 10, (256, 256)
    yy, xx = np.mgrid[: src[0], : src[1]]
    blob = (((yy - src[0] / 2) / 60.0) ** 2 + ((xx - src[1] / 2) / 80.0) ** 2 < 1).astype(np.float32)
    f = rng.normal(size=(1, C, *src)).astype(np.float32) + rng.normal(size=(1, C, 1, 1)).astype(np.float32) * blob
    gy, gx = np.mgrid[: dst[0], : dst[1]]
    g = (((gy - 128) / 70.0) ** 2 + ((gx - 128) / 90.0) ** 2 < 1).astype(np.float64)
    if soft:
        g = np.clip(g * 0.9 + 0.05 * rng.random(dst), 0, 1)
    g = g[None]
    mask = (rng.random((1, *dst)) > 0.2).astype(np.float64) if with_mask else None
    y = g > 0.5
    layer, unit = sa_scores(f, g, y, mask=mask, level="both")
    res = protoseg(f, g, mask=mask)
    fu = f[0].astype(np.float64) if src == dst else naive.resize_linear(f[0].astype(np.float64), dst)
    m0 = None if mask is None else mask[0]
    twin = naive.sa_one(fu, g[0], y[0], m0)
    np.testing.assert_allclose(res.foreground[0], twin["P"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(res.background[0], twin["N"], rtol=1e-9, atol=1e-9)
    _check_counts(layer, (0,), twin, _near_ties(twin["margin"], twin), y[0])
    for c in (0, 3, 4, 7, 8, 9):  # first and last channel of each block
        tw = naive.sa_one(fu[c:c + 1], g[0], y[0], m0)
        _check_counts(unit, (0, c), tw, _near_ties(tw["margin"], tw), y[0])
    strided = np.repeat(f, 2, axis=1)[:, ::2]
    other = sa_scores(strided, g, y, mask=mask)
    assert abs(int(other.tp[0]) - int(layer.tp[0])) <= int(_near_ties(twin["margin"], twin).sum())


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("shape,dst", [((5, 6, 7), (5, 6, 7)), ((3, 4, 5), (7, 9, 11)), ((9, 8), (9, 8)), ((6, 5), (17, 13))])
@pytest.mark.parametrize("with_mask", [False, True])
def test_channel_split_for_small_batches_matches_twin(monkeypatch: pytest.MonkeyPatch, parts: int, shape: tuple,
                                                      dst: tuple, with_mask: bool) -> None:
    # with fewer samples than threads each sample's channels go in parallel parts whose
    # shares of z are added before counting; force the split whatever this machine's threads
    import engine.scores as scores_module

    monkeypatch.setattr(scores_module, "_split_parts", lambda batch, channels: parts)
    rng = np.random.default_rng(parts + len(shape))
    C = 7
    f = rng.normal(size=(1, C, *shape)).astype(np.float32)
    f[0, 2] += 3.0 * (rng.random(shape) > 0.5)
    g = rng.random((1, *dst))
    mask = (rng.random((1, *dst)) > 0.3).astype(np.float64) if with_mask else None
    y = g > 0.5
    layer, unit = sa_scores(f, g, y, mask=mask, level="both")
    fu = f[0].astype(np.float64) if shape == dst else naive.resize_linear(f[0].astype(np.float64), dst)
    twin = naive.sa_one(fu, g[0], y[0], None if mask is None else mask[0])
    assert layer.status[0] == Status.OK
    _check_counts(layer, (0,), twin, _near_ties(twin["margin"], twin), y[0])
    monkeypatch.setattr(scores_module, "_split_parts", lambda batch, channels: 1)
    np.testing.assert_allclose(sa_scores(f, g, y, mask=mask, level="both")[1].score, unit.score)


# --------------------------------------------------------------------------- channels-last kernels
def _volume_case(shape: tuple, dst: tuple, C: int, seed: int, with_mask: bool) -> tuple:
    """One sample whose first channel separates a blob, spanning several position tiles."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = (sum(g**2 for g in grids) < 0.5).astype(np.float32)
    f = rng.normal(size=(1, C, *shape)).astype(np.float32)
    f[0, 0] += 2.0 * blob
    tg = np.meshgrid(*[np.linspace(-1, 1, n) for n in dst], indexing="ij")
    g = (sum(t**2 for t in tg) < 0.5).astype(np.float64)[None]
    mask = (rng.random((1, *dst)) > 0.2).astype(np.float64) if with_mask else None
    return f, g, mask, g > 0.5


@pytest.mark.parametrize("shape,dst", [((12, 14, 16), (12, 14, 16)), ((9, 10, 11), (17, 21, 19)),
                                       ((40, 60), (40, 60)), ((30, 45), (61, 90))])
@pytest.mark.parametrize("with_mask", [False, True])
def test_channels_last_kernels_match_twin(monkeypatch: pytest.MonkeyPatch, shape: tuple, dst: tuple,
                                          with_mask: bool) -> None:
    # NDHWC / NHWC features (and a channels-first view of such memory, as the pipeline passes
    # tf2onnx tensors) take engine._kernels.channels_last: several position tiles and target
    # row blocks per sample; compare with the twin
    import engine.scores as scores_module

    calls = []
    real = scores_module._cl.prototypes
    monkeypatch.setattr(scores_module._cl, "prototypes", lambda *a: (calls.append(1), real(*a))[1])
    C = 6
    f, g, mask, y = _volume_case(shape, dst, C, len(shape) + int(with_mask), with_mask)
    fl = np.ascontiguousarray(np.moveaxis(f, 1, -1))
    layer, unit = sa_scores(fl, g, y, mask=mask, level="both", layout="channels_last")
    res = protoseg(fl, g, mask=mask, layout="channels_last")
    view = sa_scores(np.moveaxis(fl, -1, 1), g, y, mask=mask, level="both")  # channels-first view
    assert len(calls) == 3
    for a, b in ((layer, view[0]), (unit, view[1])):
        np.testing.assert_array_equal(a.tp, b.tp)
        np.testing.assert_array_equal(a.fp, b.fp)
    fu = f[0].astype(np.float64) if shape == dst else naive.resize_linear(f[0].astype(np.float64), dst)
    m0 = None if mask is None else mask[0]
    twin = naive.sa_one(fu, g[0], y[0], m0)
    assert res.status[0] == Status.OK == layer.status[0]
    np.testing.assert_allclose(res.foreground[0], twin["P"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(res.background[0], twin["N"], rtol=1e-9, atol=1e-9)
    near = _near_ties(twin["margin"], twin)
    np.testing.assert_array_equal(res.binary[0][~near], twin["binary"][~near])
    np.testing.assert_allclose(res.probability[0], twin["probability"], atol=2e-6)
    _check_counts(layer, (0,), twin, near, y[0])
    for c in range(C):
        tw = naive.sa_one(fu[c:c + 1], g[0], y[0], m0)
        _check_counts(unit, (0, c), tw, _near_ties(tw["margin"], tw), y[0])


def test_channels_last_undefined_and_nonfinite_samples() -> None:
    rng = np.random.default_rng(21)
    f = rng.normal(size=(3, 9, 10, 11, 4)).astype(np.float32)
    g = rng.random((3, 9, 10, 11))
    g[0] = 0.0  # empty foreground
    f[2, 4, 5, 6, 1] = np.nan
    y = rng.random((3, 9, 10, 11)) > 0.5
    layer, unit = sa_scores(f, g, y, level="both", layout="channels_last", nonfinite="skip")
    assert layer.status.tolist() == [Status.EMPTY_FOREGROUND, Status.OK, Status.NONFINITE]
    assert layer.fn[0] == y[0].sum() and layer.tp[0] == 0 and (unit.status[2] == Status.NONFINITE).all()
    res = protoseg(f, g, layout="channels_last", nonfinite="skip")
    assert not res.binary[0].any() and np.isnan(res.probability[2]).all()
    with pytest.raises(ValueError, match="sample 2"):
        sa_scores(f, g, y, layout="channels_last")
    bad = g.copy()
    bad[1, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sa_scores(f, bad, y, layout="channels_last")


@pytest.mark.parametrize("layout,batch", [("channels_last", 1), ("channels_last", 3), ("channels_first", 1),
                                          ("channels_first", 3), ("view", 1)])
def test_scores_do_not_depend_on_the_thread_count(layout: str, batch: int) -> None:
    # issue 15: one volume is split over the threads with a fixed reduction order, so 1 and 2
    # Numba threads give identical prototypes, maps and counts
    import numba

    rng = np.random.default_rng(31)
    shape, dst, C = (10, 12, 14), (19, 23, 27), 12
    f = rng.normal(size=(batch, C, *shape)).astype(np.float32)
    f[:, 0] += 1.5 * (rng.random((batch, *shape)) > 0.5)
    g = rng.random((batch, *dst))
    y = g > 0.5
    if layout == "channels_last":
        feats, kw = np.ascontiguousarray(np.moveaxis(f, 1, -1)), {"layout": "channels_last"}
    elif layout == "view":
        feats, kw = np.moveaxis(np.ascontiguousarray(np.moveaxis(f, 1, -1)), -1, 1), {}
    else:
        feats, kw = f, {}
    before = numba.get_num_threads()
    out = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            out.append((sa_scores(feats, g, y, level="both", **kw), protoseg(feats, g, **kw)))
    finally:
        numba.set_num_threads(before)
    (one, m1), (two, m2) = out
    for a, b in zip(one, two):
        for name in ("score", "status", "tp", "fp", "fn"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("binary", "probability", "foreground", "background", "status"):
        np.testing.assert_array_equal(getattr(m1, name), getattr(m2, name))


@pytest.mark.parametrize("ndim", [2, 3])
def test_extent_scores_the_crop_of_the_padded_grid(ndim):
    # an input padded from S to P at the end of each axis: the features cover P; the map on
    # the guide's grid S must be the crop of the map computed on P (the twin: resize the
    # features to P with the engine's linear resize, crop to S, score on the identity grid)
    from engine.resize import resize_linear

    rng = np.random.default_rng(7 + ndim)
    S = (13, 10, 7)[:ndim]
    P = (16, 12, 8)[:ndim]
    src = (4, 3, 2)[:ndim]  # the layer's grid: P / 4
    f = rng.normal(size=(2, 5) + src)
    g = (rng.random((2,) + S) > 0.6).astype(np.float64)
    y = rng.random((2,) + S) > 0.5
    crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in S)
    twin_f = np.ascontiguousarray(resize_linear(f, P)[crop])
    for level in ("layer", "unit"):
        got = sa_scores(f, g, y, level=level, extent=P)
        want = sa_scores(twin_f, g, y, level=level)
        np.testing.assert_array_equal(got.tp, want.tp)
        np.testing.assert_array_equal(got.fp, want.fp)
        np.testing.assert_array_equal(got.fn, want.fn)
        last = np.ascontiguousarray(np.moveaxis(f, 1, -1))  # the channels-last kernels too
        got = sa_scores(last, g, y, level=level, extent=P, layout="channels_last")
        np.testing.assert_array_equal(got.tp, want.tp)
        np.testing.assert_array_equal(got.fp, want.fp)
    got_map = protoseg(f, g, extent=P)
    want_map = protoseg(twin_f, g)
    np.testing.assert_array_equal(got_map.binary, want_map.binary)
    # and differs from treating the features as covering S (what padding without extent did)
    assert not np.array_equal(protoseg(f, g).probability, got_map.probability)
    with pytest.raises(ValueError, match="at least the guide's grid"):
        sa_scores(f, g, y, extent=tuple(s - 1 for s in S))
    with pytest.raises(ValueError, match="upsample"):
        sa_scores(f, g, y, extent=P, resize="downsample")
