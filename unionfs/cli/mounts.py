"""Commands on a live mount: ``umount`` (and wait for its daemon) and ``stats`` (ask it for its counters)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from unionfs.daemon.config import UsageError
from unionfs.fuse import control, device


def umount(mnt: str, timeout: float) -> int:
    path = os.path.realpath(mnt)
    try:  # before the unmount: afterwards the mount can no longer tell who served it
        daemon: control.Daemon | None = control.Daemon(path)
    except (control.NotServed, OSError):
        daemon = None
    try:
        if daemon is not None:  # ours: umount2 as root, fusermount3 for a plain user
            try:
                device.unmount_now(path)
            except OSError as e:
                raise UsageError(f"cannot unmount '{mnt}': {e.strerror}") from None
        else:  # whatever it is, the system's tools decide
            tool = shutil.which("fusermount3") or shutil.which("fusermount")
            cmd = [tool, "-u", path] if tool else ["umount", path]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                msg = (r.stderr.strip().splitlines() or ["unmount failed"])[-1]
                raise UsageError(f"cannot unmount '{mnt}': {msg}")
        if daemon is not None:
            daemon.wait(timeout)
    finally:
        if daemon is not None:
            daemon.close()
    return 0


def stats(mnt: str, fmt: str) -> int:
    """Ask the daemon serving ``mnt`` for its request counters (through the mount) and print them."""

    try:
        data: dict[str, Any] = control.stats(os.path.realpath(mnt))
    except control.NotServed:
        raise UsageError(f"no unionmount daemon serves '{mnt}'") from None
    except OSError as e:
        raise UsageError(f"cannot ask the daemon serving '{mnt}': {e.strerror}") from None
    if fmt == "json":
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"pid {data['pid']}  up {data['uptime_s']:.0f}s  cpu {data['cpu_user_s'] + data['cpu_system_s']:.2f}s  "
        f"rss {data.get('rss_kb', 0) / 1024:.0f} MiB (peak {data['max_rss_kb'] / 1024:.0f} MiB)"
    )
    settings = data.get("settings", {})
    if settings:
        print("  ".join(f"{k} {'on' if v is True else 'off' if v is False else v}" for k, v in settings.items()))
    print(f"{'OPERATION':<14} {'REQUESTS':>10} {'MEAN µs':>10} {'TOTAL s':>9} {'ERRORS':>8}")
    for name, o in sorted(data["ops"].items(), key=lambda kv: -kv[1]["total_s"]):
        print(f"{name:<14} {o['count']:>10} {o['mean_us']:>10.1f} {o['total_s']:>9.3f} {o['errors']:>8}")
    return 0
