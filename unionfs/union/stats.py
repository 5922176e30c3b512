"""Request counters of a running daemon: how many requests of each kind, and what they cost.

Every FUSE handler is counted (:func:`record`, a few hundred nanoseconds per
request); ``unionmount stats MNT`` reads them as JSON through the mount (the
root's ``user.unionmount.stats``, see :mod:`unionfs.fuse.control`) and prints them,
with the daemon's CPU seconds and peak RSS, so that a regression shows without a
profiler.
Times are wall time inside the handler, awaits (copy-up threads, the lock)
included.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

#: operation name -> [requests, total nanoseconds, errors]
COUNTERS: dict[str, list[int]] = {}
#: setting name -> how to read its current value (shown by ``unionmount stats``)
SETTINGS: dict[str, Callable[[], object]] = {}
#: other counters of the same kind, added in: requests answered outside Python (the compiled hot path)
SOURCES: list[Callable[[], dict[str, tuple[int, int, int]]]] = []
_STARTED = time.monotonic()


def record(name: str, ns: int, failed: bool) -> None:
    c = COUNTERS.get(name)
    if c is None:
        c = COUNTERS[name] = [0, 0, 0]
    c[0] += 1
    c[1] += ns
    if failed:
        c[2] += 1


def _counters() -> dict[str, list[int]]:
    merged = {name: list(c) for name, c in COUNTERS.items()}
    for source in SOURCES:
        for name, counts in source().items():
            c = merged.setdefault(name, [0, 0, 0])
            for i, v in enumerate(counts):
                c[i] += v
    return merged


def snapshot() -> dict[str, object]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - _STARTED, 3),
        "cpu_user_s": ru.ru_utime,
        "cpu_system_s": ru.ru_stime,
        "max_rss_kb": ru.ru_maxrss,
        "rss_kb": _rss_kb(),
        "allocations": _top_allocations(),
        "settings": {name: read() for name, read in sorted(SETTINGS.items())},
        "ops": {
            name: {"count": n, "mean_us": round(ns / n / 1000, 2) if n else 0.0, "total_s": ns / 1e9, "errors": err}
            for name, (n, ns, err) in sorted(_counters().items())
        },
    }


def _rss_kb() -> int:
    """The daemon's resident memory now (peak RSS never shrinks; this does)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return 0


def _top_allocations(n: int = 15) -> list[str]:
    """Where the daemon's memory is, by source line, when it runs under ``PYTHONTRACEMALLOC`` (else nothing)."""
    import tracemalloc

    if not tracemalloc.is_tracing():
        return []
    stats = tracemalloc.take_snapshot().statistics("lineno")
    return [f"{s.size >> 10} KiB in {s.count} blocks: {s.traceback}" for s in stats[:n]]
