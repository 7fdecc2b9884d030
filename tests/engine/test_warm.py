"""engine._kernels.warm.precompile: a cold cache filled on two processes, with the signatures
a real run meets (issue 15's cold start)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# the demo in-process, then which engine kernels were loaded from Numba's cache and which compiled
_DEMO_STATS = """
import json, sys
from click.testing import CliRunner
from cli.main import cli
r = CliRunner().invoke(cli, ["demo", "-o", sys.argv[1], "-q", "--json"])
assert r.exit_code == 0, r.output
from numba.core.registry import CPUDispatcher
out = {}
for m in list(sys.modules):
    if m.startswith("engine._kernels"):
        for name, obj in vars(sys.modules[m]).items():
            if isinstance(obj, CPUDispatcher) and obj.signatures:
                out[m + "." + name] = [sum(obj.stats.cache_hits.values()), sum(obj.stats.cache_misses.values())]
print(json.dumps(out))
"""


def _run(code: str, cache: Path, *args: str) -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout


@pytest.mark.slow
def test_after_precompile_the_demo_compiles_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "numba"
    said = _run("from engine._kernels.warm import precompile, cache_is_cold; "
                "print(cache_is_cold(), precompile(), cache_is_cold(), precompile())", cache)
    assert said.split() == ["True", "True", "False", "False"]  # cold, filled, then warm: skipped
    stats = json.loads(_run(_DEMO_STATS, cache, str(tmp_path / "demo")).strip().splitlines()[-1])
    assert "engine._kernels.channels_last.weights_range" in stats  # the demo's kernels were seen
    compiled = {k: v for k, v in stats.items() if v[1]}
    assert not compiled, f"compiled by the demo after precompile: {compiled}"


def test_without_a_second_interpreter_this_process_compiles_its_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine._kernels import warm

    calls = []
    monkeypatch.setattr(warm, "cache_is_cold", lambda: True)
    monkeypatch.setattr(warm, "_group_main", lambda: calls.append("main"))
    monkeypatch.setattr(warm.sys, "executable", "/nonexistent/python")
    assert warm.precompile() is True
    assert calls == ["main"]


def test_a_warm_cache_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine._kernels import warm

    monkeypatch.setattr(warm, "cache_is_cold", lambda: False)
    monkeypatch.setattr(warm, "_group_main", lambda: pytest.fail("compiled on a warm cache"))
    assert warm.precompile() is False


# the identity-grid guide weights compiled into the cache (the kernel cache_is_cold looks at),
# then the question asked as if a kernel source had changed since (another digest in the
# stamp) and as it is
_FILL_WEIGHTS = """
from engine._kernels.warm import _tiny
from engine._kernels import channels_last as cl
from engine.scores import _prepare
f, g = _tiny(True)
p = _prepare(f, g, g > 0.5, None, resize="upsample", layout="channels_last")
cl.guide_weights(p.g, p.m, p.has_mask, p.identity, p.src, p.weights)
"""
_COLD_AFTER_CHANGE = """
import sys
import engine._kernels._cache as stamp
if sys.argv[1] == "changed":
    stamp.sources_digest = lambda: b"a kernel source changed"
from engine._kernels.warm import cache_is_cold
print(cache_is_cold())
"""


@pytest.mark.slow
def test_a_cache_filled_before_a_source_change_is_cold(tmp_path: Path) -> None:
    cache = tmp_path / "numba"
    assert _run(_COLD_AFTER_CHANGE, cache, "same").split() == ["True"]  # nothing there yet
    _run(_FILL_WEIGHTS, cache)
    assert _run(_COLD_AFTER_CHANGE, cache, "same").split() == ["False"]
    assert _run(_COLD_AFTER_CHANGE, cache, "changed").split() == ["True"]  # precompile runs again
