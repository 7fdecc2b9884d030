"""Data in: read image (and optional mask) cases from folders or array files.

:func:`open_dataset` returns a :class:`Dataset`, a sized, lazy iterable of
:class:`Case` objects; one case is read at a time. Every image comes out as float32,
channels first ``(C, *spatial)``; every mask as integer labels ``(*spatial)`` (uint8,
or uint16 when labels exceed 255). A case that cannot be read, or whose mask disagrees
with its image, becomes a ``Case`` with ``status != "ok"`` and a warning, so a run goes
on; ``strict=True`` raises instead. The rules are documented in ``docs/datasets.md``.
"""
from __future__ import annotations

import csv
import difflib
import os
import re
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import CaseSkippedWarning, option
from engine.model.metadata import check_orientation, file_axis_order

__all__ = [
    "Case",
    "Dataset",
    "DatasetError",
    "GRID_TOLERANCE",
    "IMAGE_EXTENSIONS",
    "MASK_SUFFIXES",
    "NNUNET_IMAGE_DIRS",
    "describe_grid",
    "open_dataset",
    "orientation_codes",
    "same_grid",
]

#: File name endings read as images or masks (lower case).
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".tif",
                    ".tiff", ".npy")
#: Stem suffixes that mark a mask file (``<id>_mask.png``...).
MASK_SUFFIXES = ("_mask", "_seg", "_label")
#: Stem suffixes that mark an image file in a folder that also holds masks.
IMAGE_SUFFIXES = ("_image", "_img")
_ARRAY_FILES = (".h5", ".hdf5", ".hdf", ".npz")
_MASK_DIRS = ("masks", "labels", "segmentations")
#: nnU-Net's raw-data folders of images (``CASE_0000.nii.gz``, one file per channel); their
#: labels (``CASE.nii.gz``) are in ``labelsTr``/``labelsTs`` beside them.
NNUNET_IMAGE_DIRS = ("imagesTr", "imagesTs")
#: A channel file of nnU-Net's layout: the case id, ``_``, the channel as four digits.
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_NRRD_CHANNEL_KINDS = {"vector", "covariant-vector", "normal", "rgb-color", "rgba-color",
                       "3-color", "4-color", "hsv-color", "xyz-color", "list", "point",
                       "2-vector", "3-vector", "4-vector", "3-gradient", "3-normal",
                       "complex", "quaternion"}
#: NIfTI intent codes whose 4th (or, in the standard layout, 5th) axis holds the components of
#: one value per voxel — general/symmetric matrix, displacement vector, vector, quaternion,
#: RGB, RGBA, FNIRT displacement field: channels, never time.
_NIFTI_CHANNEL_INTENTS = frozenset({1004, 1005, 1006, 1007, 1010, 2003, 2004, 2006})
#: NIFTI_INTENT_TIME_SERIES: the value at each voxel is a time series.
_NIFTI_TIME_SERIES = 2001
#: How far an image's and its mask's grids may differ and still be one grid: direction cosines
#: by this much, spacings by this fraction, origins by this fraction of a voxel (see
#: :func:`same_grid`). NIfTI headers hold float32, and converters that rebuild the qform from
#: the sform round to about 1e-6; a real mismatch (another scan, a flip) is far larger.
GRID_TOLERANCE = 1e-3
#: Per thread: id of a :class:`Dataset` → its HDF5 file, open while that thread reads a
#: batch of its cases (:meth:`Dataset.read_cases`).
_HELD = threading.local()
#: NRRD ``space`` values (and their abbreviations) → the sign that turns each world axis into
#: RAS (NRRD's ``-time`` spaces too: their time axis is dropped before).
_NRRD_SPACES = {
    "right-anterior-superior": (1.0, 1.0, 1.0), "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0), "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0), "lps": (-1.0, -1.0, 1.0),
}


class DatasetError(ValueError):
    """A case or a dataset cannot be read (raised with ``strict=True``)."""


class _CaseProblem(DatasetError):
    """One case cannot be used; the message names the file, what it holds and what to do."""

    status = "unreadable"


class _ShapeError(_CaseProblem):
    """The image's axes do not fit ``spatial_ndim`` (status ``bad-shape``)."""

    status = "bad-shape"


class _TimeSeriesError(_CaseProblem):
    """A time series where one volume is expected, or ``volume`` out of its range."""

    status = "time-series"


class _VolumesError(_CaseProblem):
    """Several volumes (not a time series) for a model that takes one channel."""

    status = "multi-volume"


class _ChannelsError(_CaseProblem):
    """A channel axis whose length is not the model's channel count."""

    status = "wrong-channels"


class _GridError(_CaseProblem):
    """Files of one case (channel files) on different grids."""

    status = "grid-mismatch"


@dataclass
class Case:
    """One case of a dataset.

    Attributes
    ----------
    id : str
        Case identifier (file stem, or the ``ids`` entry of an array file).
    image : ndarray or None
        float32 ``(C, *spatial)``, channels first; None when unreadable.
    mask : ndarray or None
        Integer labels ``(*spatial)``, uint8 (uint16 when a label exceeds 255); None
        without a mask or when it could not be used.
    group : str or None
        Group (subject, site...) from ``groups``/``groups.csv``.
    path : str
        Where the image came from (``file.h5:images[3]`` for array files; the first channel
        file in nnU-Net's one-file-per-channel layout).
    status : str
        ``"ok"``, ``"unreadable"``, ``"mask-unreadable"``, ``"mask-shape-mismatch"``,
        ``"bad-shape"``, ``"time-series"``, ``"multi-volume"``, ``"wrong-channels"`` or
        ``"grid-mismatch"``.
    message : str
        Human explanation when ``status != "ok"``.
    mask_path : str or None
        Where the mask came from.
    affine : ndarray or None
        float64 (4, 4): voxel indices of ``image`` (and ``mask``) → RAS+ world coordinates in
        mm, as nibabel defines it; after ``reorient`` the affine of the reoriented arrays.
        None for formats without one (PNG, JPEG, TIFF, ``.npy``, HDF5/NPZ arrays) and NRRD
        files without an anatomical ``space``.
    file_orientation : str
        Orientation codes of the image file (``"LPS"``...; see :func:`orientation_codes`)
        before any reorientation; ``""`` without an affine.
    """

    id: str
    image: np.ndarray | None
    mask: np.ndarray | None = None
    group: str | None = None
    path: str = ""
    status: str = "ok"
    message: str = ""
    mask_path: str | None = field(default=None, repr=False)
    affine: np.ndarray | None = field(default=None, repr=False)
    file_orientation: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        """True when the case was read and its mask (if any) fits the image."""
        return self.status == "ok"

    @property
    def orientation(self) -> str:
        """Orientation codes of ``affine`` (``"RAS"`` after ``reorient``); ``""`` without one."""
        return orientation_codes(self.affine)

    @property
    def source_format(self) -> str:
        """The image file's format: ``"nifti"``, ``"nrrd"``, ``"png"``, ``"jpeg"``,
        ``"tiff"``, ``"npy"``, or ``"array"`` for a case of an HDF5/NPZ file."""
        split = _split_ext(Path(self.path).name)
        return _FORMATS.get(split[1].lower(), "array") if split else "array"


_FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".png": "png",
            ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".npy": "npy"}


# --------------------------------------------------------------------------- grids

def orientation_codes(affine: np.ndarray | None) -> str:
    """The axis codes of an affine as one string (``"RAS"``, ``"LPS"``...), ``""`` for None.

    Each letter names the world direction toward which a voxel axis increases
    (:func:`nibabel.aff2axcodes`).

    Examples
    --------
    >>> orientation_codes(np.diag([-1.0, -1.0, 1.0, 1.0]))
    'LPS'
    """
    if affine is None:
        return ""
    import nibabel as nib

    return "".join(str(c) for c in nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def same_grid(a: np.ndarray, b: np.ndarray, *, tol: float = GRID_TOLERANCE) -> bool:
    """Whether two affines put their voxels at the same places.

    Parameters
    ----------
    a, b : ndarray (4, 4)
        Voxel → world affines.
    tol : float
        Direction cosines may differ by ``tol``, spacings by the fraction ``tol`` and origins
        by ``tol`` voxels (of the finer spacing).

    Returns
    -------
    bool

    Examples
    --------
    >>> same_grid(np.eye(4), np.diag([1.0, 1.0, 1.0 + 1e-5, 1.0]))
    True
    >>> same_grid(np.eye(4), np.diag([-1.0, 1.0, 1.0, 1.0]))
    False
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    sa, sb = _spacing(a), _spacing(b)
    if not (np.all(sa > 0) and np.all(sb > 0)):
        return bool(np.allclose(a, b, rtol=0, atol=tol))
    if np.any(np.abs(sa - sb) > tol * np.maximum(sa, sb)):
        return False
    if np.any(np.abs(a[:3, :3] / sa - b[:3, :3] / sb) > tol):
        return False
    return bool(np.all(np.abs(a[:3, 3] - b[:3, 3]) <= tol * float(min(sa.min(), sb.min()))))


def _numbers(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def describe_grid(affine: np.ndarray, shape: tuple[int, ...]) -> str:
    """One line naming a grid: shape, spacing, orientation codes and origin.

    Examples
    --------
    >>> describe_grid(np.diag([-1.0, -1.0, 2.0, 1.0]), (8, 8, 4))
    'shape (8, 8, 4), spacing (1, 1, 2) mm, orientation LPS, origin (0, 0, 0) mm'
    """
    n = max(1, min(3, len(shape)))
    return (f"shape {tuple(int(s) for s in shape)}, spacing {_numbers(_spacing(affine)[:n])} mm, "
            f"orientation {orientation_codes(affine)}, origin "
            f"{_numbers(np.asarray(affine, dtype=np.float64)[:3, 3])} mm")


def _reorient(image: np.ndarray, mask: np.ndarray | None, affine: np.ndarray,
              target: str = "RAS") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``image`` (C, X, Y, Z) and ``mask`` (X, Y, Z) flipped and permuted to the axis codes
    ``target``, and the affine of the result (no resampling): for ``"RAS"`` what
    :func:`nibabel.as_closest_canonical` does; otherwise ``ornt_transform`` from the file's
    closest axes (``io_orientation``) to ``target`` (``axcodes2ornt``).

    A ``target`` that permutes the file's axes (``"zyx"``, see
    :func:`engine.model.metadata.file_axis_order`) stands for the file's own codes so
    permuted (an LPS file to SPL): the same transform, built from the permutation alone, so
    that it holds for any affine (no flips)."""
    from nibabel.orientations import (apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation,
                                      ornt_transform)

    order = file_axis_order(target)
    if order is not None:  # output axis j is file axis order[j]: file axis k goes to order.index(k)
        ornt = np.array([[order.index(k), 1] for k in range(3)], dtype=np.float64)
    else:
        ornt = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(target)))
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return image, mask, affine
    spatial = image.shape[1:]
    image = np.ascontiguousarray(np.stack([apply_orientation(c, ornt) for c in image]))
    if mask is not None:
        mask = np.ascontiguousarray(apply_orientation(mask, ornt))
    return image, mask, np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, spatial)


def _target_orientation(reorient: bool | str | None) -> str | None:
    """``reorient`` as the axis codes cases are brought to: True → ``"RAS"``, a string →
    those codes or that permutation of the file's axes (``"zyx"``; checked),
    False/None/``""`` → None (file order)."""
    if reorient is None or reorient is False or reorient == "":
        return None
    if reorient is True:
        return "RAS"
    return check_orientation(reorient, what="reorient", file_axes=True)


# --------------------------------------------------------------------------- naming

def _split_ext(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: len(name) - len(ext)], ext
    return None


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _strip_suffix(stem: str, suffixes: tuple[str, ...]) -> str | None:
    lower = stem.lower()
    for suf in suffixes:
        if lower.endswith(suf) and len(stem) > len(suf):
            return stem[: len(stem) - len(suf)]
    return None


def _image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and _split_ext(p.name)),
                  key=lambda p: _natural_key(p.name))


def _add_unique(table: dict[str, Path], key: str, path: Path, what: str) -> None:
    if key in table:
        raise DatasetError(f"two {what} files for case {key!r}: {table[key]} and {path}; "
                           "keep one per case (or rename one)")
    table[key] = path


ImagePath = Path | tuple[Path, ...]


def _channel_groups(files: list[Path], *, required: bool, where: Path,
                    channels: int | None = None) -> dict[str, tuple[Path, ...]] | None:
    """nnU-Net's one-file-per-channel layout: case id → its channel files in suffix order
    (``CASE_0000``, ``CASE_0001``...), or None when ``files`` are not in that layout.

    ``required`` (an ``imagesTr``/``imagesTs`` folder): every file must be named so, else
    DatasetError. Elsewhere the files are grouped only when the model takes ``channels`` > 1,
    every file is named so, and there are at least two cases of exactly ``channels`` files.
    A case whose suffixes skip a channel is a DatasetError naming it.
    """
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        stem = _split_ext(p.name)[0]  # type: ignore[index]
        m = _CHANNEL_FILE.match(stem)
        if m is None:
            if required:
                raise DatasetError(
                    f"{p} is in nnU-Net's {where.name}/ folder but not named CASE_XXXX (a case id, _, "
                    "the channel as four digits, e.g. liver_001_0000.nii.gz); rename it, or move it out")
            return None
        chans = groups.setdefault(m["case"], {})
        ch = int(m["channel"])
        if ch in chans:
            raise DatasetError(f"two files for channel {ch} of case {m['case']!r}: {chans[ch]} and {p}; "
                               "keep one")
        chans[ch] = p
    if not required and (channels is None or channels < 2 or len(groups) < 2
                         or any(len(c) != channels for c in groups.values())):
        return None
    out = {}
    for case, chans in groups.items():
        if sorted(chans) != list(range(len(chans))):
            missing = sorted(set(range(max(chans) + 1)) - set(chans))
            raise DatasetError(
                f"case {case!r} in {where} has channel files {[f'_{c:04d}' for c in sorted(chans)]} but "
                f"not {[f'_{c:04d}' for c in missing]}; nnU-Net's layout numbers channels from _0000 "
                "without gaps: add the missing file(s) or renumber")
        out[case] = tuple(chans[c] for c in sorted(chans))
    return out


def _nnunet_folders(folder: Path) -> tuple[Path, Path | None] | None:
    """(images folder, labels folder or None) of nnU-Net's raw layout: ``folder`` itself is
    ``imagesTr``/``imagesTs`` (labels in ``labelsTr``/``labelsTs`` beside it), or holds one
    of them (a ``DatasetXXX_Name`` folder); None otherwise."""
    if folder.name in NNUNET_IMAGE_DIRS:
        images = folder
    else:
        found = [folder / n for n in NNUNET_IMAGE_DIRS if (folder / n).is_dir()]
        if not found:
            return None
        if len(found) > 1:
            raise DatasetError(f"{folder} holds both imagesTr/ and imagesTs/ (nnU-Net's layout); pass "
                               f"the one to score, e.g. {folder / 'imagesTs'}")
        images = found[0]
    labels = images.parent / images.name.replace("images", "labels", 1)
    return images, labels if labels.is_dir() else None


def _pair_folder(folder: Path, masks: bool, channels: int | None = None
                 ) -> tuple[list[tuple[str, ImagePath, Path | None]], list[Path]]:
    """Return [(id, image path (a tuple of channel files in nnU-Net's layout), mask path|None)]
    and the unmatched mask files."""
    images: dict[str, ImagePath] = {}
    mask_files: dict[str, Path] = {}
    sub = folder / "images"
    nnunet = None if sub.is_dir() else _nnunet_folders(folder)
    if nnunet is not None:
        img_dir, label_dir = nnunet
        grouped = _channel_groups(_image_files(img_dir), required=True, where=img_dir)
        images.update(grouped or {})
        if label_dir is not None:
            for p in _image_files(label_dir):
                _add_unique(mask_files, _split_ext(p.name)[0], p, "label")  # type: ignore[index]
    elif sub.is_dir():
        files = _image_files(sub)
        grouped = _channel_groups(files, required=False, where=sub, channels=channels)
        if grouped is not None:
            images.update(grouped)
        else:
            for p in files:
                stem = _split_ext(p.name)[0]  # type: ignore[index]
                _add_unique(images, _strip_suffix(stem, IMAGE_SUFFIXES) or stem, p, "image")
        for name in _MASK_DIRS:
            mdir = folder / name
            if mdir.is_dir():
                for p in _image_files(mdir):
                    stem = _split_ext(p.name)[0]  # type: ignore[index]
                    key = stem if stem in images else (
                        _strip_suffix(stem, MASK_SUFFIXES) or stem)
                    _add_unique(mask_files, key, p, "mask")
                break
    else:
        plain = []
        for p in _image_files(folder):
            stem = _split_ext(p.name)[0]  # type: ignore[index]
            base = _strip_suffix(stem, MASK_SUFFIXES)
            if base is not None:
                _add_unique(mask_files, base, p, "mask")
            else:
                plain.append(p)
        grouped = _channel_groups(plain, required=False, where=folder, channels=channels)
        if grouped is not None:
            images.update(grouped)
        else:
            for p in plain:
                stem = _split_ext(p.name)[0]  # type: ignore[index]
                _add_unique(images, _strip_suffix(stem, IMAGE_SUFFIXES) or stem, p, "image")
    if not masks:
        mask_files = {}
    ids = sorted(images, key=_natural_key)
    pairs = [(i, images[i], mask_files.get(i)) for i in ids]
    unmatched = [mask_files[k] for k in sorted(mask_files, key=_natural_key)
                 if k not in images]
    return pairs, unmatched


def _read_groups(source: Mapping[str, Any] | str | os.PathLike[str] | None,
                 folder: Path | None) -> dict[str, str]:
    if source is None:
        if folder is None or not (folder / "groups.csv").is_file():
            return {}
        source = folder / "groups.csv"
    if isinstance(source, Mapping):
        return {str(k): str(v) for k, v in source.items()}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"groups file {path} does not exist; pass a CSV with columns "
                                "id,group or a dict id -> group")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["id", "group"]:
        rows = rows[1:]
    out = {}
    for n, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DatasetError(f"{path} line {n} has {len(row)} column(s), expected 2 "
                               "(id,group); fix that line")
        out[row[0].strip()] = row[1].strip()
    return out


# --------------------------------------------------------------------------- readers

def _one_volume(data: Any, shape: tuple[int, ...], axis: int, volume: int | None, where: str,
                why: str, hint: str = "") -> np.ndarray:
    """Volume ``volume`` of a series along ``axis`` (an array or a lazy NIfTI proxy, so that
    only that volume is read); a time series without ``volume``, or ``volume`` out of range,
    is a :class:`_TimeSeriesError`."""
    n = shape[axis]
    if volume is None:
        raise _TimeSeriesError(
            f"{where} is a time series of {n} volumes (shape {shape}; {why}); to score one volume "
            f"pass its index, e.g. {option('volume', 0)} (0 to {n - 1}), or split the series into "
            f"one file per volume{hint}")
    if not 0 <= volume < n:
        raise _TimeSeriesError(
            f"{where} is a time series of {n} volumes (shape {shape}; {why}), so "
            f"{option('volume', volume)} is out of range; pass a volume from 0 to {n - 1}")
    return np.asarray(data[(slice(None),) * axis + (int(volume),)])


def _stack(data: Any, shape: tuple[int, ...], axis: int, channels: int | None, volume: int | None,
           where: str, why: str) -> np.ndarray:
    """A non-time axis of several entries (a 4th NIfTI axis, an NRRD list axis) as the model
    card says: the channels when the model takes that many (or when no card is known:
    ``channels`` None); volume ``volume`` of it for a model taking one channel; else a
    :class:`_VolumesError` (one channel, no volume) or :class:`_ChannelsError` naming both
    numbers."""
    n = int(shape[axis])
    if channels is None or (channels > 1 and n == channels):
        return np.asarray(data)
    if channels == 1:
        if volume is None:
            raise _VolumesError(
                f"{where} holds {n} volumes along axis {axis} (shape {shape}; {why}, so not a time "
                f"series), but the model takes 1 channel; to score one of them pass its index, e.g. "
                f"{option('volume', 0)} (0 to {n - 1}), or split the file into one file per volume")
        if not 0 <= volume < n:
            raise _VolumesError(
                f"{where} holds {n} volumes along axis {axis} (shape {shape}; {why}), so "
                f"{option('volume', volume)} is out of range; pass a volume from 0 to {n - 1}")
        return np.asarray(data[(slice(None),) * axis + (int(volume),)])
    raise _ChannelsError(
        f"{where} holds {n} volumes along axis {axis} (shape {shape}; {why}), read as {n} channels, "
        f"but the model takes {channels} channels; give each case the model's {channels} channels (one "
        f"4-D file of {channels} volumes, or one file per channel: CASE_0000, CASE_0001...), or use a "
        f"model card with channels = {n}")


def _nifti_data(img: Any, path: Path, volume: int | None,
                channels: int | None = None) -> tuple[np.ndarray, str]:
    """The voxels of a loaded NIfTI image: a 4th axis holds channels, unless the header marks
    it as time (see open_dataset), or the model card's ``channels`` says otherwise
    (:func:`_stack`)."""
    shape = tuple(int(d) for d in img.shape)
    header = img.header
    intent = int(np.asarray(header["intent_code"])) if "intent_code" in header else 0
    unit = header.get_xyzt_units()[1] if hasattr(header, "get_xyzt_units") else "unknown"
    hint = (" (if that axis holds channels, such as modalities, set the file's NIfTI intent to "
            "'vector')")
    if len(shape) == 5 and shape[3] == 1:  # (X, Y, Z, 1, V): one vector per voxel
        if intent == _NIFTI_TIME_SERIES and shape[4] > 1:
            return _one_volume(img.dataobj, shape, 4, volume, str(path),
                               "its NIfTI intent is 'time series'"), "last"
        vec = np.asarray(img.dataobj)[:, :, :, 0, :]  # the vector: channels
        if vec.shape[3] == 1:
            return vec, "last"
        return _stack(vec, vec.shape, 3, channels, volume, str(path),
                      "the NIfTI vector layout (X, Y, Z, 1, V)"), "last"
    if len(shape) >= 4 and shape[3] > 1 and intent not in _NIFTI_CHANNEL_INTENTS:
        if intent == _NIFTI_TIME_SERIES:
            return _one_volume(img.dataobj, shape, 3, volume, str(path),
                               "its NIfTI intent is 'time series'"), "last"
        if unit != "unknown":
            return _one_volume(img.dataobj, shape, 3, volume, str(path),
                               f"its header gives the 4th axis the time unit {unit!r}", hint), "last"
    if len(shape) == 4 and shape[3] > 1:  # a 4th axis holds channels (when the card agrees)
        why = ("its NIfTI intent names channels" if intent in _NIFTI_CHANNEL_INTENTS
               else "its header gives the 4th axis no time unit")
        return _stack(img.dataobj, shape, 3, channels, volume, str(path), why), "last"
    return np.asarray(img.dataobj), "last"


def _read_nrrd(path: Path, volume: int | None = None,
               channels: int | None = None) -> tuple[np.ndarray, str | int, np.ndarray | None]:
    import nrrd

    data, header = nrrd.read(str(path), index_order="F")
    kinds = [str(k).lower() for k in header.get("kinds", [])]
    axes = list(range(data.ndim))  # the file's axes still in ``data``
    chan: str | int = "last"
    if len(kinds) == data.ndim:
        time = [i for i, k in enumerate(kinds) if k == "time"]
        if len(time) == 1:
            t = time[0]
            data = (np.take(data, 0, axis=t) if data.shape[t] == 1 else
                    _one_volume(data, data.shape, t, volume, str(path),
                                f"its NRRD kinds name axis {t} 'time'"))
            kinds = kinds[:t] + kinds[t + 1:]
            del axes[t]
        found = [i for i, k in enumerate(kinds) if k in _NRRD_CHANNEL_KINDS]
        if len(found) == 1:
            chan = found[0]
    if data.ndim == 4:  # a volume and one non-spatial axis: channels when the card agrees
        axis = chan if isinstance(chan, int) else 3
        why = (f"its NRRD kinds name axis {axis} {kinds[axis]!r}" if len(kinds) == data.ndim
               else "its 4th axis")
        stacked = _stack(data, data.shape, axis, channels, volume, str(path), why)
        if stacked.ndim == 3:  # one volume of it, picked with ``volume``
            del axes[axis]
            return stacked, "last", _nrrd_affine(header, axes)
        data = stacked
    return data, chan, _nrrd_affine(header, axes)


def _nrrd_affine(header: Mapping[str, Any], axes: list[int]) -> np.ndarray | None:
    """The RAS affine of an NRRD header's ``space``, ``space directions`` and ``space
    origin`` (for the file axes ``axes``), or None when the space is not anatomical (no
    ``space``, ``scanner-xyz``, ``3D-right-handed``...) or the directions are missing."""
    space = str(header.get("space", "")).lower().replace("-time", "")
    signs = _NRRD_SPACES.get(space)
    dirs = header.get("space directions")
    if signs is None or dirs is None:
        return None
    rows = [np.asarray(dirs[a], dtype=np.float64) if dirs[a] is not None else None for a in axes]
    spatial = [r for r in rows if r is not None and r.size and np.all(np.isfinite(r))]
    if not 1 <= len(spatial) <= 3 or any(r.size != 3 for r in spatial):
        return None
    affine = np.eye(4)
    for j, r in enumerate(spatial):
        affine[:3, j] = r
    origin = header.get("space origin")
    if origin is not None and np.all(np.isfinite(np.asarray(origin, dtype=np.float64))):
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)[:3]
    return np.diag(list(signs) + [1.0]) @ affine  # world (LPS...) → RAS


def _read_pil(path: Path, is_mask: bool) -> tuple[np.ndarray, str | int]:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "P" and not is_mask:
            im = im.convert("RGB")
        elif mode in ("RGBA", "LA", "PA"):
            im = im.convert("RGB" if mode == "RGBA" else "L")
        elif mode == "1":
            im = im.convert("L")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        data = np.asarray(im)
    return data, 2 if data.ndim == 3 else "last"


def _read_tiff(path: Path, volume: int | None = None) -> tuple[np.ndarray, str | int]:
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        series = tf.series[0]
        data = series.asarray()
        axes = series.axes
    if len(axes) == data.ndim and axes.count("T") == 1:
        t = axes.index("T")
        data = (np.take(data, 0, axis=t) if data.shape[t] == 1 else
                _one_volume(data, data.shape, t, volume, str(path), f"tifffile names its axes {axes!r}"))
        axes = axes.replace("T", "")
    chan = [i for i, a in enumerate(axes) if a in "SC"]
    if len(chan) == 1 and len(axes) == data.ndim:
        return data, chan[0]
    return data, "last"


def _read_npy(path: Path) -> tuple[np.ndarray, str]:
    return np.load(path, mmap_mode="r", allow_pickle=False), "first"


def _read_file(path: Path, *, is_mask: bool = False, volume: int | None = None,
               channels: int | None = None) -> tuple[np.ndarray, str | int, np.ndarray | None]:
    """Raw array, where its channel axis is (if it has one beyond spatial_ndim) and its
    RAS affine (None for formats without one); a file whose header marks a time axis gives
    its volume ``volume`` (none: _TimeSeriesError); a non-time 4th axis of a NIfTI/NRRD
    image is checked against the model's ``channels`` (:func:`_stack`; None: channels)."""
    ext = _split_ext(path.name)
    ext_l = ext[1].lower() if ext else path.suffix.lower()
    if ext_l in (".nii", ".nii.gz"):
        import nibabel as nib

        fast = _read_nifti_gz(path, volume, channels) if ext_l == ".nii.gz" else None
        if fast is not None:
            return fast
        img = nib.load(str(path))
        data, chan = _nifti_data(img, path, volume, channels)
        return data, chan, np.asarray(img.affine, dtype=np.float64)
    if ext_l in (".nrrd", ".nhdr"):
        return _read_nrrd(path, volume, channels)
    if ext_l in (".png", ".jpg", ".jpeg"):
        return (*_read_pil(path, is_mask), None)
    if ext_l in (".tif", ".tiff"):
        return (*_read_tiff(path, volume), None)
    if ext_l == ".npy":
        return (*_read_npy(path), None)
    raise DatasetError(f"{path} has an unsupported extension; expected one of "
                       f"{list(IMAGE_EXTENSIONS)}")


def _read_nifti_gz(path: Path, volume: int | None,
                   channels: int | None) -> tuple[np.ndarray, str, np.ndarray] | None:
    """A ``.nii.gz`` file read as :func:`_read_file` reads it with ``nibabel.load``, but
    decompressed by ISA-L (``isal.igzip``, about twice as fast as the standard library's
    ``gzip`` that nibabel's opener uses); None when ``isal`` is not installed or the file does
    not read so (corrupt, truncated, not gzip, not NIfTI): the caller then reads it with
    ``nibabel.load``, which raises the error it always did.

    The stream is handed to nibabel (``from_stream``), so the header, scaling, 4-D rules and
    lazy reading of one volume (:func:`_one_volume`) are nibabel's own; the image class is
    chosen as ``nibabel.load`` chooses it for a ``.nii.gz`` name (NIfTI-1, else NIfTI-2, by
    the header size in the first bytes). ``indexed_gzip``, which nibabel can use, speeds up
    random access, not a whole read, so it is not used.
    """
    try:
        from isal import igzip
    except ImportError:
        return None
    import nibabel as nib

    try:
        with igzip.open(path, "rb") as fh:
            head = fh.read(1024)
            klass = next((k for k in (nib.Nifti1Image, nib.Nifti2Image)
                          if len(head) >= k.header_class.sizeof_hdr
                          and k.header_class.may_contain_header(head)), None)
            if klass is None:
                return None
            fh.seek(0)
            img = klass.from_stream(fh)
            data, chan = _nifti_data(img, path, volume, channels)
            return data, chan, np.asarray(img.affine, dtype=np.float64)
    except _CaseProblem:  # our own message from the header (a time series...): as nib.load's
        raise
    except Exception:  # noqa: BLE001 - a file ISA-L or nibabel cannot read: nibabel.load's error
        return None


def _c_order(data: np.ndarray, dtype: Any) -> np.ndarray:
    """``np.ascontiguousarray(data, dtype=dtype)``, fast when the last three axes are stored in
    reverse (a Fortran-ordered volume, as NIfTI and NRRD files hold voxels): NumPy's one strided
    copy of a whole such volume misses the cache at nearly every element. Where each volume
    of ``data`` is contiguous in reverse and the dtypes have one, the copy is
    :func:`engine._kernels.layout.reverse_copy` (8×8 blocks transposed in vector registers;
    Colin27, 181x217x181 uint8 to float32: 8-9 ms -> 3 ms, its uint8 mask 3.6 -> 1.3 ms);
    otherwise it goes in slabs of the second-to-last axis, whose (X, 2, Z) transposes stay in
    the cache (17 ms -> 7-10 ms). Values, shape and dtype are those of
    ``np.ascontiguousarray`` (the same casts)."""
    a = np.asarray(data)
    if a.ndim < 3 or a.flags.c_contiguous or a.size == 0:
        return np.ascontiguousarray(a, dtype=dtype)
    s = [abs(v) for v in a.strides[-3:]]
    if not s[2] > s[1] > s[0]:
        return np.ascontiguousarray(a, dtype=dtype)
    out = np.empty(a.shape, dtype=dtype)
    if _reverse_copy(a, out):
        return out
    n = a.shape[-2]
    for y in range(0, n, _SLAB):
        out[..., y:y + _SLAB, :] = a[..., y:y + _SLAB, :]
    return out


def _reverse_copy(a: np.ndarray, out: np.ndarray) -> bool:
    """``out[...] = a`` by :func:`engine._kernels.layout.reverse_copy` when every volume (last
    three axes) of ``a`` is C-contiguous seen in reverse and the dtypes have a vector path;
    False (nothing written) otherwise."""
    if a.dtype.str[1:] not in _REVERSE_SOURCES or out.dtype.str[1:] not in ("f4", "u1", "u2") \
            or not a.dtype.isnative:
        return False
    volumes = [a[i].T for i in np.ndindex(a.shape[:-3])]
    if not all(m.flags.c_contiguous for m in volumes):
        return False
    from engine._kernels import layout

    if not layout.supported(a.dtype, out.dtype):
        return False
    for i, m in zip(np.ndindex(a.shape[:-3]), volumes):
        layout.reverse_copy(m, out[i])
    return True


#: dtypes (``dtype.str`` without the byte order) with a vector path in
#: :func:`engine._kernels.layout.reverse_copy` (checked before Numba is imported).
_REVERSE_SOURCES = ("u1", "i1", "u2", "i2", "i4", "u4", "f4", "f8")


#: Rows of the second-to-last axis per slab in :func:`_c_order`.
_SLAB = 2


def _to_channels_first(data: np.ndarray, chan: str | int, spatial_ndim: int | None,
                       where: str) -> np.ndarray:
    """Arrange a raw image as (C, *spatial) float32."""
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise _CaseProblem(f"{where} holds {data.dtype} values, expected real numbers; save the "
                           "image as real values (e.g. the magnitude)")
    nd = data.ndim
    if isinstance(chan, int):
        if spatial_ndim is not None and nd - 1 != spatial_ndim:
            raise _ShapeError(f"{where} has shape {data.shape} with channel axis {chan}, "
                               f"expected {spatial_ndim} spatial axes; save the image with "
                               f"{spatial_ndim} spatial axes and one channel axis")
        out = np.moveaxis(data, chan, 0)
    else:
        if spatial_ndim is None:
            spatial_ndim = nd if nd <= 3 else nd - 1
        if nd == spatial_ndim:
            out = data[None]
        elif nd == spatial_ndim + 1:
            out = np.moveaxis(data, -1, 0) if chan == "last" else data
        else:
            raise _ShapeError(f"{where} has shape {data.shape}, expected {spatial_ndim} "
                               f"spatial axes (+ 1 channel axis); save the image with "
                               f"{spatial_ndim} spatial axes and at most one channel axis")
    if out.ndim - 1 not in (1, 2, 3):
        raise _ShapeError(f"{where} has {out.ndim - 1} spatial axes (shape {data.shape}), "
                           "expected 1, 2 or 3; save the image with 1 to 3 spatial axes and at "
                           "most one channel axis")
    return _c_order(out, np.float32)


def _to_labels(mask: np.ndarray, spatial: tuple[int, ...], where: str) -> np.ndarray:
    """Arrange a raw mask as integer labels (*spatial); raise on bad values."""
    mask = np.asarray(mask)
    if mask.ndim == len(spatial) + 1 and mask.shape[:len(spatial)] == spatial:
        # channels last (RGB mask, NIfTI (X,Y,Z,1)): equal channels -> one, else any
        mask = mask[..., 0] if (mask == mask[..., :1]).all() else (mask != 0).any(-1)
    elif mask.ndim == len(spatial) + 1 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if mask.dtype.kind not in "iuf":
        raise DatasetError(f"{where} holds {mask.dtype} values, expected integer labels")
    if mask.dtype.kind == "f":
        if not np.isfinite(mask).all():
            raise DatasetError(f"{where} contains NaN or Inf, expected integer labels")
        if not (mask == np.round(mask)).all():
            return (mask != 0).astype(np.uint8)  # soft/float mask: any nonzero = foreground
    if mask.size and mask.min() < 0:
        raise DatasetError(f"{where} has negative labels (min {mask.min()}), expected "
                           "labels >= 0")
    top = mask.max() if mask.size else 0
    if top > np.iinfo(np.uint16).max:
        raise DatasetError(f"{where} has label {top}, expected labels <= 65535")
    return _c_order(mask, np.uint8 if top <= 255 else np.uint16)


# --------------------------------------------------------------------------- dataset

class _HeldFile:
    """An HDF5 file open while a batch of its cases is read (:meth:`Dataset.read_cases`):
    its datasets looked up once, and rows of numbers read with one low-level call."""

    def __init__(self, f: Any) -> None:
        self.file = f
        self._dsets: dict[str, Any] = {}

    def row(self, name: str, i: int) -> np.ndarray:
        """``np.asarray(file[name][i])``: the same array (values, dtype, shape) or error."""
        d = self._dsets.get(name)
        if d is None:
            d = self._dsets[name] = self.file[name]
        shape = d.shape
        if (d.dtype.kind not in "iuf" or d.dtype.metadata or len(shape) < 2
                or not 0 <= i < shape[0] or 0 in shape):
            return np.asarray(d[i])  # h5py's own path: strings, enums, errors, empty rows
        from h5py import h5s

        out = np.empty(shape[1:], dtype=d.dtype)
        space = d.id.get_space()
        space.select_hyperslab((i,) + (0,) * (len(shape) - 1), (1,) + tuple(shape[1:]))
        d.id.read(h5s.create_simple(tuple(shape[1:])), space, out)
        return out


class Dataset:
    """A sized, lazy iterable of :class:`Case` (see :func:`open_dataset`).

    Attributes
    ----------
    source : Path
    ids : list of str
        Case ids, in iteration order.
    has_masks : bool
        True when at least one case has a mask.
    kind : str
        ``"folder"``, ``"hdf5"``, ``"npz"`` or ``"file"``.
    volume : int or None
        The volume read from files that are time series (see :func:`open_dataset`).
    reorient : bool
        Whether 3-D cases with an affine are reoriented (see :func:`open_dataset`).
    orientation : str or None
        The axis codes they are brought to (``"RAS"``...), or the permutation of each file's
        voxel axes they are fed in (``"zyx"``), None without ``reorient``.
    channels : int or None
        The model's input channels, which decide how a non-time 4th axis is read.
    """

    def __init__(self, source: Path, kind: str, ids: list[str], *,
                 spatial_ndim: int | None, strict: bool, groups: dict[str, str],
                 images: list[ImagePath] | None = None, masks: list[Path | None] | None = None,
                 has_masks: bool = False, volume: int | None = None,
                 reorient: bool | str = False, channels: int | None = None) -> None:
        self.source = source
        self.kind = kind
        self.ids = ids
        self.spatial_ndim = spatial_ndim
        self.volume = volume
        self.orientation = _target_orientation(reorient)
        self.reorient = self.orientation is not None
        self.channels = channels
        self.strict = strict
        self.groups = groups
        self.has_masks = has_masks
        self._images = images
        self._masks = masks
        self._npz: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Case]:
        for i in range(len(self.ids)):
            yield self[i]

    def __repr__(self) -> str:
        return (f"Dataset({str(self.source)!r}, kind={self.kind!r}, cases={len(self)}, "
                f"has_masks={self.has_masks})")

    def index(self, case_id: str) -> int:
        """Position of ``case_id``; KeyError listing close ids when absent."""
        try:
            return self.ids.index(case_id)
        except ValueError:
            close = difflib.get_close_matches(str(case_id), self.ids, n=5)
            raise KeyError(f"case {case_id!r} is not in {self.source}; closest: "
                           f"{close or self.ids[:5]}") from None

    def __getitem__(self, i: int | str) -> Case:
        if isinstance(i, str):
            i = self.index(i)
        n = len(self.ids)
        if not -n <= int(i) < n:
            raise IndexError(f"case index {i} out of range for {n} cases")
        i = int(i) % n
        case_id = self.ids[i]
        group = self.groups.get(case_id)
        if self.kind in ("folder", "file"):
            assert self._images is not None and self._masks is not None
            return self._read_pair(case_id, self._images[i], self._masks[i], group)
        return self._read_array_case(i, case_id, group)

    def read_cases(self, indices: Sequence[int]) -> list[Case]:
        """``[self[i] for i in indices]``, reading an HDF5 dataset's file once for them all.

        Opening the file costs about as much as reading a 256×256 case and its mask: a batch
        opens it once instead of once per case (the other kinds read one file per case).
        The cases, their statuses and messages are those of ``self[i]``: when the file
        cannot be opened here, each case is read on its own and reports why.

        Examples
        --------
        >>> ds = open_dataset("cases.h5")  # doctest: +SKIP
        >>> [c.id for c in ds.read_cases([0, 1])] == [ds[0].id, ds[1].id]  # doctest: +SKIP
        True
        """
        indices = list(indices)
        if self.kind != "hdf5" or len(indices) < 2:
            return [self[i] for i in indices]
        import h5py

        try:
            f = h5py.File(self.source, "r")
        except Exception:  # noqa: BLE001 - each case says why, as self[i] does
            return [self[i] for i in indices]
        held = _HELD.__dict__.setdefault("files", {})
        held[id(self)] = _HeldFile(f)
        try:
            return [self[i] for i in indices]
        finally:
            held.pop(id(self), None)
            f.close()

    # ------------------------------------------------------------------ helpers
    def _bad(self, case: Case) -> Case:
        if self.strict:
            raise DatasetError(case.message)
        prefix, suffix = f"case {case.id!r}: ", "; case skipped"
        if case.message.startswith(prefix) and case.message.endswith(suffix):
            warnings.warn(CaseSkippedWarning(case.id, case.message[len(prefix):-len(suffix)]), stacklevel=3)
        else:
            warnings.warn(case.message, stacklevel=3)
        return case

    def _finish(self, case_id: str, image: np.ndarray, mask_raw: np.ndarray | None,
                group: str | None, path: str, mask_path: str | None,
                affine: np.ndarray | None = None, mask_affine: np.ndarray | None = None) -> Case:
        mask = None
        spatial = image.shape[1:]
        codes = orientation_codes(affine)
        if mask_raw is not None:
            try:
                mask = _to_labels(mask_raw, spatial, mask_path or path)
            except DatasetError as exc:
                return self._bad(Case(case_id, image, None, group, path, "mask-unreadable",
                                      f"case {case_id!r}: {exc}; case skipped", mask_path,
                                      affine, codes))
            if affine is not None and mask_affine is not None and \
                    not same_grid(affine, mask_affine):
                return self._bad(Case(
                    case_id, image, None, group, path, "grid-mismatch",
                    f"case {case_id!r}: image {path} and mask {mask_path} are on different "
                    f"grids: image {describe_grid(affine, spatial)}; mask "
                    f"{describe_grid(mask_affine, mask.shape)}; resample the mask onto the "
                    "image's grid (nearest neighbour) or fix the header that is wrong; case "
                    "skipped", mask_path, affine, codes))
            if mask.shape != spatial:
                return self._bad(Case(
                    case_id, image, None, group, path, "mask-shape-mismatch",
                    f"case {case_id!r}: mask {mask_path} has shape {mask.shape}, image "
                    f"{path} has spatial shape {spatial}; put both on one grid, or remove "
                    "the mask file; case skipped", mask_path, affine, codes))
        if self.orientation is not None and affine is not None and len(spatial) == 3:
            image, mask, affine = _reorient(image, mask, affine, self.orientation)
        return Case(case_id, image, mask, group, path, "ok", "", mask_path, affine, codes)

    def _read_channel_files(self, files: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """One case of nnU-Net's layout: its channel files (``CASE_0000``...) stacked in
        suffix order, (C, *spatial) float32, and the first file's affine. Every file must
        hold one channel on the first file's grid (shape, and affine when both have one)."""
        stack: list[np.ndarray] = []
        first_affine: np.ndarray | None = None
        for n, p in enumerate(files):
            raw, chan, affine = _read_file(p, volume=self.volume, channels=1)
            one = _to_channels_first(raw, chan, self.spatial_ndim, str(p))
            if one.shape[0] != 1:
                raise _ChannelsError(
                    f"{p} holds {one.shape[0]} channels (shape {np.shape(raw)}); in nnU-Net's layout each "
                    "file CASE_XXXX holds one channel: split it into one file per channel")
            if n == 0:
                first_affine = affine
            elif one.shape[1:] != stack[0].shape[1:] or (
                    affine is not None and first_affine is not None
                    and not same_grid(first_affine, affine)):
                def grid(a: np.ndarray | None, shape: tuple[int, ...]) -> str:
                    return describe_grid(a, shape) if a is not None else f"shape {shape}"
                raise _GridError(
                    f"channel files {files[0]} and {p} are on different grids: "
                    f"{grid(first_affine, stack[0].shape[1:])}; {grid(affine, one.shape[1:])}; resample "
                    "every channel onto the first channel's grid")
            stack.append(one)
        return np.ascontiguousarray(np.concatenate(stack, axis=0)), first_affine

    def _read_pair(self, case_id: str, image_path: ImagePath, mask_path: Path | None,
                   group: str | None) -> Case:
        files = image_path if isinstance(image_path, tuple) else None
        if files is not None:
            image_path = files[0]
        try:
            if files is not None:
                raw, affine = self._read_channel_files(files)
                chan: str | int = 0
            else:
                raw, chan, affine = _read_file(image_path, volume=self.volume, channels=self.channels)
            mask_raw = mask_affine = None
            spatial_ndim = self.spatial_ndim
            if mask_path is not None:
                try:
                    mask_raw, _, mask_affine = _read_file(mask_path, is_mask=True,
                                                          volume=self.volume)
                    mask_raw = np.asarray(mask_raw)
                except Exception as exc:  # noqa: BLE001 - any reader failure
                    if isinstance(exc, _TimeSeriesError):
                        status, message = exc.status, f"case {case_id!r}: mask {exc}; case skipped"
                    else:
                        status, message = "mask-unreadable", (
                            f"case {case_id!r}: cannot read mask {mask_path} "
                            f"({type(exc).__name__}: {_short(exc)}); case skipped")
                    return self._bad(Case(case_id, None, None, group, str(image_path), status,
                                          message, str(mask_path)))
                if spatial_ndim is None and chan in ("first", "last") and \
                        np.ndim(raw) == mask_raw.ndim + 1:
                    spatial_ndim = mask_raw.ndim  # the mask tells the spatial rank
            image = _to_channels_first(raw, chan, spatial_ndim, str(image_path))
        except Exception as exc:  # noqa: BLE001 - any reader failure becomes a status
            status, message = _skipped(case_id, str(image_path), exc)
            return self._bad(Case(case_id, None, None, group, str(image_path), status, message,
                                  None if mask_path is None else str(mask_path)))
        return self._finish(case_id, image, mask_raw, group, str(image_path),
                            None if mask_path is None else str(mask_path), affine, mask_affine)

    def _read_array_case(self, i: int, case_id: str, group: str | None) -> Case:
        where = f"{self.source}:images[{i}]"
        try:
            if self.kind == "hdf5":
                import h5py

                held = getattr(_HELD, "files", {}).get(id(self))  # read_cases: open for a batch
                if held is not None:
                    raw = held.row("images", i)
                    mask_raw = held.row("masks", i) if self.has_masks else None
                else:
                    with h5py.File(self.source, "r") as f:
                        raw = np.asarray(f["images"][i])
                        mask_raw = np.asarray(f["masks"][i]) if self.has_masks else None
            else:
                arrays = self._load_npz()
                raw = arrays["images"][i]
                mask_raw = arrays["masks"][i] if self.has_masks else None
            image = _to_channels_first(raw, "first", self.spatial_ndim, where)
        except Exception as exc:  # noqa: BLE001
            status, message = _skipped(case_id, where, exc)
            return self._bad(Case(case_id, None, None, group, where, status, message))
        return self._finish(case_id, image, mask_raw, group, where,
                            f"{self.source}:masks[{i}]" if mask_raw is not None else None)

    def _load_npz(self) -> dict[str, np.ndarray]:
        if self._npz is None:
            with np.load(self.source, allow_pickle=False) as z:
                self._npz = {k: z[k] for k in ("images", "masks") if k in z.files}
        return self._npz


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _skipped(case_id: str, where: str, exc: BaseException) -> tuple[str, str]:
    """(status, one-line message) of a case whose image could not be used."""
    if isinstance(exc, _CaseProblem):  # our own message: names the file and the fix
        return exc.status, f"case {case_id!r}: {exc}; case skipped"
    return "unreadable", (f"case {case_id!r}: cannot read {where} ({type(exc).__name__}: "
                          f"{_short(exc)}); case skipped")


def _decode(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.ravel(values)]


def _open_array_file(path: Path, *, spatial_ndim: int | None, strict: bool, masks: bool,
                     groups: Mapping[str, str] | str | os.PathLike[str] | None) -> Dataset:
    kind = "npz" if path.suffix.lower() == ".npz" else "hdf5"
    shapes: dict[str, tuple[int, ...]] = {}
    ids: list[str] | None = None
    file_groups: list[str] | None = None
    if kind == "hdf5":
        import h5py

        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise DatasetError(f"cannot open {path} as HDF5 ({_short(exc)}); expected an "
                               "HDF5 file with an 'images' dataset") from None
        with f:
            names = list(f.keys())
            for key in ("images", "masks"):
                if key in f:
                    shapes[key] = f[key].shape
            if "ids" in f:
                ids = _decode(f["ids"][()])
            if "groups" in f:
                file_groups = _decode(f["groups"][()])
            attr_nd = f["images"].attrs.get("spatial_ndim") if "images" in f else None
    else:
        try:
            z = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(f"cannot open {path} as NPZ ({_short(exc)}); expected an NPZ "
                               "file with an 'images' array") from None
        with z:
            names = list(z.files)
            for key in ("images", "masks"):
                if key in z.files:
                    shapes[key] = z[key].shape
            if "ids" in z.files:
                ids = _decode(z["ids"])
            if "groups" in z.files:
                file_groups = _decode(z["groups"])
        attr_nd = None
    if "images" not in shapes:
        raise DatasetError(f"{path} has no 'images' array (it has {names}); expected "
                           "'images' (N, [C,] *spatial), optional 'masks', 'ids', 'groups'")
    n = shapes["images"][0] if shapes["images"] else 0
    has_masks = masks and "masks" in shapes
    if has_masks and shapes["masks"][0] != n:
        raise DatasetError(f"{path} has {n} images but {shapes['masks'][0]} masks; expected "
                           "one mask per image")
    if spatial_ndim is None:
        if attr_nd is not None:
            spatial_ndim = int(attr_nd)
        elif has_masks:
            spatial_ndim = len(shapes["masks"]) - 1
        else:
            nd = len(shapes["images"]) - 1
            spatial_ndim = nd if nd <= 3 else nd - 1
    if ids is None:
        ids = [f"{i:0{len(str(max(n - 1, 0)))}d}" for i in range(n)]
    if len(ids) != n or len(set(ids)) != n:
        raise DatasetError(f"{path} 'ids' has {len(ids)} entries ({len(set(ids))} distinct), "
                           f"expected {n} distinct ids (one per image)")
    group_map = _read_groups(groups, None) if groups is not None else {}
    if file_groups is not None and groups is None:
        if len(file_groups) != n:
            raise DatasetError(f"{path} 'groups' has {len(file_groups)} entries, expected {n}")
        group_map = dict(zip(ids, file_groups))
    return Dataset(path, kind, ids, spatial_ndim=spatial_ndim, strict=strict,
                   groups=group_map, has_masks=has_masks)


def open_dataset(source: str | os.PathLike[str], *, spatial_ndim: int | None = None,
                 strict: bool = False, masks: bool = True,
                 groups: Mapping[str, str] | str | os.PathLike[str] | None = None,
                 volume: int | None = None, reorient: bool | str = False,
                 channels: int | None = None) -> Dataset:
    """Open a dataset of images (and optional masks) for scoring.

    Parameters
    ----------
    source : str or Path
        One of:

        * a **folder** of image/mask pairs — NIfTI (``.nii``, ``.nii.gz``), NRRD
          (``.nrrd``, ``.nhdr``), PNG/JPEG/TIFF or ``.npy``. Pairing rules, first match:

          1. subfolders ``images/`` and ``masks/`` (or ``labels/``,
             ``segmentations/``): files matched by stem (``a.nii.gz`` ↔ ``a.nii.gz``
             or ``a_mask.nii.gz``);
          2. one folder with ``<id>_image.*`` / ``<id>_img.*`` and ``<id>_mask.*`` /
             ``<id>_seg.*`` / ``<id>_label.*``;
          3. one folder with ``<id>.*`` and ``<id>_mask.*`` (same suffixes); an image
             without mask has ``mask=None``.

          nnU-Net's raw layout — a folder ``imagesTr``/``imagesTs`` (or a dataset folder
          holding one of them) of one file per channel, ``<id>_0000.nii.gz``,
          ``<id>_0001.nii.gz``..., with labels ``<id>.nii.gz`` in ``labelsTr``/``labelsTs``
          beside it — gives one case per id, its channel files stacked in suffix order.
          Elsewhere (``images/`` or one folder) files are so grouped only when ``channels``
          > 1, every image is named ``<id>_XXXX`` and at least two ids have exactly
          ``channels`` files each.

          Masks without an image are reported with a warning. Two images for one id
          raise. Cases are ordered by id (natural order: ``case2`` before ``case10``).
        * one **HDF5** (``.h5``, ``.hdf5``) or **NPZ** file with ``images`` (N, [C,]
          *spatial), optional ``masks`` (N, *spatial), ``ids`` and ``groups``;
        * one **image file**: a single case.
    spatial_ndim : {1, 2, 3}, optional
        Number of spatial axes, to tell a channel axis from a spatial one in ``.npy``
        and array files (e.g. a (3, H, W) array with ``spatial_ndim=2`` is 3 channels).
        Default: taken from the masks when present, else arrays of up to 3 axes are
        all spatial and a 4th axis is channels (first for ``.npy``/arrays, last for
        NIfTI/NRRD/PNG/TIFF unless the file names its channel axis).
    strict : bool, default False
        Raise :class:`DatasetError` for a case that cannot be used instead of returning
        it with a status and a warning.
    masks : bool, default True
        Read masks; False ignores them (label-free runs).
    groups : dict or path, optional
        Case id → group (subject, site), or a CSV ``id,group``. Default: ``groups.csv``
        in the folder, or the ``groups`` array of an HDF5/NPZ file.
    volume : int, optional
        The volume (time point, from 0) to read from files that are time series (see
        Notes); their mask, when it is a time series too, gives the same volume. Files
        without a time axis are read whole. Default None: a time series is skipped with
        status ``time-series`` (``protoseg score --volume T`` on the command line).
    reorient : bool or str, default False
        Bring every 3-D case whose file has an affine (NIfTI, NRRD with an anatomical
        ``space``) to RAS (True) or to the axis codes given (``"LPS"``...) before the model:
        its image and mask are flipped and their axes permuted (nibabel's
        ``io_orientation``, ``ornt_transform``, ``apply_orientation``; for RAS what
        :func:`nibabel.as_closest_canonical` does; no resampling) and ``Case.affine`` is the
        affine of the result. A permutation of ``"xyz"`` (the file's voxel axes as stored)
        instead permutes each such case's axes, no flips: ``"zyx"`` reverses them (an RAS
        file comes out SAR, an LPS file SPL), as SimpleITK and nnU-Net's default readers
        read files. Default: voxels stay in file order. ``protoseg score`` takes it from the
        model card's ``orientation`` (``--reorient``/``--no-reorient``).
    channels : int, optional
        The model's input channels (``protoseg score`` passes the card's). A NIfTI/NRRD image
        with a non-time 4th axis (or an NRRD list/vector axis beside 3 spatial axes) is read
        as channels only when ``channels`` > 1 equals that axis's length; with
        ``channels=1`` the case is skipped with status ``multi-volume`` unless ``volume``
        picks one of its volumes; another length is status ``wrong-channels``. Default
        None: such an axis holds channels, whatever its length.

    Returns
    -------
    Dataset
        Sized iterable of :class:`Case`; ``dataset[i]`` and ``dataset["id"]`` read one
        case.

    Raises
    ------
    FileNotFoundError
        ``source`` does not exist.
    DatasetError
        The source holds no images, an id has two images, or an array file lacks
        ``images`` or has inconsistent ``masks``/``ids``.
    ValueError
        ``spatial_ndim`` or ``volume`` out of range.

    Notes
    -----
    Images come out float32 ``(C, *spatial)``: RGB(A) PNG/JPEG → 3 channels (alpha
    dropped), 4-D NIfTI → last axis as channels unless the header marks it as time (below)
    or ``channels`` disagrees.
    Voxel arrays are kept in file order unless ``reorient`` is set. When the image and its
    mask both have an affine (NIfTI, NRRD), they must put their voxels at the same places
    within :data:`GRID_TOLERANCE` (direction cosines, spacing, origin; :func:`same_grid`):
    otherwise the case is skipped with status ``grid-mismatch`` and a message naming both
    grids (shape, spacing, orientation codes, origin). ``Case.affine`` maps voxel indices
    to RAS+ millimetres (NRRD's ``left-posterior-superior`` spaces are converted).

    A 4-D NIfTI is a **time series** when its 4th axis is longer than 1, its intent is not
    a channel intent (vector, displacement vector, RGB/RGBA vector, matrix, quaternion) and
    its header either gives that axis a unit (``xyzt_units``: s, ms, µs, Hz, ppm, rad/s) or
    has the intent ``time series``: the NIfTI standard puts time on the 4th axis, and
    writers that mean time set its unit. Without a unit (nibabel's default) or with a
    channel intent the 4th axis holds channels (modalities). ITK/SimpleITK write the unit s
    on every image, so a 4-D stack of modalities they wrote reads as a time series: give it
    the intent ``vector`` (nibabel: ``img.header.set_intent("vector")``). The standard
    vector layout ``(X, Y, Z, 1, V)`` is channels (its singleton 4th axis dropped), or a
    time series with the intent ``time series``. Likewise an NRRD axis of kind ``time`` and
    a TIFF axis that tifffile names ``T`` are time axes; a time axis of length 1 is dropped.
    A time series gives its volume ``volume``; without ``volume``, or with a ``volume``
    beyond its length, the case is skipped with status ``time-series`` and a message naming
    the file, its shape and its number of volumes.

    Any other 4th axis (and an NRRD list/vector axis beside three spatial axes, and the
    vector layout's ``V``) is **channels only when the model card says so** (``channels``):
    a model taking C > 1 channels reads an axis of exactly C entries as its channels; a
    model taking one channel skips the case with status ``multi-volume`` (``volume`` picks
    one of its volumes instead); any other length skips it with status
    ``wrong-channels`` and a message naming both numbers.

    Masks keep integer labels (uint8, uint16 above 255); a float mask with non-integer
    values becomes nonzero = 1. A case that cannot be read (status
    ``unreadable``/``bad-shape``), whose mask cannot be read (``mask-unreadable``), whose
    mask shape differs from the image's spatial shape (``mask-shape-mismatch``) or that is
    a time series without a usable ``volume`` (``time-series``), that has several volumes
    the model cannot take as channels (``multi-volume``, ``wrong-channels``), or whose mask
    (or one of whose channel files) lies on another grid in space (``grid-mismatch``) is
    returned with
    ``image``/``mask`` as far as read and a warning. NPZ files are loaded whole on first
    access; use HDF5 or a folder for data larger than memory.

    Examples
    --------
    >>> ds = open_dataset("data/")                      # doctest: +SKIP
    >>> for case in ds:                                 # doctest: +SKIP
    ...     if case.ok:
    ...         print(case.id, case.image.shape, case.mask is not None)
    """
    path = Path(source)
    if spatial_ndim is not None and spatial_ndim not in (1, 2, 3):
        raise ValueError(f"spatial_ndim={spatial_ndim!r}; expected 1, 2, 3 or None")
    if volume is not None and (isinstance(volume, bool) or not isinstance(volume, (int, np.integer))
                               or volume < 0):
        raise ValueError(f"volume={volume!r}; expected a non-negative integer (the time point "
                         "to read from time series) or None")
    volume = None if volume is None else int(volume)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist; pass a folder of image/mask "
                                "pairs, an HDF5/NPZ file or an image file")
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, (int, np.integer))
                                 or channels < 1):
        raise ValueError(f"channels={channels!r}; expected a positive integer (the model's input "
                         "channels) or None")
    target = _target_orientation(reorient)
    if path.is_dir():
        pairs, unmatched = _pair_folder(path, masks, channels)
        if not pairs:
            raise DatasetError(f"folder {path} holds no image files; expected "
                               f"{list(IMAGE_EXTENSIONS)} (or images/ and masks/ subfolders)")
        for m in unmatched:
            warnings.warn(f"mask {m} has no matching image (expected an image named like "
                          "it without the mask suffix); ignored", stacklevel=2)
        group_map = _read_groups(groups, path)
        return Dataset(path, "folder", [p[0] for p in pairs], spatial_ndim=spatial_ndim,
                       strict=strict, groups=group_map, images=[p[1] for p in pairs],
                       masks=[p[2] for p in pairs],
                       has_masks=any(p[2] is not None for p in pairs), volume=volume,
                       reorient=target or False, channels=channels)
    if path.suffix.lower() in _ARRAY_FILES:
        return _open_array_file(path, spatial_ndim=spatial_ndim, strict=strict, masks=masks,
                                groups=groups)
    split = _split_ext(path.name)
    if split is None:
        raise DatasetError(f"{path} is neither a folder, an HDF5/NPZ file nor an image "
                           f"({list(IMAGE_EXTENSIONS)}); pass one of those")
    group_map = _read_groups(groups, None) if groups is not None else {}
    return Dataset(path, "file", [split[0]], spatial_ndim=spatial_ndim, strict=strict,
                   groups=group_map, images=[path], masks=[None], has_masks=False,
                   volume=volume, reorient=target or False, channels=channels)
