"""Lazy and partial pulls of a real-size image through a slow link (issue 21 item 6).

The image: the Debian bookworm minbase root of ``perf/container_bench.py`` with python3
and git installed (about 400 MB, 11k files), one layer, pushed as zstd:chunked by
skopeo to a local ``docker-registry``; version 2 is the same tree with every tenth file
under /usr changed (a byte appended). Everything goes through a proxy allowing
``--rate`` MB/s per connection and adding ``--latency`` ms to each request (by
default 12.5 MB/s and 20 ms: a 100 Mbit/s link to a remote registry); the proxy
counts the bytes. Measured, each on a fresh store:

* lazy: ``unionmount mount --pull lazy --no-prefetch`` then ``cat /etc/os-release``
  (time from the command's start, and bytes), then ``chroot MNT python3 -c 'import json'``;
  and the first read again with ``unionmount server`` running (into another fresh store);
* full: ``unionmount image pull``, ``podman pull`` (a private storage root), and
  ``skopeo copy`` to a directory (fetch only);
* partial: ``image pull`` of version 2 into a store that has version 1: bytes, as a
  share of version 2's compressed size.

    sudo .venv/bin/python perf/lazy_bench.py [--rounds 1] [--rate 12.5] [--latency 20]

writes ``perf/RESULTS-lazy.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from perf.bench import release_fs, scratch_fs  # noqa: E402  (the bench's own ext4, no discard)
from perf.container_bench import ENV, ROOT, build, chrooted  # noqa: E402  (the cached Debian root)
from tests.registry import CuttingProxy, registry  # noqa: E402  (the same real registry the tests use)

UM = str(Path(sys.executable).parent / "unionmount")
LAUNCHER = UM + "-launch" if os.path.exists(UM + "-launch") else UM  # (what setup puts on PATH)


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-ec", cmd], check=check, capture_output=True, text=True)


def images(work: Path) -> Path:
    """An OCI layout at ``work/oci`` with tags 1 and 2 (built once, cached)."""
    oci = ROOT / "lazy-oci"
    if (oci / "index.json").exists():
        return oci
    base = build("python3 git")
    work.mkdir(parents=True, exist_ok=True)
    v1 = work / "v1"
    sh(f"rm -rf {v1} && cp -a {base} {v1}")
    with chrooted(v1):
        r = subprocess.run(["chroot", str(v1), "apt-get", "install", "-y", "-q", "--no-download", "python3", "git"],
                           env=ENV, capture_output=True, text=True)  # fmt: skip
        if r.returncode:
            raise SystemExit(f"apt-get install in the image failed: {r.stderr.strip()[-300:]}")
    sh(f"rm -rf {v1}/var/cache/apt/archives/*.deb")
    v2 = work / "v2"
    sh(f"rm -rf {v2} && cp -a {v1} {v2}")
    files = sorted(p for p in (v2 / "usr").rglob("*") if p.is_file() and not p.is_symlink())
    for p in files[::10]:
        with open(p, "ab") as f:
            f.write(b"\n")
    store = work / "build-store"
    for tag, tree in (("1", v1), ("2", v2)):
        sh(f"tar -C {tree} -cf {work}/v{tag}.tar .")
        sh(f"{UM} image import --root {store} {work}/v{tag}.tar --tag deb:{tag}")
        sh(f"{UM} image save --root {store} deb:{tag} oci:{oci}:{tag}")
    return oci


def timed(cmd: list[str], server: str | None = None) -> float:
    """Seconds ``cmd`` took: a Python start of its own, or (``server``: its socket) a fork of a running server."""
    env = {**os.environ, "UNIONMOUNT_SERVER": server} if server else {**os.environ, "UNIONMOUNT_NO_SERVER": "1"}
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {r.stderr.strip()[-300:]}")
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rate", type=float, default=12.5, help="MB/s per connection")
    ap.add_argument("--latency", type=float, default=20.0, help="ms added to each request")
    ap.add_argument("--out", default=str(HERE / "RESULTS-lazy.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (mounts, chroot)", file=sys.stderr)
        return 2
    oci = images(ROOT.parent / "lazy-build")
    fs = scratch_fs(ROOT.parent)
    work = fs / "lazy"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    rows: dict[str, list[tuple[float, int]]] = {}
    sizes: dict[str, int] = {}

    def run(name: str, proxy: CuttingProxy, cmd: list[str]) -> None:
        before = proxy.down
        t = timed(cmd)
        rows.setdefault(name, []).append((t, proxy.down - before))
        print(f"{name}: {t:.2f} s, {(proxy.down - before) / 1e6:.1f} MB", flush=True)

    sock = str(work / "server.sock")
    server = subprocess.Popen([UM, "server"], env={**os.environ, "UNIONMOUNT_SERVER": sock}, stderr=subprocess.DEVNULL)
    try:
        while not os.path.exists(sock):
            time.sleep(0.05)
        with registry(work / "reg") as reg:
            for tag in ("1", "2"):
                digest = reg.push(f"oci:{oci}:{tag}", f"deb:{tag}", "--dest-compress-format", "zstd:chunked")
                sizes[tag] = sum(la["size"] for la in json.loads(reg.blob_file(digest).read_bytes())["layers"])
            proxy = CuttingProxy(reg.host, rate=args.rate * 1e6, latency=args.latency / 1000)
            ref = f"{proxy.host}/deb:1"
            for r in range(args.rounds):
                d = work / f"r{r}"
                mnt = d / "mnt"
                mnt.mkdir(parents=True)
                # lazy: mount, first read, python start
                t0, b0 = time.perf_counter(), proxy.down
                cmd = [UM, "mount", "--root", str(d / "lazy"), "--image", ref, "--pull", "lazy", "--no-prefetch"]
                timed([*cmd, str(mnt)])
                (mnt / "etc/os-release").read_bytes()
                rows.setdefault("lazy: mount + cat /etc/os-release", []).append(
                    (time.perf_counter() - t0, proxy.down - b0)
                )
                with chrooted(mnt):
                    run(
                        "lazy: then python3 -c 'import json'",
                        proxy,
                        ["chroot", str(mnt), "python3", "-c", "import json"],
                    )
                rows["lazy: total for python3"] = [(rows["lazy: mount + cat /etc/os-release"][-1][0]
                                                   + rows["lazy: then python3 -c 'import json'"][-1][0],
                                                   proxy.down - b0)]  # fmt: skip
                timed([UM, "umount", str(mnt)])
                # the same with `unionmount server` running (the command a fork of it, no Python start)
                t0, b0 = time.perf_counter(), proxy.down
                timed([LAUNCHER, *cmd[1:3], str(d / "lazy-server"), *cmd[4:], str(mnt)], sock)
                (mnt / "etc/os-release").read_bytes()
                rows.setdefault("lazy, `unionmount server` running: mount + cat /etc/os-release", []).append(
                    (time.perf_counter() - t0, proxy.down - b0)
                )
                timed([UM, "umount", str(mnt)])
                # full pulls
                run("unionmount image pull", proxy, [UM, "image", "--root", str(d / "full"), "pull", ref])
                podman = ["podman", "--root", str(d / "podman"), "--runroot", str(d / "podman-run"), "--storage-driver",
                          "overlay", "pull", "--tls-verify=false", "-q", ref]  # fmt: skip
                run("podman pull", proxy, podman)
                run("skopeo copy (fetch only)", proxy,
                    ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"dir:{d / 'skopeo'}"])  # fmt: skip
                # partial: version 2 where version 1 is
                run("unionmount image pull of version 2 (has 1)", proxy,
                    [UM, "image", "--root", str(d / "full"), "pull", f"{proxy.host}/deb:2"])  # fmt: skip
                sh(f"podman --root {d / 'podman'} --runroot {d / 'podman-run'} rmi -a -f", check=False)
                shutil.rmtree(d, ignore_errors=True)
            proxy.close()
    finally:
        server.terminate()
        server.wait()
        release_fs(fs)
    full = statistics.median(b for _, b in rows["unionmount image pull"])
    lines = [
        "# Lazy and partial pulls",
        "",
        f"`perf/lazy_bench.py --rounds {args.rounds} --rate {args.rate:g} --latency {args.latency:g}`: one image "
        f"(Debian bookworm minbase with python3 and git, zstd:chunked, {sizes['1'] / 1e6:.0f} MB compressed), "
        f"through a proxy of {args.rate:g} MB/s per connection and {args.latency:g} ms per request, "
        f"medians of {args.rounds} round(s).",
        "",
        "| what | seconds | MB downloaded | share of a full pull's bytes |",
        "|---|---:|---:|---:|",
    ]
    for name, vals in rows.items():
        t = statistics.median(v[0] for v in vals)
        b = statistics.median(v[1] for v in vals)
        lines.append(f"| {name} | {t:.2f} | {b / 1e6:.1f} | {b / full:.3f} |")
    part = statistics.median(b for _, b in rows["unionmount image pull of version 2 (has 1)"])
    lines += ["", f"Version 2 (every tenth file under /usr changed) is {sizes['2'] / 1e6:.0f} MB compressed; "
              f"its pull into a store holding version 1 downloaded {part / 1e6:.1f} MB, "
              f"{100 * part / sizes['2']:.1f}% of it."]  # fmt: skip
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
