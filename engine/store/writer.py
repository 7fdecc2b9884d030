"""The store writer: every batch published as its own part file; resume; finalize.

Every finished batch (a :class:`~engine.store.BatchResult`) is written as a small HDF5
*part* in ``<store>.parts/`` under a temporary name, flushed, fsync'ed and
``os.replace``d into place, so a run killed at any moment (SIGKILL included) leaves only
complete parts behind. Resuming reads ``run.json``, refuses other settings (naming each
one) and skips the cases already published; :meth:`StoreWriter.finalize` assembles the
parts into the store (:func:`engine.store.merge.assemble`).
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from engine.errors import option
from engine.store.atomic import StoreLock, publish, write_json_atomic
from engine.store.batch import SCORE_FIELDS, BatchResult, CaseGrid
from engine.store.encoding import (
    PART_TYPE,
    key_name,
    require_group,
    require_parent,
    set_encoding,
    write_array,
)
from engine.store.errors import (
    StoreConfigError,
    StoreExistsError,
    StoreVersionError,
    WriteContext,
)
from engine.store import merge as _merge
from engine.store.merge import (
    OPTIONAL_ROWS,
    assemble,
    collect_schema,
    list_part_files,
    read_part_ids,
    source_bytes,
    written_source,
)
from engine.store.runinfo import (
    RunInfo,
    config_difference,
    make_run,
    parts_dir,
    read_manifest,
    read_run,
    run_attr_texts,
    run_of_file,
    write_run_attrs,
)

__all__ = ["StoreWriter"]

#: Writers of this process by store path: a new writer on the same store closes the old
#: one (whose writes are then refused) instead of failing on its own lock.
_WRITERS: dict[str, weakref.ref[StoreWriter]] = {}


def _arrays(result: BatchResult) -> dict[str, np.ndarray]:
    """Store path → array for every per-case field of a (validated) batch."""
    out: dict[str, np.ndarray] = {
        "cases/id": np.array(result.case_ids, dtype=object),
        "cases/index": np.asarray(result.case_index).astype(np.int64, copy=False),
        "cases/status": np.array(result.case_status, dtype=object),
        "cases/group": np.array(result.case_group, dtype=object),
        "output_dice": np.asarray(result.output_dice).astype(np.float64, copy=False),
    }
    blocks = [("layer_scores", result.layer)]
    blocks += [(f"unit_scores/{int(li)}", blk) for li, blk in sorted(result.units.items())]
    if result.input is not None:
        blocks.append(("input_scores", result.input))
    if result.label_free is not None:
        blocks.append(("label_free_scores", result.label_free))
    for prefix, block in blocks:
        for field, arr in block.items():
            out[f"{prefix}/{field}"] = np.asarray(arr).astype(SCORE_FIELDS[field], copy=False)
    for name, arr in result.baselines.items():
        out[f"baselines/{key_name(name)}"] = np.asarray(arr).astype(np.float64, copy=False)
    out.update(_grid_rows(result))
    return out


def _grid_rows(result: BatchResult) -> dict[str, np.ndarray]:
    """Every case's affine (NaN where unknown: PNG, ``.npy``, arrays, a case without a
    :class:`CaseGrid`), the orientation its arrays were scored in and its file's."""
    n = len(result.case_ids)
    affine = np.full((n, 4, 4), np.nan)
    used, source = [""] * n, [""] * n
    for i, cid in enumerate(result.case_ids):
        grid = result.grids.get(cid)
        if grid is None:
            continue
        if grid.affine is not None:
            affine[i] = grid.affine
        used[i], source[i] = str(grid.orientation), str(grid.file_orientation)
    return {"cases/affine": affine, "cases/orientation": np.array(used, dtype=object),
            "cases/file_orientation": np.array(source, dtype=object)}


def _write_maps(root: h5py.Group, maps: Mapping[str, Mapping[str, Any]],
                w: WriteContext, grids: Mapping[str, CaseGrid] | None = None) -> None:
    """One ``case-maps`` group per case (attribute ``grid`` when the case's grid is known);
    ProtoSeg maps as ``layer-maps`` groups."""
    coll = require_group(root, "maps", "map-collection")
    for case_id, entries in maps.items():
        w.key = f"maps/{case_id}"
        grp = coll.create_group(key_name(str(case_id)))
        set_encoding(grp, "case-maps")
        grp.attrs["case_id"] = str(case_id)
        grid = (grids or {}).get(str(case_id))
        if grid is not None:
            grp.attrs["grid"] = grid.to_json()
        for name, value in entries.items():
            w.key = f"maps/{case_id}/{name}"
            if isinstance(value, Mapping):
                sub = grp.create_group(key_name(str(name)))
                set_encoding(sub, "layer-maps")
                sub.attrs["name"] = str(name)
                for field, arr in value.items():
                    arr = np.asarray(arr)
                    if field == "binary":
                        arr = arr.astype(np.uint8)
                    elif arr.dtype.kind == "f" and arr.dtype not in (np.float16, np.float32):
                        arr = arr.astype(np.float32)
                    w.key = f"maps/{case_id}/{name}/{field}"
                    dset = write_array(sub, key_name(str(field)), arr)
                    dset.attrs["name"] = str(field)
            else:
                dset = write_array(grp, key_name(str(name)), np.asarray(value))
                dset.attrs["name"] = str(name)


class StoreWriter:
    """Write a store batch by batch, crash-safe and resumable.

    Parameters
    ----------
    path : str or Path
        The final store file (e.g. ``results.h5``). Parts go to ``<path>.parts/``.
    config : dict
        Every setting that changes numbers (guide, reference, resize, threshold, layers
        selection, level, model sha256...). Compared on resume. JSON-serialisable.
    layers : list of dict
        One dict per scored tensor, in index order, with keys ``index, name, layer, op,
        channels, depth, shape`` (``channels`` is the unit count of unit scores).
    classes : list of int
        The class labels scored one-vs-rest (``n_classes`` axis of every score array).
    resume : bool, default False
        Continue an unfinished (or extend a finished) run with the same settings.
    overwrite : bool, default False
        Delete an existing store and unfinished run at ``path`` and start over.
    manifest : dict, optional
        The dataset manifest (:meth:`engine.run.manifest.DatasetManifest.as_json`), kept
        as ``<path>.parts/dataset.json``: when ``config["dataset"]`` differs on resume, the
        message names the cases added or removed and the files changed. With it, a store
        whose ``config["dataset"]`` is the path an older protoseg recorded is resumed when
        that path resolves to ``manifest["path"]`` (the old description is kept).

    Raises
    ------
    StoreExistsError
        A store or unfinished run exists and neither ``resume`` nor ``overwrite`` is set,
        or another process writes the same store.
    StoreConfigError
        ``resume=True`` on a store made with other settings (the message names each
        differing key); pass ``overwrite=True`` or another path.
    StoreVersionError
        The existing store or run was written by a newer protoseg.
    StoreWriteError
        The store's folder cannot be written (read-only, full); nothing is left there.

    Notes
    -----
    A part is published with ``os.replace`` after it is fully written and fsync'ed, so
    after any crash each part file is either complete or absent. On resume, part files
    that cannot be read are discarded (with a warning) and their cases are reported as
    not done, so the caller scores them again. Batches need not arrive in case order:
    :meth:`finalize` writes cases in the order of their ``case_index``.

    Examples
    --------
    >>> w = StoreWriter("out.h5", config={"resize": "upsample"},
    ...                 layers=[{"name": "conv1", "channels": 8}],
    ...                 classes=[1])                                  # doctest: +SKIP
    >>> for result in results:                  # BatchResult per batch  # doctest: +SKIP
    ...     w.write_batch(result)
    >>> w.finalize({"protoseg": "0.1.0"})                             # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], *, config: Mapping[str, Any],
                 layers: list[Mapping[str, Any]], classes: list[int], resume: bool = False,
                 overwrite: bool = False, manifest: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.parts = parts_dir(self.path)
        self.run: RunInfo = make_run(config, layers, classes)
        self.manifest = dict(manifest) if manifest is not None else None
        self._done: dict[str, Path] = {}
        self._store_ids: set[str] = set()
        self._next = 0
        self._closed = False
        self._schema: dict[str, tuple[int, ...]] | None = None
        self._run_texts: tuple[RunInfo, tuple[tuple[str, str], ...]] | None = None
        #: The parts this writer published, described for finalize (no second read of
        #: them), their rows held while they fit the assembly's memory budget.
        self._written: dict[Path, Any] = {}
        self._held = 0
        self._lock = StoreLock(self.path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"folder {self.path.parent} of store {self.path} does not "
                                    "exist; create it or choose another output")
        self._take_lock()
        try:
            self._open(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> None:
        """Hold the store's lock (released by the OS on any exit).

        Another process writing the same store is refused. In this process, a writer
        left alive (e.g. held by a traceback) is closed and replaced.
        """
        key = str(self.path.resolve())
        previous = _WRITERS.get(key)
        if previous is not None and previous() is not None:
            previous().close()  # type: ignore[union-attr]  # same process: take over
        self._lock.acquire(advice=f"wait for it to finish, or choose another output "
                                  f"({option('store', 'PATH')})")
        _WRITERS[key] = weakref.ref(self)

    def close(self) -> None:
        """Release the store's lock without finalizing (parts stay; resume later)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release(remove=False)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _open(self, resume: bool, overwrite: bool) -> None:
        self._cleanup_temps()
        has_store, has_parts = self.path.exists(), self.parts.exists()
        if overwrite:
            if has_parts:
                shutil.rmtree(self.parts)
            if has_store:
                self.path.unlink()
            has_store = has_parts = False
        if (has_store or has_parts) and not resume:
            what = "a store" if has_store else "an unfinished run"
            raise StoreExistsError(
                f"{what} exists at {self.path if has_store else self.parts}; pass "
                f"{option('resume')} to continue it, choose another output "
                f"({option('store', 'PATH')}), or {option('overwrite')} to delete it and start over")
        if has_store:
            try:
                old = run_of_file(self.path)
                store_ids = read_part_ids(self.path)[0]
            except StoreVersionError:
                raise
            except Exception as exc:  # noqa: BLE001 - not a readable store
                raise StoreExistsError(
                    f"{self.path} exists but is not a readable protoseg store "
                    f"({type(exc).__name__}: {exc}); choose another output "
                    f"({option('store', 'PATH')}), or {option('overwrite')} to delete it and "
                    "start over") from None
            self._store_ids = set(store_ids)
            self._compare(old, old_ids=store_ids)
        if has_parts and (self.parts / "run.json").exists():
            old = read_run(self.parts / "run.json")
            self._compare(old, old_manifest=read_manifest(self.parts / "dataset.json"))
            self._scan_parts()
        else:
            self.parts.mkdir(exist_ok=True)
            write_json_atomic(self.parts / "run.json", self.run.as_json())
            if self.manifest is not None:
                write_json_atomic(self.parts / "dataset.json", self.manifest)

    def _compare(self, old: RunInfo, *, old_manifest: Mapping[str, Any] | None = None,
                 old_ids: list[str] | None = None) -> None:
        """Refuse a run description with other settings or data; adopt an equivalent one.

        An older store's description may name the same data differently (its path as
        typed): the old description is kept, so that every part and the store agree.
        """
        diff = config_difference(self.path, old, self.run, old_manifest=old_manifest,
                                 new_manifest=self.manifest, old_ids=old_ids)
        if diff:
            raise StoreConfigError(diff)
        if old != self.run:
            self.run = old

    # ---------------------------------------------------------------- state
    def _cleanup_temps(self) -> None:
        for tmp in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            tmp.unlink(missing_ok=True)
        if self.parts.is_dir():
            for tmp in self.parts.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)

    def _scan_parts(self) -> None:
        for part in list_part_files(self.parts):
            match = re.match(r"part-(\d+)", part.name)
            seq = int(match.group(1)) if match else 0
            self._next = max(self._next, seq + 1)
            try:
                ids, _ = read_part_ids(part)
            except Exception as exc:  # noqa: BLE001 - any damage: discard, redo cases
                warnings.warn(f"discarding damaged part {part} ({type(exc).__name__}: {exc}); "
                              "its cases will be scored again", stacklevel=3)
                part.unlink(missing_ok=True)
                continue
            if self._store_ids and set(ids) <= self._store_ids:
                part.unlink(missing_ok=True)  # already copied into the store
                continue
            clash = [c for c in ids if c in self._done or c in self._store_ids]
            if clash:
                raise ValueError(f"part {part} repeats case(s) {clash[:5]} already in "
                                 f"{self._done.get(clash[0], self.path)}; remove one of them, "
                                 f"or {option('overwrite')} to delete the finished work and start "
                                 "over")
            for c in ids:
                self._done[c] = part
            if self._schema is None:
                self._schema = {k: v[1] for k, v in collect_schema(part).items()}

    def done_ids(self) -> set[str]:
        """Return the ids of the cases already published (in parts or the final store)."""
        return set(self._done) | self._store_ids

    # ---------------------------------------------------------------- writing
    def write_batch(self, result: BatchResult) -> Path:
        """Publish one batch as a part file; return the part's path.

        Parameters
        ----------
        result : BatchResult
            What the batch produced (see :class:`engine.store.BatchResult`); checked with
            :meth:`BatchResult.validate` against this writer's layers and classes.

        Raises
        ------
        ValueError, TypeError
            A field's type, shape or dtype does not fit the store, the batch holds other
            arrays than the earlier ones (e.g. input SA in one batch only), or a case id
            was written before.
        StoreWriteError
            The part could not be written (e.g. disk full); the message names the file and
            the key. Parts published before are kept; nothing half-written remains.
        """
        if self._closed or not self._lock.held:
            raise ValueError(f"StoreWriter for {self.path} is finalized or closed; open a new "
                             "StoreWriter with resume=True to add cases")
        if not isinstance(result, BatchResult):
            raise TypeError(f"write_batch takes an engine.store.BatchResult, got "
                            f"{type(result).__name__}; build one per batch (ScoreBlock.empty "
                            "for the score arrays)")
        result.validate(classes=self.run.classes, layers=self.run.layers)
        arrays = _arrays(result)
        if self._schema is not None:  # parts of an older protoseg lack the per-case grids
            for key in OPTIONAL_ROWS:
                if key not in self._schema:
                    arrays.pop(key, None)
        schema = {k: v.shape[1:] for k, v in arrays.items() if k != "cases/index"}
        if self._schema is not None and schema != self._schema:
            extra = sorted(set(schema) - set(self._schema))
            lacking = sorted(set(self._schema) - set(schema))
            shapes = sorted(k for k in set(schema) & set(self._schema)
                            if schema[k] != self._schema[k])
            raise ValueError(
                f"batch does not match the earlier batches of {self.path}: new arrays "
                f"{extra[:5]}, missing arrays {lacking[:5]}, other shapes {shapes[:5]}; every "
                "batch of a store holds the same arrays")
        again = [c for c in result.case_ids if c in self._done or c in self._store_ids]
        if again:
            raise ValueError(f"case(s) {again[:5]} are already in store {self.path}; skip "
                             "the ids in done_ids() when resuming")
        final = self.parts / f"part-{self._next:06d}.h5"
        self._write_part(final, arrays, result.maps, result.grids)
        self._next += 1
        self._schema = schema
        for c in result.case_ids:
            self._done[c] = final
        return final

    def _write_part(self, final: Path, arrays: Mapping[str, np.ndarray],
                    maps: Mapping[str, Mapping[str, Any]],
                    grids: Mapping[str, CaseGrid] | None = None) -> None:
        """Write a part under a temporary name, then publish it as ``final``."""
        tmp = self.parts / f".{final.name}.tmp-{os.getpid()}"
        w = WriteContext(final)
        with w.raising(cleanup=tmp):
            with h5py.File(tmp, "w") as f:
                set_encoding(f, PART_TYPE)
                f.attrs["complete"] = 0
                if self._run_texts is None or self._run_texts[0] is not self.run:
                    self._run_texts = (self.run, run_attr_texts(self.run))
                write_run_attrs(f, self.run, self._run_texts[1])  # the same text in every part
                groups: dict[str, h5py.Group] = {}
                for key in sorted(arrays):
                    w.key = key
                    grp, leaf = require_parent(f, key, groups)
                    # parts are short-lived and finalize compresses the store: small
                    # per-batch score arrays are written raw (gzip cost ~10 % of inference
                    # time at unit level in the pipeline benchmark)
                    write_array(grp, leaf, arrays[key], compress=False)
                if maps:
                    _write_maps(f, maps, w, grids)
                w.key = "/"
                f.attrs["complete"] = 1
            publish(tmp, final)
        budget = _merge._COPY_BYTES  # the rows assemble() may hold (read at call time: tests lower it)
        src = written_source(final, arrays, has_maps=bool(maps), keep_rows=self._held < budget)
        size = source_bytes(src)
        if size > budget - self._held:
            src = written_source(final, arrays, has_maps=bool(maps), keep_rows=False)
            size = 0
        self._held += size
        self._written[final] = src

    def finalize(self, provenance: Mapping[str, Any]) -> Path:
        """Copy all parts (in case order) into the final store; remove the parts.

        Parameters
        ----------
        provenance : dict
            Model sha256, protoseg version, provider, optimisation level, start and end
            times... Stored as JSON; not compared on resume.

        Returns
        -------
        Path
            The store file.

        Notes
        -----
        When a finished store already exists (resume of a finished run), its cases are
        copied first and the new parts added; with no new parts the store is left as is.
        """
        if self._closed:
            return self.path
        if not self._lock.held:
            raise ValueError(f"StoreWriter for {self.path} was closed; open a new StoreWriter "
                             "with resume=True to finalize")
        parts = list_part_files(self.parts) if self.parts.is_dir() else []
        if self.path.exists() and not parts:
            self._closed = True
            shutil.rmtree(self.parts, ignore_errors=True)
            self._lock.release(remove=True)
            return self.path
        sources = ([self.path] if self.path.exists() else []) + parts
        assemble(sources, self.run, self.path, dict(provenance), known=self._written)
        for part in parts:
            part.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)
        self._closed = True
        self._lock.release(remove=True)
        return self.path
