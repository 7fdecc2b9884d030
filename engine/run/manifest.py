"""What a dataset holds, so that a resumed run compares data, not how its path was spelled.

:func:`dataset_manifest` lists the cases a run scores and fingerprints their files:

- a **folder** (or a single image file): per case, its image and mask files, each as
  ``[name relative to the dataset root, size in bytes, content digest]``;
- one **HDF5/NPZ** file: the case ids and the file's ``[name, size, digest]``;
- an **in-memory** dataset (any object with ``ids`` and ``__getitem__``): the case ids only.

The content digest is the sha256 (first 16 hex digits) of the whole file up to
:data:`WHOLE_FILE` bytes, else of its first and last :data:`EDGE` bytes and its size:
cheap on large volumes, robust to copies (modification times are not used; they change
when data is copied), and it catches a regenerated file (a gzip stream ends in the CRC
of its content). An edit confined to the middle of a large uncompressed file, keeping its
size, goes unnoticed.

The store's configuration holds :meth:`DatasetManifest.config` — the kind, the number of
cases, a digest of the ids and the fingerprint — and resume compares it; the resolved
path is provenance. The whole manifest is kept in ``<store>.parts/dataset.json`` so that
a refused resume can say which cases were added or removed and which files changed
(:func:`engine.store.runinfo.dataset_difference`).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DatasetManifest", "dataset_manifest", "file_digest", "WHOLE_FILE", "EDGE",
           "MANIFEST_TYPE"]

#: Files up to this size are hashed whole.
WHOLE_FILE = 1 << 20
#: Bytes hashed at each end of a larger file (with its size).
EDGE = 64 << 10
#: ``encoding-type`` of ``dataset.json``.
MANIFEST_TYPE = "protoseg-dataset-manifest"


def file_digest(path: Path, size: int | None = None) -> str:
    """sha256 (16 hex digits) of a file's content, or of its ends and size when large."""
    size = path.stat().st_size if size is None else size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= WHOLE_FILE:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"size={size};".encode())
            h.update(fh.read(EDGE))
            fh.seek(size - EDGE)
            h.update(fh.read(EDGE))
    return h.hexdigest()[:16]


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class DatasetManifest:
    """The cases of a run's dataset and fingerprints of their files.

    Attributes
    ----------
    kind : str
        ``"folder"``, ``"file"``, ``"hdf5"``, ``"npz"`` or ``"memory"``.
    path : str or None
        Resolved absolute path of the folder or file (None in memory); provenance only.
    ids : tuple of str
        The scored cases, in dataset order.
    files : tuple
        Folder/file kinds: per case, a tuple of ``(relative name, size, digest)`` for its
        image and its mask. HDF5/NPZ: one entry holding the file's ``(name, size,
        digest)``. In memory: empty.
    type_name : str
        The dataset object's class (how older protoseg versions named in-memory data).
    """

    kind: str
    path: str | None
    ids: tuple[str, ...]
    files: tuple[tuple[tuple[str, int, str], ...], ...]
    type_name: str = ""

    @property
    def ids_digest(self) -> str:
        return _digest(list(self.ids))

    @property
    def fingerprint(self) -> str:
        """Digest of the kind, the ids and every file's size and content digest.

        File *names* count for folders (they make the ids and pair masks), not for a
        single HDF5/NPZ file, which may be renamed or copied freely.
        """
        files = [list(map(list, entry)) for entry in self.files]
        if self.kind in ("hdf5", "npz"):
            files = [[[size, digest] for _, size, digest in entry] for entry in self.files]
        return _digest([self.kind, list(self.ids), files])

    def config(self) -> dict[str, Any]:
        """What the store's configuration holds (compared when a run is resumed)."""
        return {"kind": self.kind, "cases": len(self.ids), "ids_sha256": self.ids_digest,
                "fingerprint": self.fingerprint}

    def as_json(self) -> dict[str, Any]:
        """The content of ``<store>.parts/dataset.json``."""
        return {"encoding-type": MANIFEST_TYPE, "encoding-version": "1", "kind": self.kind,
                "path": self.path, "type": self.type_name, "ids": list(self.ids),
                "files": [[list(f) for f in entry] for entry in self.files],
                **self.config()}


def _resolved(path: Any) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _entry(path: Path, root: Path) -> tuple[str, int, str]:
    """``(name relative to root, size, digest)``; the dataset lists its files under its root."""
    size = path.stat().st_size
    try:
        name = path.relative_to(root).as_posix()
    except ValueError:
        name = path.name
    return name, int(size), file_digest(path, size)


def dataset_manifest(dataset: Any, n_cases: int | None = None) -> DatasetManifest:
    """The manifest of the first ``n_cases`` cases (default all) of an opened dataset.

    Parameters
    ----------
    dataset : Dataset, DatasetManifest, path or in-memory dataset
        What :func:`engine.run.plan.open_data` returned (a ready manifest is returned as is;
        a path is opened first).
    n_cases : int, optional
        How many cases the run scores (``max_cases``); the rest are not read.

    Raises
    ------
    OSError
        A listed file cannot be read (it vanished, or permissions).
    """
    if isinstance(dataset, DatasetManifest):
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        from engine.datasets import open_dataset

        dataset = open_dataset(dataset)
    ids: Sequence[Any] = list(dataset.ids)
    n = len(ids) if n_cases is None else min(len(ids), int(n_cases))
    case_ids = tuple(str(c) for c in ids[:n])
    name = type(dataset).__name__
    source = getattr(dataset, "source", None)
    kind = getattr(dataset, "kind", None)
    images = getattr(dataset, "_images", None)
    masks = getattr(dataset, "_masks", None)
    if source is None or kind is None:
        return DatasetManifest("memory", None, case_ids, (), name)
    src = _resolved(source)
    if kind in ("folder", "file") and images is not None:
        root = Path(source) if kind == "folder" else Path(source).parent
        masks = masks if masks is not None else [None] * len(images)
        files = tuple(
            tuple(_entry(Path(p), root) for p in (*(images[i] if isinstance(images[i], tuple)
                                                      else (images[i],)), masks[i]) if p is not None)
            for i in range(n))
        return DatasetManifest(str(kind), str(src), case_ids, files, name)
    if kind in ("hdf5", "npz") or Path(source).is_file():
        path = Path(source)
        return DatasetManifest(str(kind), str(src), case_ids, ((_entry(path, path.parent),),), name)
    return DatasetManifest("memory", str(src), case_ids, (), name)
