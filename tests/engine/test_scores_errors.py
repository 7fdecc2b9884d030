"""Bad input to engine.scores: one clear ValueError/TypeError per case (issue 2, item 6)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.scores import dice, protoseg, sa_scores

RNG = np.random.default_rng(0)
F = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
G = RNG.random((2, 8, 10))
Y = G > 0.5


def test_wrong_rank_features() -> None:
    with pytest.raises(ValueError, match=r"features must have 3, 4 or 5 axes.*received shape \(3, 4\)"):
        sa_scores(np.zeros((3, 4), np.float32), G, Y)


def test_wrong_rank_guide() -> None:
    with pytest.raises(ValueError, match=r"guide must have shape \(B, \*spatial\).*received shape \(8, 10\)"):
        sa_scores(F, G[0], Y)


def test_batch_sizes_disagree() -> None:
    with pytest.raises(ValueError, match="reference has batch size 1 but features have 2"):
        sa_scores(F, G, Y[:1])


def test_spatial_sizes_disagree() -> None:
    with pytest.raises(ValueError, match=r"mask has spatial shape \(8, 9\) but the guide has \(8, 10\)"):
        sa_scores(F, G, Y, mask=np.ones((2, 8, 9)))


def test_guide_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"guide has values in \[-0.5, 2\]; expected values within \[0, 1\]"):
        protoseg(F, np.where(G > 0.5, 2.0, -0.5))


def test_guide_with_nan() -> None:
    g = G.copy()
    g[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="guide contains NaN or Inf"):
        protoseg(F, g)


def test_nan_in_features_names_the_sample() -> None:
    f = F.copy()
    f[1, 2, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"features contain NaN or Inf in sample 1.*nonfinite='skip'"):
        sa_scores(f, G, Y)


def test_inf_in_features_names_the_sample() -> None:
    f = F.copy()
    f[0, 0, 3, 4] = -np.inf
    with pytest.raises(ValueError, match=r"features contain NaN or Inf in sample 0"):
        protoseg(f, G)


def test_empty_features() -> None:
    with pytest.raises(ValueError, match=r"features is empty \(shape \(2, 3, 0, 5\)\)"):
        sa_scores(np.zeros((2, 3, 0, 5), np.float32), G, Y)


def test_empty_guide() -> None:
    with pytest.raises(ValueError, match=r"guide is empty"):
        protoseg(F, np.zeros((2, 0, 10)))


def test_integer_features() -> None:
    with pytest.raises(TypeError, match=r"features must be float32 or float64; received dtype int64"):
        sa_scores(np.ones((2, 3, 4, 5), np.int64), G, Y)


def test_string_features() -> None:
    with pytest.raises(TypeError, match=r"features must be a numeric array; received dtype <U1"):
        protoseg([["a"]], G)


def test_zero_channels() -> None:
    with pytest.raises(ValueError, match=r"features have zero channels \(shape \(2, 0, 4, 5\)"):
        sa_scores(np.zeros((2, 0, 4, 5), np.float32), G, Y)


def test_layout_contradicting_shapes() -> None:
    nhwc = RNG.normal(size=(2, 8, 10, 64)).astype(np.float32)
    with pytest.raises(ValueError, match=r"layout='channels_first' contradicts the shapes.*pass layout='channels_last'"):
        sa_scores(nhwc, G, Y)


def test_bad_layout_value() -> None:
    with pytest.raises(ValueError, match=r"layout='NCHW' is not valid; expected one of 'channels_first', 'channels_last'"):
        sa_scores(F, G, Y, layout="NCHW")


def test_bad_level_value() -> None:
    with pytest.raises(ValueError, match=r"level='units' is not valid.*did you mean 'unit'"):
        sa_scores(F, G, Y, level="units")


def test_bad_resize_value() -> None:
    with pytest.raises(ValueError, match=r"resize='bilinear' is not valid; expected one of 'upsample', 'downsample'"):
        protoseg(F, G, resize="bilinear")


def test_bad_empty_value() -> None:
    with pytest.raises(ValueError, match=r"empty=0 is not valid; expected one of 'nan', 'one'"):
        sa_scores(F, G, Y, empty=0)  # type: ignore[arg-type]


def test_bad_nonfinite_value() -> None:
    with pytest.raises(ValueError, match=r"nonfinite='ignore' is not valid"):
        protoseg(F, G, nonfinite="ignore")


def test_reference_not_binary() -> None:
    with pytest.raises(ValueError, match=r"reference must be binary \(0/1 or bool\); received a value"):
        sa_scores(F, G, G)


def test_reference_missing() -> None:
    with pytest.raises(TypeError, match="reference is required; received None"):
        sa_scores(F, G, None)


def test_mask_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"mask has values in \[3, 3\]; expected values within \[0, 1\]"):
        protoseg(F, G, mask=np.full((2, 8, 10), 3.0))


def test_dice_shapes_disagree() -> None:
    with pytest.raises(ValueError, match=r"binary has shape \(3,\) but reference has \(4,\)"):
        dice([1, 0, 1], [1, 0, 1, 0])


def test_dice_not_binary() -> None:
    with pytest.raises(ValueError, match=r"binary must be binary"):
        dice([0.2, 1.0], [1, 0])


@pytest.mark.parametrize("call", ["sa_scores", "protoseg"])
@pytest.mark.parametrize("grid", ["identity", "resized"])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("what", ["guide", "mask"])
def test_one_bad_guide_or_mask_value_is_caught_on_every_path(call: str, grid: str, contiguous: bool, what: str) -> None:
    # the fused kernels (contiguous channels-first features) check [0, 1] while they read the
    # guide; the others before; either way a single bad value in the last sample is refused
    f = RNG.normal(size=(2, 3, 8, 10) if grid == "identity" else (2, 3, 4, 5)).astype(np.float32)
    if not contiguous:
        f = np.repeat(f, 2, axis=1)[:, ::2]
    g = (G > 0.5).astype(np.float32)
    m = np.ones((2, 8, 10))
    (g if what == "guide" else m)[1, 7, 9] = 1.5
    fn = sa_scores if call == "sa_scores" else protoseg
    args = (f, g, Y) if call == "sa_scores" else (f, g)
    with pytest.raises(ValueError, match=rf"{what} has values in \[\S+, 1.5\]; expected values within \[0, 1\]"):
        fn(*args, mask=m)
