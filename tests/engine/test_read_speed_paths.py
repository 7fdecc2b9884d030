"""The faster read / preprocess / label paths of issue 15 against the code they replaced.

- ``.nii.gz`` files decompressed by ISA-L (``engine.datasets._read_nifti_gz``) give what
  ``nibabel.load`` gives (values, dtype, axes, affine, errors of corrupt files);
- ``_c_order`` gives ``np.ascontiguousarray``'s arrays;
- the fused minmax / meanstd of ``ModelCard.preprocess`` is bit-identical to the float64 code
  it replaced (kept here as ``_scale_old``), NaN, Inf, constant channels and -0.0 included;
- the label check's ``_labels_in`` gives ``np.unique``'s set.

"Before" is the same engine with the replaced helpers switched back (monkeypatch), so
everything else on the path is shared.
"""
from __future__ import annotations

import gzip
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import engine.datasets as datasets
import engine.run.batch as batch
from engine.datasets import open_dataset
from engine.model import card as card_module
from engine.model.card import ModelCard

nib = pytest.importorskip("nibabel")

ROOT = Path(__file__).resolve().parents[2]
COLIN27 = ROOT / "cli" / "data" / "colin27"
rng = np.random.default_rng(15)


def _old_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the dataset reader back to nibabel's gzip and NumPy's strided copy."""
    monkeypatch.setattr(datasets, "_read_nifti_gz", lambda *args, **kwargs: None)
    monkeypatch.setattr(datasets, "_c_order", lambda a, dtype: np.ascontiguousarray(a, dtype=dtype))


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.flags.c_contiguous == b.flags.c_contiguous
    assert a.tobytes() == b.tobytes()


def _same_case(a: datasets.Case, b: datasets.Case) -> None:
    assert (a.id, a.status, a.message, a.path, a.mask_path, a.file_orientation) == \
           (b.id, b.status, b.message, b.path, b.mask_path, b.file_orientation)
    _same_array(a.image, b.image)
    _same_array(a.mask, b.mask)
    _same_array(a.affine, b.affine)


# ------------------------------------------------------------------ reading

def test_colin27_reads_as_before(monkeypatch):
    pytest.importorskip("isal")
    new = open_dataset(COLIN27, spatial_ndim=3)[0]
    for reorient in (False, True):
        fresh = open_dataset(COLIN27, spatial_ndim=3, reorient=reorient)[0]
        with monkeypatch.context() as m:
            _old_read(m)
            old = open_dataset(COLIN27, spatial_ndim=3, reorient=reorient)[0]
        _same_case(fresh, old)
    assert new.image.flags.c_contiguous and new.mask.flags.c_contiguous
    assert new.image.dtype == np.float32 and new.mask.dtype == np.uint8


def test_the_isal_path_is_taken_for_nii_gz(monkeypatch, tmp_path):
    pytest.importorskip("isal")
    nib.save(nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4)),
             str(tmp_path / "a.nii.gz"))
    calls = []
    real = datasets._read_nifti_gz

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(datasets, "_read_nifti_gz", spy)
    case = open_dataset(tmp_path)[0]
    assert calls == [True] and case.ok
    assert case.image[0].tolist() == np.arange(24).reshape(2, 3, 4).tolist()


def _write(path: Path, arr: np.ndarray, *, nifti2: bool = False, slope: float | None = None,
           inter: float = 0.0, time_unit: str | None = None, intent: str | None = None,
           big_endian: bool = False) -> None:
    klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    affine = np.array([[-1.5, 0, 0, 10], [0, 1.2, 0, -3], [0, 0, 2.0, 4], [0, 0, 0, 1]])
    img = klass(arr, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    if time_unit is not None:
        img.header.set_xyzt_units("mm", time_unit)
    if intent is not None:
        img.header.set_intent(intent)
    if big_endian:
        img = klass(arr.astype(arr.dtype.newbyteorder(">")), affine,
                    img.header.as_byteswapped(">"))
    nib.save(img, str(path))


FILES = {
    "float32": dict(arr=rng.normal(size=(5, 6, 7)).astype(np.float32)),
    "int16-scaled": dict(arr=rng.integers(-300, 300, (5, 6, 7)).astype(np.int16), slope=0.5,
                         inter=-2.0),
    "uint8": dict(arr=rng.integers(0, 255, (5, 6, 7)).astype(np.uint8)),
    "float64-nan": dict(arr=np.where(rng.random((4, 5, 6)) < 0.1, np.nan,
                                     rng.normal(size=(4, 5, 6)))),
    "nifti2": dict(arr=rng.normal(size=(5, 6, 7)).astype(np.float32), nifti2=True),
    "big-endian": dict(arr=rng.integers(-9, 9, (5, 6, 7)).astype(np.int16), big_endian=True),
    "4d-channels": dict(arr=rng.normal(size=(4, 5, 6, 3)).astype(np.float32)),
    "4d-time": dict(arr=rng.normal(size=(4, 5, 6, 3)).astype(np.float32), time_unit="sec"),
    "5d-vector": dict(arr=rng.normal(size=(4, 5, 6, 1, 2)).astype(np.float32), intent="vector"),
}


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("volume", [None, 1])
def test_nifti_gz_reads_as_nibabel_load(tmp_path, name, volume):
    pytest.importorskip("isal")
    spec = dict(FILES[name])
    path = tmp_path / f"{name}.nii.gz"
    _write(path, spec.pop("arr"), **spec)
    try:
        fast = datasets._read_nifti_gz(path, volume, None)
    except datasets._CaseProblem as exc:
        fast = exc
    assert fast is not None
    try:
        img = nib.load(str(path))
        ref = (*datasets._nifti_data(img, path, volume, None), np.asarray(img.affine, dtype=np.float64))
    except datasets._CaseProblem as exc:
        assert isinstance(fast, type(exc)) and str(fast) == str(exc)
        return
    assert not isinstance(fast, Exception)
    data, chan, affine = fast
    assert chan == ref[1]
    _same_array(np.asarray(data), np.asarray(ref[0]))
    _same_array(affine, ref[2])


@pytest.mark.parametrize("name", sorted(FILES))
def test_nifti_gz_cases_read_as_before(tmp_path, monkeypatch, name):
    pytest.importorskip("isal")
    spec = dict(FILES[name])
    arr = spec.pop("arr")
    _write(tmp_path / "a.nii.gz", arr, **spec)
    labels = rng.integers(0, 4, arr.shape[:3]).astype(np.uint8)
    nib.save(nib.Nifti1Image(labels, nib.load(str(tmp_path / "a.nii.gz")).affine),
             str(tmp_path / "a_mask.nii.gz"))
    for kwargs in ({}, {"volume": 2}, {"channels": 1, "volume": 0}, {"reorient": True}):
        with warnings.catch_warnings(record=True) as w_new:
            warnings.simplefilter("always")
            new = open_dataset(tmp_path, **kwargs)[0]
        with monkeypatch.context() as m, warnings.catch_warnings(record=True) as w_old:
            warnings.simplefilter("always")
            _old_read(m)
            old = open_dataset(tmp_path, **kwargs)[0]
        _same_case(new, old)
        assert [str(w.message) for w in w_new] == [str(w.message) for w in w_old]


def _corrupt(kind: str, path: Path) -> None:
    good = gzip.decompress(path.read_bytes()) if path.exists() else b""
    if kind == "truncated-gzip":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif kind == "bad-crc":
        raw = bytearray(path.read_bytes())
        raw[-8] ^= 0xFF  # the CRC32 of the gzip trailer
        path.write_bytes(bytes(raw))
    elif kind == "not-gzip":
        path.write_bytes(good)  # an uncompressed NIfTI named .nii.gz
    elif kind == "not-nifti":
        path.write_bytes(gzip.compress(b"not a nifti file at all" * 40))
    elif kind == "plain-text":
        path.write_bytes(b"not a nifti file at all")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "short-data":
        path.write_bytes(gzip.compress(good[: len(good) - 100]))
    elif kind == "trailing-garbage":
        path.write_bytes(path.read_bytes() + b"garbage after the gzip member")
    else:
        raise AssertionError(kind)


CORRUPTIONS = ["truncated-gzip", "bad-crc", "not-gzip", "not-nifti", "plain-text", "empty",
               "short-data", "trailing-garbage"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("which", ["image", "mask"])
def test_corrupt_files_give_the_errors_they_gave(tmp_path, monkeypatch, kind, which):
    arr = rng.normal(size=(30, 31, 32)).astype(np.float32)  # a few gzip blocks
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "a.nii.gz"))
    nib.save(nib.Nifti1Image((arr > 0).astype(np.uint8), np.eye(4)), str(tmp_path / "a_mask.nii.gz"))
    _corrupt(kind, tmp_path / ("a.nii.gz" if which == "image" else "a_mask.nii.gz"))
    results = []
    for old in (False, True):
        with monkeypatch.context() as m, warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if old:
                _old_read(m)
            case = open_dataset(tmp_path)[0]
            try:
                open_dataset(tmp_path, strict=True)[0]
                strict = None
            except datasets.DatasetError as exc:
                strict = str(exc)
        results.append((case, [str(x.message) for x in w], strict))
    (new, w_new, s_new), (old_case, w_old, s_old) = results
    _same_case(new, old_case)
    assert w_new == w_old and s_new == s_old


def test_corrupt_gzip_is_left_to_nibabel(tmp_path):
    pytest.importorskip("isal")
    arr = rng.normal(size=(30, 31, 32)).astype(np.float32)
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    assert datasets._read_nifti_gz(path, None, None) is not None
    _corrupt("truncated-gzip", path)
    assert datasets._read_nifti_gz(path, None, None) is None
    with pytest.warns(UserWarning, match="a.nii.gz"):
        case = open_dataset(tmp_path)[0]
    assert case.status == "unreadable" and "a.nii.gz" in case.message


def test_without_isal_nibabel_reads(tmp_path, monkeypatch):
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "a.nii.gz"))
    monkeypatch.setitem(sys.modules, "isal", None)  # import isal raises ImportError
    assert datasets._read_nifti_gz(tmp_path / "a.nii.gz", None, None) is None
    case = open_dataset(tmp_path)[0]
    assert case.ok and case.image[0].tobytes() == np.ascontiguousarray(arr).tobytes()


# ------------------------------------------------------------------ C-ordered copies

@pytest.mark.parametrize("src_dtype", [np.uint8, np.int16, np.float64, np.float16, np.bool_, np.int64])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.uint16])
def test_c_order_is_ascontiguousarray(src_dtype, dtype):
    base = rng.normal(size=(2, 7, 9, 11)) * 200
    base.flat[:5] = [0.5, -0.0, 255.7, 1e6, -3.5]
    arrays = {
        "fortran-3d": np.asfortranarray(base[0]),
        "fortran-4d": np.asfortranarray(base),
        "channels-moved": np.moveaxis(np.asfortranarray(np.moveaxis(base, 0, -1)), -1, 0),
        "flipped": np.asfortranarray(base[0])[::-1, :, ::-2],
        "c-order": np.ascontiguousarray(base[0]),
        "2-d": np.asfortranarray(base[0, 0]),
        "one-row": np.asfortranarray(base[0, :, :1, :]),
        "odd-rows": np.asfortranarray(base[0, :, :7, :]),
    }
    with np.errstate(invalid="ignore", over="ignore"):
        for name, a in arrays.items():
            a = a.astype(src_dtype)
            _same_array(datasets._c_order(a, dtype), np.ascontiguousarray(a, dtype=dtype))


@pytest.mark.parametrize("src_dtype", [np.uint8, np.int64])  # register transposes; NumPy's slabs
def test_c_order_makes_one_output_for_fortran_volumes(monkeypatch, src_dtype):
    a = np.asfortranarray(rng.integers(0, 255, (6, 5, 4)).astype(src_dtype))
    seen = []
    real_empty = np.empty

    def spy(shape, dtype=float, *args, **kwargs):
        seen.append(tuple(shape))
        return real_empty(shape, dtype, *args, **kwargs)

    monkeypatch.setattr(datasets.np, "empty", spy)
    out = datasets._c_order(a, np.float32)
    assert seen == [(6, 5, 4)] and out.flags.c_contiguous
    assert out.tobytes() == np.ascontiguousarray(a, dtype=np.float32).tobytes()


# ------------------------------------------------------------------ scaling

def _scale_old(card: ModelCard, x: np.ndarray) -> np.ndarray:
    """``ModelCard._scale`` for ``scaling`` minmax/meanstd before issue 15."""
    x64 = x.astype(np.float64)
    if card.scaling == "meanstd":
        shape = (-1,) + (1,) * (x.ndim - 1)
        mean = np.asarray(card.mean, dtype=np.float64).reshape(shape)
        std = np.asarray(card.std, dtype=np.float64).reshape(shape)
        return ((x64 - mean) / std).astype(np.float32)
    return card_module._normalize_channel(x64, {"kind": card.scaling}).astype(np.float32)


def _card(scaling: str, channels: int = 1, **kwargs) -> ModelCard:
    return ModelCard(input_name="x", layout="NCDHW", input_size=None, channels=channels,
                     prediction_output="y", activation="sigmoid", classes=(0,), scaling=scaling,
                     **kwargs)


def _awkward(channels: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Channels with NaN, ±Inf, constants, zeros of both signs, tiny and huge values."""
    g = np.random.default_rng(seed)
    x = (g.normal(size=(channels,) + shape) * g.choice([1.0, 1e-30, 1e30, 1e3])).astype(np.float32)
    for c in range(channels):
        kind = int(g.integers(0, 9))
        flat = x[c].reshape(-1)
        if kind == 0:
            flat[:] = 3.0
        elif kind == 1:
            flat[int(g.integers(flat.size))] = np.nan
        elif kind == 2:
            flat[int(g.integers(flat.size))] = np.inf
        elif kind == 3:
            flat[int(g.integers(flat.size))] = -np.inf
        elif kind == 4:  # a zero minimum with -0.0 voxels: the sign of lo matters
            flat[:] = np.abs(flat)
            flat[g.integers(flat.size, size=3)] = -0.0
            flat[int(g.integers(flat.size))] = 0.0
        elif kind == 5:
            flat[:] = -0.0
        elif kind == 6:
            flat[:] = np.abs(flat)
            flat[int(g.integers(flat.size))] = 0.0
        elif kind == 7:
            flat[:] = np.inf
        x[c] = flat.reshape(shape)
    return x


@pytest.mark.parametrize("seed", range(60))
def test_minmax_is_bit_identical_to_the_float64_code(seed):
    card = _card("minmax", channels=3)
    x = _awkward(3, (5, 4, 6), seed)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        assert card._scale(x).tobytes() == _scale_old(card, x).tobytes()


def test_minmax_keeps_the_sign_of_minus_zero():
    card = _card("minmax")
    for lo in (0.0, -0.0):
        x = np.array([[[[lo, -0.0, 0.0, 2.0, -0.0]]]], dtype=np.float32)
        got, want = card._scale(x), _scale_old(card, x)
        assert np.signbit(got).tolist() == np.signbit(want).tolist()
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("mean,std", [((0.5,), (2.0,)), ((1.0, -2.0), (3.0, 0.25)),
                                      ((1e30,), (1e-30,)), ((0.0,), (-1.5,))])
def test_meanstd_is_bit_identical_to_the_float64_code(mean, std):
    card = _card("meanstd", channels=2, mean=mean, std=std)
    for seed in range(10):
        x = _awkward(2, (3, 7, 5), seed)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            assert card._scale(x).tobytes() == _scale_old(card, x).tobytes()


def test_chunks_cover_the_case(monkeypatch):
    monkeypatch.setattr(card_module, "_CHUNK", 7)  # chunks that do not divide the size
    card = _card("minmax", channels=2)
    x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    assert card._scale(x).tobytes() == _scale_old(card, x).tobytes()


def test_colin27_preprocess_is_bit_identical(monkeypatch):
    from engine.model.card import resolve_model_card

    card = resolve_model_card(ROOT / "cli" / "data" / "deepbrain" / "deepbrain.onnx")
    assert card.scaling == "minmax"
    image = open_dataset(COLIN27, spatial_ndim=3)[0].image
    new = card.preprocess(image)
    monkeypatch.setattr(ModelCard, "_scale", _scale_old)
    old = card.preprocess(image)
    _same_array(new, old)


# ------------------------------------------------------------------ labels

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int64, np.float32, np.bool_])
def test_labels_in_is_np_unique(dtype, monkeypatch):
    from engine._kernels import labels

    real = labels.present_values
    monkeypatch.setattr(labels, "present_values", lambda flat: real(flat, chunk=1000))  # several chunks, the last short
    top = {np.uint8: 255, np.uint16: 65535, np.int16: 300, np.int64: 70000, np.float32: 9,
           np.bool_: 1}[dtype]
    masks = [rng.integers(0, top + 1, (13, 17, 11)), np.zeros((4, 5, 6), int),
             np.full((3, 3), top), np.zeros((0, 4), int), np.array([[0, top], [top, 3 % (top + 1)]])]
    for m in masks:
        m = m.astype(dtype)
        for view in (m, np.asfortranarray(m), m[::-1]):
            assert batch._labels_in(view) == {int(v) for v in np.unique(view)}


def test_colin27_mask_labels():
    mask = open_dataset(COLIN27, spatial_ndim=3)[0].mask
    assert batch._labels_in(mask) == {int(v) for v in np.unique(mask)}


@pytest.mark.parametrize("binary", [True, False])
def test_label_check_notes_and_errors_as_before(monkeypatch, binary):
    from types import SimpleNamespace

    from engine.errors import CaseError

    plan = SimpleNamespace(binary_model=binary, classes=(1, 2))
    masks = [np.array([[0, 1], [2, 2]], np.uint8), np.array([[0, 9], [300, 1]], np.uint16),
             np.zeros((2, 2), np.uint8), None, np.asfortranarray(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))]
    outcomes = []
    for old in (False, True):
        with monkeypatch.context() as m:
            if old:
                m.setattr(batch, "_labels_in", lambda mask: {int(v) for v in np.unique(mask)})
            got = []
            for k in range(len(masks)):
                cases = [datasets.Case(str(i), None, masks[i]) for i in range(k + 1)]
                try:
                    got.append(batch._labels_note(plan, cases, list(range(k + 1))))
                except CaseError as exc:
                    got.append(("error", str(exc)))
        outcomes.append(got)
    assert outcomes[0] == outcomes[1]
    assert any(o for o in outcomes[0])  # the check said something (a note or an error)
