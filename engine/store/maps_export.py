"""Saved ProtoSeg maps out of the store, as NIfTI or NRRD files that viewers overlay.

:func:`export_maps` writes, for every case with saved maps, each layer's (and saved unit's)
binary map and probability map, and the case's input, prediction and reference, as one
file each on the grid of the case's image file: with its affine, and resampled back to its
shape when the model card resized the input (binary maps and the reference nearest
neighbour, probabilities and the input linear, with :mod:`engine.resize`). ITK-SNAP and
3D Slicer then show them overlaid on the image (``docs/viewers.md``).
"""
from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import option
from engine.resize import resize_linear, resize_nearest
from engine.store.batch import CaseGrid
from engine.store.reader import Store, open_store

__all__ = ["FORMATS", "ExportedMap", "export_maps", "file_stem"]

#: Output formats and the file name ending each writes.
FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}
#: RAS+ (nibabel's world) → LPS (NRRD's ``left-posterior-superior``, ITK's world).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class ExportedMap:
    """One file :func:`export_maps` wrote.

    Attributes
    ----------
    case : str
        The case id.
    name : str
        The map's name in the store: a tensor name (``enc.conv2``, ``enc.conv2#unit3``,
        ``out[class 2]``...), or ``_image``, ``_prediction``, ``_reference``.
    kind : str
        ``"binary"``, ``"probability"``, ``"image"``, ``"prediction"`` or ``"reference"``.
    path : Path
        The file written.
    shape : tuple of int
        Its spatial shape (the image file's).
    resampled : bool
        Whether it was resampled from the model's grid to the image's.
    """

    case: str
    name: str
    kind: str
    path: Path
    shape: tuple[int, ...]
    resampled: bool


def file_stem(text: str) -> str:
    """``text`` as a portable file name part: runs of other characters than letters,
    digits, ``.``, ``_`` and ``-`` become ``_``.

    Examples
    --------
    >>> file_stem("enc/conv2#unit3[class 1]")
    'enc_conv2_unit3_class_1'
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_.")
    return stem or "map"


def _base(name: str) -> str:
    """The tensor a saved map belongs to (``enc.conv2#unit3[class 1]`` → ``enc.conv2``)."""
    return re.sub(r"\[class [^\]]*\]$", "", name).split("#unit", 1)[0]


def _choose_cases(st: Store, cases: Iterable[str] | None) -> list[str]:
    have = st.map_case_ids
    if not have:
        raise ValueError(
            f"store {st.path} has no saved maps; score again with {option('save_maps', 'ID')} "
            "(case ids, or N for the first N cases) to save the maps of the cases to look at")
    if cases is None:
        return have
    out = []
    scored = {str(c) for c in st.cases["id"]}
    for c in (str(c) for c in cases):
        if c not in have:
            close = difflib.get_close_matches(c, have, n=5) or have[:5]
            why = ("was scored but its maps were not saved" if c in scored
                   else "is not in the store")
            raise KeyError(f"case {c!r} {why}; cases with maps in {st.path}: {close}")
        if c not in out:
            out.append(c)
    return out


def _choose_layers(st: Store, map_names: set[str],
                   layers: Iterable[str] | None) -> set[str] | None:
    """The saved map names selected by ``layers`` (tensor, layer or saved map names)."""
    if layers is None:
        return None
    framework = {str(r["name"]): str(r["layer"]) for r in st.layers}
    chosen: set[str] = set()
    for want in (str(x) for x in layers):
        hit = {m for m in map_names
               if want in (m, _base(m)) or framework.get(_base(m)) == want}
        if not hit:
            tensors = sorted({_base(m) for m in map_names})
            known = tensors + sorted({framework[b] for b in tensors if framework.get(b)} - set(tensors))
            close = difflib.get_close_matches(want, known, n=5) or known[:5]
            raise KeyError(f"no saved maps of layer {want!r} in {st.path}; layers with maps: "
                           f"closest {close}")
        chosen |= hit
    return chosen


class _Writer:
    """Writes one case's arrays on its image's grid, under unique file names."""

    def __init__(self, out: Path, fmt: str, case: str, grid: CaseGrid | None, used: set[str]):
        self.out, self.fmt, self.case, self.grid, self.used = out, fmt, case, grid, used
        self.written: list[ExportedMap] = []

    def target(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.ndarray]:
        grid = self.grid
        if grid is None or len(grid.shape) != len(shape):
            return shape, np.eye(4)
        return grid.shape, np.eye(4) if grid.affine is None else grid.affine

    def put(self, name: str, kind: str, stem: str, data: np.ndarray, *, linear: bool,
            label: bool = False) -> None:
        data = np.asarray(data)
        shape, affine = self.target(tuple(data.shape))
        resampled = tuple(data.shape) != shape
        if resampled:
            data = (resize_linear(data.astype(np.float32), shape) if linear
                    else resize_nearest(data, shape))
        data, affine = _to_file_orientation(data, affine, self.grid)
        file = self._unique(f"{file_stem(self.case)}_{file_stem(stem)}")
        _write(file, data, affine, self.fmt, label=label)
        self.written.append(ExportedMap(self.case, name, kind, file, tuple(data.shape),
                                        resampled))

    def _unique(self, stem: str) -> Path:
        ext = FORMATS[self.fmt]
        name, n = stem, 1
        while name.lower() in self.used:
            n += 1
            name = f"{stem}-{n}"
        self.used.add(name.lower())
        return self.out / f"{name}{ext}"


def _to_file_orientation(data: np.ndarray, affine: np.ndarray,
                         grid: CaseGrid | None) -> tuple[np.ndarray, np.ndarray]:
    """Maps of a reoriented case (``reorient``: RAS arrays) flipped and permuted back to the
    image file's voxel order, with the affine that follows (the file's): the same places in
    space, and voxel for voxel the file's grid, as a viewer's segmentation layer wants it."""
    if (grid is None or grid.affine is None or data.ndim != 3 or not grid.file_orientation
            or grid.file_orientation == grid.orientation):
        return data, affine
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    t = ornt_transform(axcodes2ornt(tuple(grid.orientation)), axcodes2ornt(tuple(grid.file_orientation)))
    return apply_orientation(data, t), np.asarray(affine) @ inv_ornt_aff(t, data.shape)


def _write(path: Path, data: np.ndarray, affine: np.ndarray, fmt: str, *, label: bool) -> None:
    """One array as NIfTI (qform and sform: scanner, mm) or NRRD (LPS space, gzip)."""
    data = np.ascontiguousarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    elif data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)  # float16 is no NIfTI/NRRD type viewers read
    if fmt == "nifti":
        import nibabel as nib

        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        if label:
            img.header.set_intent("label")
        nib.save(img, str(path))
        return
    import nrrd

    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    nd = data.ndim
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :nd].T.copy(),
              "space origin": lps[:3, 3].copy(), "kinds": ["domain"] * nd, "encoding": "gzip"}
    nrrd.write(str(path), data, header, index_order="F")


def _labels(reference: np.ndarray, classes: list[int]) -> np.ndarray:
    """The per-class reference (K, *grid) as one label map (each class's label)."""
    ref = np.asarray(reference, dtype=bool)
    top = max([1] + [int(c) for c in classes])
    out = np.zeros(ref.shape[1:], dtype=np.uint8 if top <= 255 else np.uint16)
    for k in range(ref.shape[0]):
        out[ref[k]] = int(classes[k]) if k < len(classes) and int(classes[k]) > 0 else k + 1
    return out


def export_maps(store: str | os.PathLike[str] | Store, out_dir: str | os.PathLike[str], *,
                cases: Iterable[str] | None = None, layers: Iterable[str] | None = None,
                format: str | None = None) -> list[ExportedMap]:
    """Write the saved maps of a store as NIfTI/NRRD files on each case's image grid.

    Parameters
    ----------
    store : path or Store
        A finished store scored with ``save_maps`` (``protoseg score --maps``).
    out_dir : path
        Folder for the files (created when missing; files of the same name are replaced).
    cases : iterable of str, optional
        Case ids to export (default: every case with saved maps).
    layers : iterable of str, optional
        Tensor names, framework layer names, or saved map names (``enc.conv2#unit3``) whose
        maps to export (default: all); a tensor's name selects its saved units too. The
        case's input, prediction and reference are always written.
    format : {"nifti", "nrrd"}, optional
        Default: NRRD for cases whose image was NRRD, else NIfTI (``.nii.gz``).

    Returns
    -------
    list of ExportedMap
        Every file written, case by case.

    Raises
    ------
    ValueError
        The store has no saved maps (score again with ``save_maps``), or ``format`` is
        unknown.
    KeyError
        A case without saved maps, or a layer without saved maps (the closest names are
        listed).

    Notes
    -----
    Per case ``<case>``, with names made portable by :func:`file_stem` (``-2``... appended
    when two names collide):

    * ``<case>_<layer>.nii.gz`` — the binary map (uint8 0/1, NIfTI intent ``label``) of each
      saved layer or unit (``<layer>_unit3``; ``_class_2`` for a class of a multi-class
      model); ``<case>_<layer>_probability.nii.gz`` — its probability map (float32);
    * ``<case>_image``, ``<case>_prediction`` (one file per class, ``_class<c>``, for
      several classes) and ``<case>_reference`` (a label map of the scored classes).

    Each file lies on the image file's grid, voxel for voxel, with its affine (as the store
    recorded it in the case's :class:`CaseGrid`): maps of a case scored with ``reorient``
    (RAS arrays) are flipped and permuted back to the file's orientation. A map whose shape differs from the recorded image shape — the model card
    resized the input, or ``resize="downsample"`` kept maps on a tensor's grid — is
    resampled to it: binary maps and the reference nearest neighbour
    (:func:`engine.resize.resize_nearest`), probabilities, prediction and input linearly
    (:func:`engine.resize.resize_linear`, half-pixel centres, the inverse of how the input
    was resized). A store written before protoseg recorded grids, or a case whose image
    had no affine (PNG, ``.npy``, HDF5 arrays), is written on the maps' own grid with an
    identity affine (1 mm voxels), with a warning.

    Examples
    --------
    >>> files = export_maps("run.h5", "maps/", cases=["case7"])   # doctest: +SKIP
    >>> [f.path.name for f in files][:2]                          # doctest: +SKIP
    ['case7_enc.conv1.nii.gz', 'case7_enc.conv1_probability.nii.gz']
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format={format!r}; expected one of {sorted(FORMATS)} or None (NRRD "
                         "for NRRD images, else NIfTI)")
    st = store if isinstance(store, Store) else open_store(store)
    chosen_cases = _choose_cases(st, cases)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(st.classes)
    used: set[str] = set()
    written: list[ExportedMap] = []
    no_grid: list[str] = []
    for cid in chosen_cases:
        maps = st.maps(cid)
        grid = st.map_grid(cid)
        names = {n for n, v in maps.items() if isinstance(v, Mapping)}
        wanted = _choose_layers(st, names, layers)
        fmt = format or ("nrrd" if grid is not None and grid.format == "nrrd" else "nifti")
        if grid is None or grid.affine is None:
            no_grid.append(cid)
        w = _Writer(out, fmt, cid, grid, used)
        for name in sorted(names):
            if wanted is not None and name not in wanted:
                continue
            entry = maps[name]
            if "binary" in entry:
                w.put(name, "binary", name, entry["binary"], linear=False, label=True)
            if "probability" in entry:
                w.put(name, "probability", f"{name}_probability", entry["probability"],
                      linear=True)
        if "_image" in maps:
            w.put("_image", "image", "image", maps["_image"], linear=True)
        if "_prediction" in maps:
            pred = np.asarray(maps["_prediction"])
            for k in range(pred.shape[0]):
                stem = "prediction" if pred.shape[0] == 1 else (
                    f"prediction_class{classes[k] if k < len(classes) else k}")
                w.put("_prediction", "prediction", stem, pred[k], linear=True)
        if "_reference" in maps:
            w.put("_reference", "reference", "reference", _labels(maps["_reference"], classes),
                  linear=False, label=True)
        written.extend(w.written)
    if no_grid:
        warnings.warn(
            f"{len(no_grid)} case(s) ({', '.join(repr(c) for c in no_grid[:3])}"
            f"{' ...' if len(no_grid) > 3 else ''}) have no recorded affine (an image without "
            "one, such as PNG or .npy, or a store written before protoseg recorded grids): their "
            "maps are written on the maps' grid with an identity affine (1 mm voxels)",
            stacklevel=2)
    return written
