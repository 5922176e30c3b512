#!/usr/bin/env python3
"""Pull and push benchmark: unionmount vs podman (and ``skopeo copy``), one registry, one image.

Builds a five-layer image with umoci from host directories (Python's stdlib,
perl, gconv, docs, locales: about 12k files, 150 MB compressed), pushes it
to a local ``docker-registry`` with skopeo, then times, interleaved and with
caches dropped before each run:

* ``unionmount image pull`` into a fresh store (fetch, check, unpack, deduplicate);
* ``podman pull`` into a fresh overlay storage (fetch, check, unpack to disk);
* ``skopeo copy docker://... oci:DIR`` (fetch and check only: the floor);
* then ``unionmount image push`` and ``podman push`` of what each pulled, to a fresh
  registry every round (every blob uploaded; both build and gzip the layers).

``--rate MB/S`` puts a proxy in front of the registry that allows each connection
that many MB/s (as a CDN does), where fetching layers in parallel pays.
Writes a Markdown table of medians to perf/RESULTS-pull.md (or ``--out``). Run as root:

    .venv/bin/python perf/pull_bench.py [--rounds 5] [--rate 20]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from perf.bench import release_fs, scratch_fs  # noqa: E402  (the bench's own ext4, no discard)
from tests.registry import CuttingProxy, registry  # noqa: E402  (the same real registry the tests use)

UM = str(Path(sys.executable).parent / "unionmount")
LAYERS = ["/usr/lib/python3.11", "/usr/lib/x86_64-linux-gnu/perl-base", "/usr/lib/x86_64-linux-gnu/gconv",
          "/usr/share/doc", "/usr/share/locale"]  # fmt: skip


def sh(cmd: str, cwd: Path) -> None:
    subprocess.run(["bash", "-ec", cmd], cwd=cwd, check=True, capture_output=True)


def build(base: Path) -> Path:
    sh("umoci init --layout l && umoci new --image l:t", base)
    for src in filter(os.path.isdir, LAYERS):
        parent = os.path.dirname(src)
        sh(f"umoci unpack --image l:t b && mkdir -p b/rootfs{parent} && cp -a {src} b/rootfs{parent}/ "
           "&& umoci repack --image l:t b && rm -rf b", base)  # fmt: skip
    return base / "l"


def timed(cmd: list[str], cwd: Path) -> float:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    took = time.monotonic() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rate", type=float, help="MB/s per connection (a proxy in front of the registry), as a CDN")
    ap.add_argument("--out", default=str(HERE / "RESULTS-pull.md"))
    ap.add_argument("--data", default="/var/tmp/unionmount-bench", help="where bench.py keeps its ext4 image")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("pull_bench: run as root (drop_caches, podman's overlay storage)")
    fs = scratch_fs(Path(args.data))
    base = fs / "pull"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    layout = build(base)
    packed = sum(f.stat().st_size for f in (layout / "blobs" / "sha256").iterdir())
    times: dict[str, list[float]] = {k: [] for k in ("unionmount", "podman", "skopeo", "um push", "podman push")}
    with registry(base / "reg") as reg, tempfile.TemporaryDirectory(dir=base) as tmp:
        reg.push(f"oci:{layout}:t", "bench:1")
        proxy = CuttingProxy(reg.host, rate=args.rate * 1e6) if args.rate else None
        ref = f"{proxy.host if proxy else reg.host}/bench:1"
        work = Path(tmp)
        podman = ["podman", "--root", str(work / "p"), "--runroot", str(work / "pr"), "--storage-driver", "overlay"]
        runs = {
            "unionmount": [UM, "image", "--root", str(work / "s"), "pull", ref],
            "podman": [*podman, "pull", "-q", "--tls-verify=false", ref],
            "skopeo": ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{work / 'o'}:t"],
        }
        for rnd in range(args.rounds):
            order = list(runs) if rnd % 2 == 0 else list(reversed(runs))
            for name in order:
                times[name].append(timed(runs[name], work))
                if name == "podman":
                    subprocess.run([*podman, "system", "reset", "-f"], capture_output=True)
                for d in ("s", "p", "pr", "o"):
                    shutil.rmtree(work / d, ignore_errors=True)
            print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v),
                  file=sys.stderr)  # fmt: skip
        # push: each tool sends the image it pulled to a fresh registry every round (podman remembers
        # where it has put blobs, and would mount them from there instead of uploading them)
        subprocess.run(runs["unionmount"], check=True, capture_output=True)
        subprocess.run(runs["podman"], check=True, capture_output=True)
        for rnd in range(args.rounds):
            with registry(base / f"push{rnd}") as reg2:
                pushes = {
                    "um push": [UM, "image", "--root", str(work / "s"), "push", ref, f"{reg2.host}/um:1"],
                    "podman push": [*podman, "push", "-q", "--tls-verify=false", ref, f"docker://{reg2.host}/pm:1"],
                }
                for name in pushes if rnd % 2 == 0 else reversed(pushes):
                    times[name].append(timed(pushes[name], work))
            shutil.rmtree(base / f"push{rnd}", ignore_errors=True)
        subprocess.run([*podman, "system", "reset", "-f"], capture_output=True)
        if proxy:
            proxy.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    podman_v = subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Pull and push: unionmount vs podman (vs skopeo)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}, "
        f"{podman_v}; `perf/pull_bench.py --rounds {args.rounds}{f' --rate {args.rate:g}' if args.rate else ''}`.",
        f"Image: {len(LAYERS)} layers from host directories, {packed / 2**20:.0f} MiB compressed (gzip), "
        "served by a local docker-registry over HTTP"
        + (f", through a proxy allowing {args.rate:g} MB/s per connection" if args.rate else "")
        + ". Every store on bench.py's scratch ext4 (no discard); "
        "caches dropped before each run; medians.",
        "",
        "| | seconds | ratio to unionmount |",
        "|---|--:|--:|",
    ]
    for name, label in (("unionmount", "unionmount image pull (fetch, check, unpack into the store)"),
                        ("podman", "podman pull (fetch, check, unpack into overlay storage)"),
                        ("skopeo", "skopeo copy to an OCI layout (fetch and check only)")):  # fmt: skip
        lines.append(f"| {label} | {med[name]:.2f} | {med[name] / med['unionmount']:.2f} |")
    lines.append(f"| unionmount image push (tar, gzip, upload) | {med['um push']:.2f} | 1.00 |")
    lines.append(f"| podman push (tar, gzip, upload) | {med['podman push']:.2f} | "
                 f"{med['podman push'] / med['um push']:.2f} |")  # fmt: skip
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(base, ignore_errors=True)
    release_fs(fs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
