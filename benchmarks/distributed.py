"""Dask benchmark: the same dataset scored in one process, on ``local:1`` and on ``local:2``.

Run as a module (from the repository root)::

    python -m benchmarks.distributed [--cases N] [--size S] [--levels L] [--batch B]
        [--chunk C] [--repeat R] [--json PATH]

Workload: :func:`tests.models.deep_unet` (2-D, two convs per block, block outputs exposed
as an exporter names them), ``N`` images of ``S``×``S`` with one blob and its mask in one
HDF5 file, ``level="layer"``, batch ``B``. Three methods, interleaved (a, b, c, a, b, c...)
because the machine is shared, each a fresh store (``overwrite=True``); the figure is the
median over repeats after one untimed warm-up round:

(a) ``single``: :func:`engine.run.score_dataset` in this process (onnxruntime and Numba on
    every core);
(b) ``local:1``: one worker process with every core (its core share), through
    ``client=`` — the Dask overhead at equal cores;
(c) ``local:2``: two single-threaded worker processes, one core each.

(b) and (c) reuse a cluster started once (its start-up time is reported apart, as
``start_s``); each run includes registering the plan plugin (the workers build their plan
and warm the kernels), scoring the chunks into shards, and the client's merge into the
store. Every cluster store is checked equal to the single-process one (scores, statuses).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def _data(path: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 2, indexing="ij"))
    with h5py.File(path, "w") as f:
        images = f.create_dataset("images", (n, size, size), np.float32)
        masks = f.create_dataset("masks", (n, size, size), np.uint8)
        for i in range(n):
            c = rng.uniform(-0.3, 0.3, 2)
            m = np.sqrt(((grid - c.reshape(2, 1, 1)) ** 2).sum(0)) < rng.uniform(0.3, 0.6)
            masks[i] = m
            images[i] = m + 0.3 * rng.standard_normal(m.shape)
    return path


def _cluster(n: int):
    import dask
    import distributed

    from engine.run.distributed import _usable_cpus

    share = max(1, _usable_cpus() // n)
    settings = {"distributed.nanny.pre-spawn-environ": {"NUMBA_NUM_THREADS": str(share)},
                "distributed.scheduler.worker-saturation": 1.0}
    t = time.perf_counter()
    with dask.config.set(settings):
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           host="127.0.0.1", dashboard_address=None)
    client = distributed.Client(cluster)
    return cluster, client, time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import engine
    from engine.run import score_dataset
    from tests import models

    tmp = Path(tempfile.mkdtemp(prefix="protoseg-bench-dask-"))
    try:
        model = models.save(models.deep_unet(levels=args.levels, base=16, size=args.size),
                            tmp / "unet.onnx")
        data = _data(tmp / "data.h5", args.cases, args.size)
        clusters = {name: _cluster(n) for name, n in (("local:1", 1), ("local:2", 2))}
        kw = dict(batch_size=args.batch, level="layer", overwrite=True)

        def run(name: str) -> float:
            out = tmp / f"{name.replace(':', '')}.h5"
            t = time.perf_counter()
            if name == "single":
                score_dataset(model, data, out, **kw)
            else:
                score_dataset(model, data, out, client=clusters[name][1], chunk_size=args.chunk, **kw)
            return time.perf_counter() - t

        names = ["single", "local:1", "local:2"]
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.repeat + 1):
            for n in names:
                dt = run(n)
                if r:
                    times[n].append(dt)
        ref = engine.open_store(tmp / "single.h5").layer_scores()
        for n in names[1:]:
            got = engine.open_store(tmp / f"{n.replace(':', '')}.h5").layer_scores()
            assert all(np.array_equal(ref[k], got[k], equal_nan=True) for k in ref), n
        med = {n: statistics.median(v) for n, v in times.items()}
        result = {
            "workload": vars(args) | {"json": None},
            "seconds": {n: [round(t, 3) for t in v] for n, v in times.items()},
            "median_s": {n: round(v, 3) for n, v in med.items()},
            "cases_per_s": {n: round(args.cases / v, 2) for n, v in med.items()},
            "dask_overhead_equal_cores": round(med["local:1"] / med["single"] - 1, 3),
            "local2_vs_single": round(med["single"] / med["local:2"], 3),
            "speedup_1_to_2_workers": round(med["local:1"] / med["local:2"], 3),
            "start_s": {n: round(c[2], 2) for n, c in clusters.items()},
            "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
        }
        for cluster, client, _ in clusters.values():
            client.close()
            cluster.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
