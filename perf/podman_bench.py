#!/usr/bin/env python3
"""podman with ``mount_program=unionmount`` against ``mount_program=fuse-overlayfs``: mount, diff, commit.

    sudo .venv/bin/python perf/podman_bench.py [--rounds 5] [--tree /usr/lib/python3]

For each mount program, a private podman store (``--root``/``--runroot`` under a
temporary directory, overlay driver, ``overlay.mount_program=PROGRAM``) imports the
same root filesystem tarball (TREE, by default this machine's /usr/lib/python3: some
thousands of files), creates a container and changes it through ``podman mount``
(a file added, one changed, one removed). Then, going round the programs in a
different order every round, it times ``podman mount`` + ``podman umount``, ``podman
diff`` (which mounts the container's layers to compare them) and ``podman commit``.
unionmount runs twice: as setup installs it (the C launcher, ``unionmount-launch``,
with a ``unionmount server`` the benchmark starts on a socket of its own), and with
``UNIONMOUNT_NO_SERVER=1`` (a Python start per command). Prints medians and the ratios
to fuse-overlayfs; the goal of issue 18 is a ratio ≤ 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
UM = str(BIN / "unionmount")
LAUNCHER = str(BIN / "unionmount-launch") if (BIN / "unionmount-launch").exists() else UM
#: name -> (mount program, what its environment adds)
PROGRAMS = {
    "fuse-overlayfs": (shutil.which("fuse-overlayfs") or "fuse-overlayfs", {}),
    "unionmount": (LAUNCHER, {}),  # (UNIONMOUNT_SERVER: set in main)
    "no server": (UM, {"UNIONMOUNT_NO_SERVER": "1"}),
}


def podman(store: Path, program: tuple[str, dict[str, str]], *args: str) -> str:
    cmd = [
        "podman", "--root", str(store / "root"), "--runroot", str(store / "run"), "--storage-driver", "overlay",
        "--storage-opt", f"overlay.mount_program={program[0]}", "--cgroup-manager", "cgroupfs",
        "--events-backend", "none", *args,
    ]  # fmt: skip
    env = {**os.environ, **program[1]}
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip()


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
    sock = str(work / "server.sock")
    PROGRAMS["unionmount"][1]["UNIONMOUNT_SERVER"] = sock
    server = subprocess.Popen([UM, "server"], env={**os.environ, "UNIONMOUNT_SERVER": sock})
    while not os.path.exists(sock) and server.poll() is None:
        time.sleep(0.02)
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
            order = list(PROGRAMS)[r % 3 :] + list(PROGRAMS)[: r % 3]
            for name in order:
                store, program, ctr = stores[name], PROGRAMS[name], ctrs[name]
                t0 = time.perf_counter()
                podman(store, program, "mount", ctr)
                podman(store, program, "umount", ctr)
                rows[name]["mount+umount"].append(time.perf_counter() - t0)
                rows[name]["diff"].append(timed(podman, store, program, "diff", ctr))
                rows[name]["commit"].append(timed(podman, store, program, "commit", "-q", ctr, f"bench:c{r}"))
        print(f"medians of {args.rounds}, seconds (ratio to fuse-overlayfs)")
        print(f"{'':<14} {'fuse-overlayfs':>15} {'unionmount':>18} {'no server':>18}")
        for what in ("mount+umount", "diff", "commit"):
            fo, um, slow = (statistics.median(rows[n][what]) for n in PROGRAMS)
            print(f"{what:<14} {fo:>15.3f} {um:>11.3f} ({um / fo:.2f}) {slow:>11.3f} ({slow / fo:.2f})")
    finally:
        for name, program in PROGRAMS.items():
            if name in stores:
                try:
                    podman(stores[name], program, "system", "reset", "--force")
                except subprocess.CalledProcessError:
                    pass
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
