#!/usr/bin/env python3
"""Layer-store benchmark: import, dedup, mount time and cold find/stat vs image depth.

Builds images with umoci from synthetic files (the same files in every variant),
then measures, each median of --runs:

* import time of a multi-layer image vs ``umoci unpack`` of the same image;
* store size for two images sharing a base vs the sum of their unpacked trees;
* mount time, cold ``find`` and cold ``stat`` of every file (``find -printf '%s %u %m'``;
  each after dropping caches, on a fresh mount) for the same files as a 1-layer and a
  30-layer image.

Writes a Markdown table to perf/RESULTS-store.md (or --out). Run as root:
    .venv/bin/python perf/store_bench.py [--files 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UM = [str(Path(sys.executable).parent / "unionmount")]


def sh(cmd: str, cwd: Path) -> None:
    subprocess.run(["bash", "-ec", cmd], cwd=cwd, check=True, capture_output=True)


def run(cmd: list[str], cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {r.stderr.strip()}")


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    t = time.perf_counter()
    run(cmd, cwd)
    return time.perf_counter() - t


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def du(path: Path) -> int:
    return int(
        subprocess.run(
            ["du", "-sb", "--apparent-size", str(path)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )


def du_blocks(path: Path) -> int:
    return int(subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def build(work: Path, tag: str, files: int, layers: int, extra: str = "") -> None:
    """An image of ``files`` small files spread over ``layers`` layers (same content for any depth)."""
    per = max(files // layers, 1)
    sh(f"[ -d img ] || umoci init --layout img; umoci new --image img:{tag}", work)
    for i in range(layers):
        lo, hi = i * per, files if i == layers - 1 else (i + 1) * per
        sh(
            f"umoci unpack --image img:{tag} b && python3 - <<'EOF'\n"
            f"import os, random\nrandom.seed(1)\n"
            f"for n in range({lo}, {hi}):\n"
            f"    d = f'b/rootfs/usr/lib/d{{n % 997}}'\n"
            f"    os.makedirs(d, exist_ok=True)\n"
            f"    open(f'{{d}}/f{{n}}', 'wb').write(random.Random(n).randbytes(500 + n % 4000))\n"
            f"EOF\n{extra if i == layers - 1 else ''}\numoci repack --image img:{tag} b && rm -rf b",
            work,
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-store.md")))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="um-store-bench."))
    rows: list[tuple[str, str]] = []
    try:
        build(work, "one", args.files, 1)
        build(work, "deep", args.files, 30)
        build(work, "base2", args.files, 3, extra="echo app > b/rootfs/app")
        # import vs umoci unpack
        imp, unpack = [], []
        for r in range(args.runs):
            store = work / f"s{r}"
            drop_caches()
            imp.append(timed([*UM, "image", "--root", str(store), "import", f"oci:{work}/img:deep", "--tag", "d"]))
            drop_caches()
            unpack.append(timed(["umoci", "unpack", "--image", f"{work}/img:deep", str(work / f"u{r}")]))
        rows.append(
            (
                f"import of a 30-layer image, {args.files} files (s)",
                f"{statistics.median(imp):.2f} vs umoci unpack {statistics.median(unpack):.2f} "
                f"(ratio {statistics.median(imp) / statistics.median(unpack):.2f})",
            )
        )
        # dedup: two images sharing a base
        store = work / "dedup"
        for tag in ("deep", "base2"):
            run([*UM, "image", "--root", str(store), "import", f"oci:{work}/img:{tag}", "--tag", tag])
        sh("umoci unpack --image img:base2 u-base2", work)
        unpacked = du_blocks(work / "u0" / "rootfs") + du_blocks(work / "u-base2" / "rootfs")
        stored = du_blocks(store / "blobs") + du_blocks(store / "meta")
        rows.append(
            (
                "two images sharing their files: store (blobs+lmdb) vs sum of unpacked trees",
                f"{stored / 1e6:.1f} MB vs {unpacked / 1e6:.1f} MB (ratio {stored / unpacked:.2f})",
            )
        )
        # mount time and cold find vs depth
        store = work / "depth"
        for tag in ("one", "deep"):
            run([*UM, "image", "--root", str(store), "import", f"oci:{work}/img:{tag}", "--tag", tag])
        mnt = work / "mnt"
        mnt.mkdir()
        for tag, label in (("one", "1 layer"), ("deep", "30 layers")):
            mounts, finds, stats = [], [], []
            for _ in range(args.runs):
                for walk, into in ((["-printf", ""], finds), (["-printf", "%s %u %m\n"], stats)):
                    drop_caches()  # a fresh mount and a cold page cache for each walk
                    cmd = [*UM, "mount", "--root", str(store), "--image", tag, "--name", f"b-{tag}", str(mnt)]
                    took = timed(cmd)
                    if into is finds:
                        mounts.append(took)
                    try:
                        drop_caches()
                        into.append(timed(["find", str(mnt), *walk]))
                    finally:
                        subprocess.run([*UM, "umount", str(mnt)], check=True, capture_output=True)
            rows.append((f"mount time, {label} (s)", f"{statistics.median(mounts):.3f}"))
            rows.append((f"cold find over {args.files} files, {label} (s)", f"{statistics.median(finds):.2f}"))
            rows.append((f"cold stat of {args.files} files, {label} (s)", f"{statistics.median(stats):.2f}"))
    finally:
        for m in (work / "mnt",):
            subprocess.run(["fusermount3", "-u", str(m)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    uname = platform.uname()
    text = [
        f"# Store benchmark ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {uname.machine}, {os.cpu_count()} cores, kernel {uname.release}; "
        f"`{' '.join(sys.argv)}`, median of {args.runs}.",
        "",
        "| measure | result |",
        "| --- | --- |",
    ]
    text += [f"| {k} | {v} |" for k, v in rows]
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
