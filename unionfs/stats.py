"""Request counters of a running daemon: how many requests of each kind, and what they cost.

Every FUSE handler is counted (:func:`timed`, a few hundred nanoseconds per
request); ``unionmount stats MNT`` asks the daemon serving MNT (SIGUSR1) to
write them as JSON to :func:`stats_path` and prints them, with the daemon's
CPU seconds and peak RSS, so that a regression shows without a profiler.
Times are wall time inside the handler, awaits (copy-up threads, the lock)
included.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable

#: operation name -> [requests, total nanoseconds, errors]
COUNTERS: dict[str, list[int]] = {}
#: setting name -> how to read its current value (shown by ``unionmount stats``)
SETTINGS: dict[str, Callable[[], object]] = {}
_STARTED = time.monotonic()


def record(name: str, ns: int, failed: bool) -> None:
    c = COUNTERS.get(name)
    if c is None:
        c = COUNTERS[name] = [0, 0, 0]
    c[0] += 1
    c[1] += ns
    if failed:
        c[2] += 1


def stats_dir() -> str:
    return os.environ.get("XDG_RUNTIME_DIR") or ("/run/unionmount" if os.geteuid() == 0 else "/tmp")


def stats_path(pid: int) -> str:
    return os.path.join(stats_dir(), f"unionmount-stats.{pid}.json")


def snapshot() -> dict[str, object]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - _STARTED, 3),
        "cpu_user_s": ru.ru_utime,
        "cpu_system_s": ru.ru_stime,
        "max_rss_kb": ru.ru_maxrss,
        "settings": {name: read() for name, read in sorted(SETTINGS.items())},
        "ops": {
            name: {"count": n, "mean_us": round(ns / n / 1000, 2) if n else 0.0, "total_s": ns / 1e9, "errors": err}
            for name, (n, ns, err) in sorted(COUNTERS.items())
        },
    }


def dump() -> str:
    """Write the counters for ``unionmount stats`` (atomically); returns the path."""
    path = stats_path(os.getpid())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(snapshot(), f)
    os.replace(path + ".tmp", path)
    return path


def daemon_pids(mnt: str) -> list[int]:
    """The unionmount daemons serving ``mnt`` (a real path), found by their command lines."""
    needle = os.fsencode(mnt)
    me = os.getpid()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(b"unionmount" in a or b"unionfs" in a for a in args[:3]) and any(
            os.path.realpath(a) == needle for a in args if a
        ):
            out.append(int(pid))
    return out
