"""Facts about the process's place on the host that decide defaults: is it root of the machine, or of a namespace."""

from __future__ import annotations

import os


def in_user_namespace() -> bool:
    """True inside a user namespace (``unshare -r``, rootless podman): uid 0 there is a plain user outside."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def real_root() -> bool:
    """True for root of the machine (not of a user namespace): who may write /var/lib and make devices."""
    return os.geteuid() == 0 and not in_user_namespace()
