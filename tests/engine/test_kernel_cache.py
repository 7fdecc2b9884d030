"""A cached kernel goes stale when a module it calls changes (engine/_kernels/_cache.py).

Two throw-away modules stand in for the kernels: ``caller.f`` (``cache=True``) calls
``callee.g``; between two fresh interpreters sharing one Numba cache folder only ``callee.py``
changes. Under the stamped locators (the folder registered as a kernel tree) the second run
recompiles and sees the change, and a third run loads it from the cache; under Numba's own
locators the second run loads the old code from the cache, which is what the stamp prevents.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine._kernels import _cache

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import json, pathlib, sys
sys.path.insert(0, sys.argv[1])
import engine._kernels  # installs the stamped locators
from engine._kernels import _cache
if sys.argv[2] == "stamped":
    _cache._TREES.append(pathlib.Path(sys.argv[1]) / "kpkg")
from kpkg.caller import f
value = f()
print(json.dumps({"value": value, "hits": len(f.stats.cache_hits), "misses": len(f.stats.cache_misses),
                  "locator": type(f._cache._impl.locator).__name__}))
"""

_CALLER = "from numba import njit\nfrom kpkg.callee import g\n\n\n@njit(cache=True)\ndef f():\n    return g() + 0\n"
_CALLEE = "from numba import njit\n\n\n@njit(cache=True)\ndef g():\n    return {}\n"


def _package(tmp: Path) -> Path:
    pkg = tmp / "kpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "caller.py").write_text(_CALLER)
    (pkg / "callee.py").write_text(_CALLEE.format(1))
    return pkg


def _run(tmp: Path, mode: str) -> dict[str, object]:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp / f"cache-{mode}"), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp), mode], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["stamped", "numba"])
def test_a_change_to_a_called_module_recompiles_the_caller(tmp_path, mode):
    pkg = _package(tmp_path)
    first = _run(tmp_path, mode)
    assert first["value"] == 1 and first["misses"] == 1
    (pkg / "callee.py").write_text(_CALLEE.format(2))  # caller.py unchanged
    second = _run(tmp_path, mode)
    if mode == "stamped":
        assert first["locator"] == "KernelUserProvidedCacheLocator"
        assert second["value"] == 2 and second["misses"] == 1  # recompiled with the new callee
        third = _run(tmp_path, mode)
        assert third["value"] == 2 and third["hits"] == 1  # and cached again
    else:  # Numba's own stamp: the caller's file is unchanged, its old code is loaded
        assert first["locator"] == "UserProvidedCacheLocator"
        assert second["value"] == 1 and second["hits"] == 1


def test_the_digest_follows_every_source(tmp_path, monkeypatch):
    pkg = _package(tmp_path)
    monkeypatch.setattr(_cache, "_TREES", [pkg])
    monkeypatch.setattr(_cache, "_FILES", [])
    _cache.sources_digest.cache_clear()
    try:
        before = _cache.sources_digest()
        (pkg / "callee.py").write_text(_CALLEE.format(3))
        _cache.sources_digest.cache_clear()
        assert _cache.sources_digest() != before
        (pkg / "callee.py").write_text(_CALLEE.format(1))
        _cache.sources_digest.cache_clear()
        assert _cache.sources_digest() == before
    finally:
        _cache.sources_digest.cache_clear()


def test_engine_kernels_carry_the_digest():
    from engine._kernels import channels_last

    locator = channels_last.weights_range._cache._impl.locator
    assert getattr(locator, "_protoseg", False)
    assert locator.get_source_stamp()[1] == _cache.sources_digest()
    assert _cache.install()  # idempotent: already first in the list
