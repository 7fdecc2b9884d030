"""How much memory a run may use: sizes as people write them, and the limits that apply.

:func:`parse_size` reads ``4GiB``, ``512MB``, ``1e9`` or a plain int. :func:`memory_limit`
is the automatic budget: the smallest of what the machine has free and what this process is
allowed, each source optional —

- ``MemAvailable`` in ``/proc/meminfo`` (elsewhere: free physical pages from ``sysconf``);
- cgroup v2: ``memory.max`` − (``memory.current`` − ``inactive_file``) of the process's
  cgroup and of each ancestor, the path read from ``/proc/self/cgroup`` (``0::/path``; the
  hierarchy at ``/sys/fs/cgroup``, or ``/sys/fs/cgroup/unified`` on hybrid hosts);
- cgroup v1: ``memory.limit_in_bytes`` − (``memory.usage_in_bytes`` − ``total_inactive_file``)
  likewise (``N:memory:/path`` or ``N:cpu,memory:/path``);
- ``RLIMIT_AS`` minus ``VmSize`` and ``RLIMIT_DATA`` minus ``VmData`` (soft limits, against
  ``/proc/self/status``).

The result says which source set it, so a log line and an out-of-memory message can name it.
This module lives at ``engine.memory`` (not ``engine.run``) because ``engine.model.graph``
uses it and ``engine.run`` imports ``engine.model``; it imports nothing from ``engine``.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["parse_size", "format_size", "MemoryLimit", "memory_limit", "available_memory"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 1000,
    "m": 1 << 20, "mib": 1 << 20, "mb": 1000 ** 2,
    "g": 1 << 30, "gib": 1 << 30, "gb": 1000 ** 3,
    "t": 1 << 40, "tib": 1 << 40, "tb": 1000 ** 4,
    "p": 1 << 50, "pib": 1 << 50, "pb": 1000 ** 5,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
#: cgroup v1 writes "no limit" as a huge page-aligned number; anything above this is unlimited.
_UNLIMITED = 1 << 60
#: The automatic budget never reports less than this (a limit already exceeded still plans).
MIN_BYTES = 1 << 20


def parse_size(value: str | int | float) -> int:
    """Bytes from ``4GiB``, ``512MB``, ``1.5 G``, ``1e9``, ``4096`` or an int.

    Units are case-insensitive: ``B``; SI ``kB MB GB TB PB`` (powers of 1000); IEC
    ``KiB MiB GiB TiB PiB`` and the bare ``K M G T P`` (powers of 1024).

    Raises
    ------
    ValueError
        Naming the value and examples, for anything else or a size that is not positive.
    """
    if isinstance(value, bool):
        raise ValueError(f"memory size {value!r} is not a size; {_EXAMPLES}")
    if isinstance(value, int) or (hasattr(value, "__index__") and not isinstance(value, str)):
        n = int(value)  # numpy integers too
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"memory size {value!r} is not a whole number of bytes; {_EXAMPLES}")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE.match(value)
        unit = _UNITS.get(m.group(2).lower()) if m else None
        if m is None or unit is None:
            raise ValueError(f"memory size {value!r} is not understood; {_EXAMPLES}")
        n = int(round(float(m.group(1)) * unit))
    else:
        raise ValueError(f"memory size {value!r} is not a size; {_EXAMPLES}")
    if n <= 0:
        raise ValueError(f"memory size {value!r} must be positive; {_EXAMPLES}")
    return n


_EXAMPLES = "give bytes or a number with a unit, e.g. 4GiB, 512MB, 1.5G, 1e9"


def format_size(n: int | float) -> str:
    """``3221225472`` → ``"3GiB"``, ``1610612736`` → ``"1.5GiB"`` (what :func:`parse_size` reads)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            text = f"{n:.0f}" if unit == "B" else f"{n:.1f}".removesuffix(".0")
            return text + unit
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class MemoryLimit:
    """The automatic memory budget and where it comes from.

    Attributes
    ----------
    bytes : int
        The smallest of the limits found (at least :data:`MIN_BYTES`).
    source : str
        The source that set it, e.g. ``"cgroup v2 memory.max"`` or ``"RLIMIT_AS"``.
    limits : mapping
        Every source found → the bytes it leaves (for ``-vv`` logs and tests).
    """

    bytes: int
    source: str
    limits: Mapping[str, int]

    def describe(self) -> str:
        """``"3GiB (RLIMIT_AS)"``."""
        return f"{format_size(self.bytes)} ({self.source})"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _int_file(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        n = int(text)
    except ValueError:
        return None
    return None if n >= _UNLIMITED else n


def _kv_kib(text: str | None, key: str) -> int | None:
    """``key:  123 kB`` lines of /proc/meminfo or /proc/self/status → bytes."""
    for line in (text or "").splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            try:
                return int(parts[1]) * (1024 if len(parts) > 2 and parts[2].lower() == "kb" else 1)
            except (IndexError, ValueError):
                return None
    return None


def _stat_value(path: Path, key: str) -> int:
    for line in (_read(path) or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            try:
                return int(v)
            except ValueError:
                return 0
    return 0


def cgroup_paths(proc: str | os.PathLike[str] = "/proc") -> dict[str, str]:
    """The process's cgroup paths: ``{"v2": "/a/b", "v1": "/docker/x"}`` (those present).

    From ``/proc/self/cgroup``: ``0::/path`` is the v2 (unified) hierarchy, ``N:memory:/path``
    (or ``N:cpu,memory:/path``) the v1 memory controller.
    """
    out: dict[str, str] = {}
    for line in (_read(Path(proc) / "self" / "cgroup") or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            out["v2"] = path or "/"
        elif "memory" in controllers.split(","):
            out["v1"] = path or "/"
    return out


def _candidates(root: Path, rel: str) -> list[Path]:
    """The cgroup folder and its ancestors up to the mount root; when the path is not
    visible (a container sees its own cgroup at the root), the mount root alone."""
    rel = rel.strip("/")
    here = root / rel if rel else root
    if rel and not here.is_dir():
        return [root]
    dirs = [here]
    while here != root:
        here = here.parent
        dirs.append(here)
    return dirs


def _cgroup_limit(root: Path, rel: str, limit_file: str, usage_file: str, stat_key: str) -> int | None:
    """min over the cgroup and its ancestors of limit − (usage − reclaimable page cache)."""
    best: int | None = None
    for d in _candidates(root, rel):
        limit = _int_file(d / limit_file)
        if limit is None:
            continue
        usage = _int_file(d / usage_file) or 0
        usage = max(0, usage - _stat_value(d / "memory.stat", stat_key))
        left = max(0, limit - usage)
        best = left if best is None else min(best, left)
    return best


def _rlimits() -> dict[str, int]:
    """Soft RLIMIT_AS / RLIMIT_DATA that are set (``resource`` is POSIX only)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return {}
    out = {}
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            soft, _ = resource.getrlimit(which)
        except (OSError, ValueError):  # pragma: no cover
            continue
        if soft != resource.RLIM_INFINITY and soft >= 0:
            out[name] = int(soft)
    return out


def memory_limit(*, proc: str | os.PathLike[str] = "/proc",
                 cgroup: str | os.PathLike[str] = "/sys/fs/cgroup",
                 rlimits: Mapping[str, int] | None = None) -> MemoryLimit:
    """The memory this process can still use, and which limit sets it.

    Parameters
    ----------
    proc, cgroup : path
        Roots of procfs and of the cgroup mount (tests point them at fake files). For
        cgroup v1 the memory controller is looked for under ``<cgroup>/memory``.
    rlimits : mapping, optional
        ``{"RLIMIT_AS": bytes, "RLIMIT_DATA": bytes}`` soft limits; default: this process's
        (``resource.getrlimit``), unlimited ones left out.

    Returns
    -------
    MemoryLimit
        The smallest of the sources found; with none, free physical memory from
        ``sysconf``, else 4 GiB (source ``"default"``).
    """
    proc, root = Path(proc), Path(cgroup)
    limits: dict[str, int] = {}
    avail = _kv_kib(_read(proc / "meminfo"), "MemAvailable")
    if avail is not None:
        limits["MemAvailable"] = avail
    paths = cgroup_paths(proc)
    if "v2" in paths:  # hybrid hosts mount the unified hierarchy at <cgroup>/unified
        v2 = root / "unified" if (root / "unified").is_dir() else root
        left = _cgroup_limit(v2, paths["v2"], "memory.max", "memory.current", "inactive_file")
        if left is not None:
            limits["cgroup v2 memory.max"] = left
    if "v1" in paths:
        v1 = root / "memory" if (root / "memory").is_dir() else root
        left = _cgroup_limit(v1, paths["v1"], "memory.limit_in_bytes", "memory.usage_in_bytes",
                             "total_inactive_file")
        if left is not None:
            limits["cgroup v1 memory.limit_in_bytes"] = left
    status = _read(proc / "self" / "status")
    rlimits = _rlimits() if rlimits is None else rlimits
    for name, used_key in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        soft = rlimits.get(name)
        if soft is None:
            continue
        used = _kv_kib(status, used_key) or 0
        limits[name] = max(0, int(soft) - used)
    if not limits:
        try:
            limits["free physical memory"] = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return MemoryLimit(4 << 30, "default", {})
    source = min(limits, key=lambda k: limits[k])
    return MemoryLimit(max(MIN_BYTES, limits[source]), source, dict(limits))


def available_memory(**roots: object) -> int:
    """Bytes this process can still use (:func:`memory_limit`'s ``bytes``)."""
    return memory_limit(**roots).bytes  # type: ignore[arg-type]
