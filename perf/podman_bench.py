#!/usr/bin/env python3
"""podman with ``mount_program=unionmount`` against ``mount_program=fuse-overlayfs``: mount, diff, commit.

    sudo .venv/bin/python perf/podman_bench.py [--rounds 5] [--tree /usr/lib/python3]

For each mount program, a private podman store (``--root``/``--runroot`` under a
temporary directory, overlay driver, ``overlay.mount_program=PROGRAM``) imports the
same root filesystem tarball (TREE, by default this machine's /usr/lib/python3: some
thousands of files), creates a container and changes it through ``podman mount``
(a file added, one changed, one removed). Then, alternating between the two programs
every round, it times ``podman mount`` + ``podman umount``, ``podman diff`` (which
mounts the container's layers to compare them) and ``podman commit``. Prints medians
and the ratio unionmount/fuse-overlayfs; the goal of issue 18 is a ratio ≤ 1.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

UM = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "unionmount")
PROGRAMS = {"fuse-overlayfs": shutil.which("fuse-overlayfs") or "fuse-overlayfs", "unionmount": UM}


def podman(store: Path, program: str, *args: str) -> str:
    cmd = [
        "podman", "--root", str(store / "root"), "--runroot", str(store / "run"), "--storage-driver", "overlay",
        "--storage-opt", f"overlay.mount_program={program}", "--cgroup-manager", "cgroupfs", "--events-backend", "none",
        *args,
    ]  # fmt: skip
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def timed(fn: object, *args: str) -> float:
    t0 = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", default="/usr/lib/python3")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="um-podman-", dir="/var/tmp"))
    tar = work / "rootfs.tar"
    subprocess.run(["tar", "-C", args.tree, "-cf", str(tar), "."], check=True)
    stores, ctrs = {}, {}
    try:
        for name, program in PROGRAMS.items():
            store = stores[name] = work / name
            podman(store, program, "import", str(tar), "bench:1")
            ctr = ctrs[name] = podman(store, program, "create", "bench:1", "/bin/true")
            mnt = Path(podman(store, program, "mount", ctr))
            (mnt / "added.txt").write_text("new\n")
            changed = next(p for p in mnt.rglob("*.py") if p.is_file())
            changed.write_text(changed.read_text() + "# changed\n")
            next(p for p in mnt.rglob("*.txt") if p.is_file() and p.name != "added.txt").unlink()
            podman(store, program, "umount", ctr)
        rows: dict[str, dict[str, list[float]]] = {n: {"mount+umount": [], "diff": [], "commit": []} for n in PROGRAMS}
        for r in range(args.rounds):
            order = list(PROGRAMS) if r % 2 == 0 else list(reversed(PROGRAMS))
            for name in order:
                store, program, ctr = stores[name], PROGRAMS[name], ctrs[name]
                t0 = time.perf_counter()
                podman(store, program, "mount", ctr)
                podman(store, program, "umount", ctr)
                rows[name]["mount+umount"].append(time.perf_counter() - t0)
                rows[name]["diff"].append(timed(podman, store, program, "diff", ctr))
                rows[name]["commit"].append(timed(podman, store, program, "commit", "-q", ctr, f"bench:c{r}"))
        print(f"{'':<14} {'fuse-overlayfs':>15} {'unionmount':>11} {'ratio':>6}   (medians of {args.rounds}, seconds)")
        for what in ("mount+umount", "diff", "commit"):
            fo, um = (statistics.median(rows[n][what]) for n in ("fuse-overlayfs", "unionmount"))
            print(f"{what:<14} {fo:>15.3f} {um:>11.3f} {um / fo:>6.2f}")
    finally:
        for name, program in PROGRAMS.items():
            if name in stores:
                subprocess.run(
                    ["podman", "--root", str(stores[name] / "root"), "--runroot", str(stores[name] / "run"),
                     "--storage-driver", "overlay", "--storage-opt", f"overlay.mount_program={program}",
                     "system", "reset", "--force"],
                    capture_output=True,
                )  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
