"""Choose where Numba caches compiled kernels, before any kernel is defined.

Numba's ``cache=True`` writes next to the source file (``engine/__pycache__``) and falls
back to a per-user folder; when neither is writable — a read-only site-packages in a
container, a locked-down HOME — it raises at import. protoseg keeps ``cache=True`` (a cold
compile of the kernels takes tens of seconds) and, only when the user has not set
``NUMBA_CACHE_DIR`` and the package folder is not writable, points Numba at the first
writable of: ``$XDG_CACHE_HOME/protoseg/numba`` (default ``~/.cache/protoseg/numba``) and
``<tempdir>/protoseg-numba-<uid>``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["ensure_cache_dir", "candidate_dirs", "prefer_passive_waiting"]


def _writable(path: Path) -> bool:
    """True when ``path`` exists (or can be made) and a file can be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def candidate_dirs() -> list[Path]:
    """Fallback cache folders, in order of preference."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return [Path(xdg) / "protoseg" / "numba", Path(tempfile.gettempdir()) / f"protoseg-numba-{uid}"]


def ensure_cache_dir(package_dir: str | os.PathLike[str]) -> str | None:
    """Set ``NUMBA_CACHE_DIR`` when the package folder cannot hold Numba's cache.

    Returns the folder chosen, or None when nothing needed changing (the user's own
    ``NUMBA_CACHE_DIR`` is always respected).
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    pkg = Path(package_dir)
    pycache = pkg / "__pycache__"
    if _writable(pycache) if pycache.exists() else os.access(pkg, os.W_OK | os.X_OK):
        return None
    for cand in candidate_dirs():
        if _writable(cand):
            os.environ["NUMBA_CACHE_DIR"] = str(cand)
            try:  # numba already imported by someone else: its config was read already
                import sys

                if "numba" in sys.modules:
                    sys.modules["numba"].config.CACHE_DIR = str(cand)
            except AttributeError:  # pragma: no cover
                pass
            return str(cand)
    return None


def prefer_passive_waiting() -> None:
    """Make idle OpenMP threads sleep after a short spin (unless the user chose otherwise).

    Must run before Numba's OpenMP threading layer starts. Measured on the 2-core machine
    (U-Net sweep, batch 8, 256²): layer-level SA 88-92 ms with OpenMP's default active
    waiting against 55 ms with ``OMP_WAIT_POLICY=PASSIVE``; unit level 345-377 against
    304-310 ms. Spinning threads also slow onnxruntime and torch running between kernels
    (``../shared/NOTES.md``). An OpenMP runtime that another library already started keeps
    its own setting.

    Sleeping at once costs a wake-up at the start of every parallel region: 75 µs on this
    virtual machine, which was 40 % of a small layer's ``sa_scores`` call. ``GOMP_SPINCOUNT``
    10000 (about 0.2 ms of spinning, measured) keeps back-to-back calls awake (small call
    99 -> 22 µs) while an idle process still sleeps (0.2 CPU-seconds per second in a loop of
    one call every 2 ms, against 0.05 with no spinning and 1.0 with OpenMP's default).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

