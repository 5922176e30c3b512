#!/usr/bin/env python3
"""Real container work on an image mount: ``apt-get install`` and ``dpkg --verify`` in a Debian chroot.

    sudo .venv/bin/python perf/container_bench.py [--rounds 3] [--packages "python3 git"]
        [--targets "kernel;fuse-overlayfs;unionmount;unionmount:passthrough=0"]

The first run builds a minimal Debian bookworm root filesystem with ``debootstrap``
(from the mirror apt uses) and downloads the packages into its apt cache, under
``/var/tmp/unionmount-bench/debian`` (kept for later runs). Each round mounts that tree
as the lower layer with every target (a fresh upper each time, targets in alternating
order), binds ``/dev`` and mounts ``/proc`` inside, and times, in the chroot:

* ``apt-get install --no-download PACKAGES`` (unpacking and configuring: small files
  created, renamed, fsynced; maintainer scripts run);
* ``dpkg --verify`` afterwards (every installed file read and hashed).

Prints medians in seconds and each target's ratio to kernel overlayfs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Target, drop_caches, sh  # noqa: E402 - the side-by-side harness's mounts

ROOT = Path("/var/tmp/unionmount-bench/debian")
MIRROR = "http://deb.debian.org/debian"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}


@dataclass
class RootFs:
    """What :class:`bench.Target` mounts: one lower layer."""

    layers: list[Path]

    @property
    def lower(self) -> str:
        return str(self.layers[0])


def build(packages: str) -> Path:
    """The cached root filesystem, with ``packages`` downloaded into its apt cache."""
    tree = ROOT / "rootfs"
    stamp = ROOT / f"ready-{packages.replace(' ', '_')}"
    if stamp.exists():
        return tree
    if not shutil.which("debootstrap"):
        sh("apt-get install -y -q debootstrap >/dev/null")
    if not (tree / "usr/bin/apt-get").exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        sh(f"debootstrap --variant=minbase bookworm {tree} {MIRROR} >/dev/null")
    shutil.copy("/etc/resolv.conf", tree / "etc/resolv.conf")
    with chrooted(tree):
        subprocess.run(["chroot", str(tree), "apt-get", "update", "-q"], env=ENV, check=True, capture_output=True)
        subprocess.run(
            ["chroot", str(tree), "apt-get", "install", "-y", "-q", "--download-only", *packages.split()],
            env=ENV, check=True, capture_output=True,
        )  # fmt: skip
    stamp.touch()
    return tree


class chrooted:
    """``/proc`` and ``/dev`` inside ``root`` for the body of the ``with``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __enter__(self) -> None:
        sh(f"mount -t proc proc {self.root}/proc")
        sh(f"mount --bind /dev {self.root}/dev")

    def __exit__(self, *exc: object) -> None:
        for d in ("dev", "proc"):
            if sh(f"umount {self.root}/{d}", check=False).returncode:
                sh(f"umount -l {self.root}/{d}", check=False)


def timed(root: Path, *cmd: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["chroot", str(root), *cmd], env=ENV, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed on {root}: {r.stderr.strip().splitlines()[-1:]}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--packages", default="python3 git")
    ap.add_argument("--targets", default="kernel;fuse-overlayfs;unionmount;unionmount:passthrough=0")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (mounts, chroot)", file=sys.stderr)
        return 2
    tree = build(args.packages)
    data = RootFs([tree])
    names = args.targets.split(";")
    work = ROOT / "runs"
    targets = [Target(n, data, work / n.replace(":", "-")) for n in names]  # type: ignore[arg-type]
    rows: dict[str, dict[str, list[float]]] = {n: {"apt-get install": [], "dpkg --verify": []} for n in names}
    for r in range(args.rounds):
        for t in targets if r % 2 == 0 else reversed(targets):
            t.mount()
            try:
                with chrooted(t.mnt):
                    drop_caches()
                    apt = timed(t.mnt, "apt-get", "install", "-y", "-q", "--no-download", *args.packages.split())
                    drop_caches()
                    verify = timed(t.mnt, "dpkg", "--verify")
            finally:
                t.umount()
            rows[t.name]["apt-get install"].append(apt)
            rows[t.name]["dpkg --verify"].append(verify)
            print(f"round {r + 1} {t.name}: apt-get install {apt:.2f} s, dpkg --verify {verify:.2f} s", flush=True)
    print(f"\nmedians of {args.rounds} rounds, seconds (ratio to kernel overlayfs); packages: {args.packages}")
    print(f"{'':<16}" + "".join(f"{n:>30}" for n in names))
    for what in ("apt-get install", "dpkg --verify"):
        base = statistics.median(rows["kernel"][what]) if "kernel" in rows else None
        cells = []
        for n in names:
            m = statistics.median(rows[n][what])
            cells.append(f"{m:.2f}" + (f" ({m / base:.2f}x)" if base else ""))
        print(f"{what:<16}" + "".join(f"{c:>30}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
