#!/usr/bin/env python3
"""Side-by-side benchmark: kernel overlayfs, fuse-overlayfs, unionfs-fuse and unionmount.

One command builds the data, mounts the same lower layers with each target (a
fresh upper for every run), runs every workload on every target interleaved
(A B C D, then D C B A, ...), and writes a table of medians with the ratios
unionmount/fuse-overlayfs and unionmount/kernel to perf/RESULTS.md, with the
machine, versions and date. For unionmount it also records the daemon's CPU
seconds per workload (from /proc) and its peak RSS. "Cold" runs follow
``echo 3 > /proc/sys/vm/drop_caches``.

Run as root (mounting overlayfs and dropping caches need it):

    .venv/bin/python perf/bench.py [--rounds 3] [--scale 1.0] [--only find,stat]

``--targets "unionmount;unionmount:writeback=0"`` puts variants of our mount side
by side (each ``-o`` option a lever). ``--scale`` shrinks every data set (0.2 for
a quick look); the README's sizes are at 1.0: 50k files in 2k dirs, a 1 GiB file,
a 54 MB source tree.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
UM = str(Path(sys.executable).parent / "unionmount")
TARGETS = ("kernel", "fuse-overlayfs", "unionfs-fuse", "unionmount")
SOURCE_TREE = Path("/usr/lib/python3.11")


def sh(cmd: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-ec", cmd], cwd=cwd, check=check, capture_output=True, text=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


# -- data -------------------------------------------------------------------------------


def scratch_fs(root: Path, size_gib: int = 40) -> Path:
    """A private ext4 for the data and every run: a sparse image on a direct-I/O loop device, no discard.

    The host's root filesystem here is mounted with ``discard``: for seconds after a
    tree is deleted, creating a file there takes 0.5-0.8 ms instead of 22 us, so a
    write workload measured whichever target came after a cleanup. A filesystem of
    our own gives every target the same disk; direct I/O on the loop device keeps
    the host's page cache out of it (with it, a 1 GiB copy-up and fsync varied 2x).
    """
    img, mnt = root / "ext4.img", root / "fs"
    mnt.mkdir(parents=True, exist_ok=True)
    if sh(f"mountpoint -q {mnt}", check=False).returncode == 0:
        return mnt
    if not img.exists():
        sh(f"truncate -s {size_gib}G {img}")
        sh(f"mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 {img}")
    dev = sh(f"losetup --direct-io=on -f --show {img}").stdout.strip()
    sh(f"mount -o nodiscard {dev} {mnt}")
    return mnt


def release_fs(mnt: Path) -> None:
    dev = sh(f"findmnt -n -o SOURCE {mnt}", check=False).stdout.strip()
    sh(f"umount {mnt}", check=False)
    if dev.startswith("/dev/loop"):
        sh(f"losetup -d {dev}", check=False)


@dataclass
class Data:
    root: Path
    scale: float
    layers: list[Path] = field(default_factory=list)  # top first

    @property
    def lower(self) -> str:
        return ":".join(str(p) for p in self.layers)


def build(root: Path, scale: float) -> Data:
    """Two lower layers: a base with the many-files tree, big file, source tree and git checkout; a small top."""
    data = Data(root, scale)
    base, top = root / "base", root / "top"
    if (root / ".built").exists() and (root / ".built").read_text() == str(scale):
        data.layers = [top, base]
        return data
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    top.mkdir()
    nfiles, ndirs = int(50_000 * scale), max(int(2_000 * scale), 1)
    print(f"building data: {nfiles} files in {ndirs} dirs, a {int(1024 * scale)} MiB file, a source tree", flush=True)
    many = base / "many"
    for d in range(ndirs):
        (many / f"d{d:04}").mkdir(parents=True)
    for i in range(nfiles):
        (many / f"d{i % ndirs:04}" / f"f{i}").write_bytes(b"x" * (i % 700))
    sh(f"dd if=/dev/urandom of={base}/big bs=1M count={int(1024 * scale)} status=none")
    shutil.copytree(SOURCE_TREE, base / "src", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    sh(
        "git init -q && git add -A && git -c user.email=b@b -c user.name=b commit -qm base && git gc -q",
        cwd=base / "src",
    )
    (base / "copyup").mkdir()
    for i in range(1000):
        (base / "copyup" / f"c{i}").write_bytes(b"c" * 4096)
    sh(f"tar -C {base} -cf {root}/src.tar src")
    (top / "top-file").write_text("top\n")
    (root / ".built").write_text(str(scale))
    data.layers = [top, base]
    return data


# -- targets ------------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, data: Data, work: Path) -> None:
        self.name = name
        self.data = data
        self.work = work
        self.mnt = work / "mnt"
        self.pid: int | None = None

    def mount(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        for d in ("upper", "work", "mnt"):
            (self.work / d).mkdir(parents=True)
        up, wk, mnt, lower = self.work / "upper", self.work / "work", self.mnt, self.data.lower
        if self.name == "kernel":
            sh(f"mount -t overlay overlay -o lowerdir={lower},upperdir={up},workdir={wk} {mnt}")
        elif self.name == "fuse-overlayfs":
            sh(f"fuse-overlayfs -o lowerdir={lower},upperdir={up},workdir={wk} {mnt}")
        elif self.name == "unionfs-fuse":
            branches = ":".join([f"{up}=RW", *(f"{p}=RO" for p in self.data.layers)])
            sh(f"unionfs-fuse -o cow,allow_other,use_ino,suid,dev {branches} {mnt}")
        else:  # "unionmount" or a variant "unionmount:OPTS" (mounted with -o OPTS)
            opts = self.name.partition(":")[2]
            sh(f"{UM} mount --lower {lower} --upper {up} --work {wk} {f'-o {opts} ' if opts else ''}{mnt}")
        self.pid = _daemon_pid(mnt) if self.name != "kernel" else None

    def umount(self) -> None:
        for cmd in (f"umount {self.mnt}", f"umount -l {self.mnt}"):
            if sh(cmd, check=False).returncode == 0:
                break
        if self.pid is not None:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)

    def cpu(self) -> float:
        if self.pid is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self) -> int:
        if self.pid is None:
            return 0
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0


def _daemon_pid(mnt: Path) -> int | None:
    needle = os.fsencode(str(mnt))
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in args or any(a.endswith(b" " + needle) for a in args):
                return int(pid)
    return None


# -- workloads ---------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    run: Callable[[Path, Data], None]
    cold: bool = False
    prepare: Callable[[Path, Data], None] | None = None  # on the fresh mount, untimed (warms for "warm")


def _find(m: Path, d: Data) -> None:
    sh(f"find {m}/many -printf ''")


def _stat(m: Path, d: Data) -> None:
    sh(f"find {m}/many -printf '%s %u %m\\n' > /dev/null")


def _seq_read(m: Path, d: Data) -> None:
    sh(f"cat {m}/big > /dev/null")


def _src_read(m: Path, d: Data) -> None:
    sh(f"find {m}/src -path '*/.git' -prune -o -type f -print0 | xargs -0 cat > /dev/null")


def _seq_write(m: Path, d: Data) -> None:
    size = max(int(512 * d.scale), 16)
    sh(f"fio --name=w --filename={m}/fio.out --rw=write --bs=1M --size={size}M --end_fsync=1 --output=/dev/null")


def _untar(m: Path, d: Data) -> None:
    sh(f"mkdir {m}/untar && tar -C {m}/untar -xf {d.root}/src.tar")


def _copyups(m: Path, d: Data) -> None:
    sh(f"for f in {m}/copyup/*; do printf x >> $f; done")


def _first_write(m: Path, d: Data) -> None:
    sh(f"printf x >> {m}/big")


def _git_status(m: Path, d: Data) -> None:
    sh("git status --porcelain > /dev/null", cwd=m / "src")


def _compileall(m: Path, d: Data) -> None:
    sh(f"python3 -m compileall -q -j 1 {m}/src/json {m}/src/email {m}/src/asyncio > /dev/null", check=False)


def _parallel(m: Path, d: Data) -> None:
    dirs = sorted(p.name for p in (m / "src").iterdir() if p.is_dir() and p.name != ".git")
    parts = [" ".join(f"{m}/src/{x}" for x in dirs[i::4]) for i in range(4)]
    sh(" & ".join(f"(find {p} -type f -print0 | xargs -0 cat > /dev/null)" for p in parts) + " & wait")


WORKLOADS = [
    Workload("find, cold", _find, cold=True),
    Workload("find, warm", _find, prepare=_find),
    Workload("stat all, cold", _stat, cold=True),
    Workload("stat all, warm", _stat, prepare=_stat),
    Workload("1 GiB sequential read, cold", _seq_read, cold=True),
    Workload("1 GiB sequential read, warm", _seq_read, prepare=_seq_read),
    Workload("read source tree, cold", _src_read, cold=True),
    Workload("read source tree, warm", _src_read, prepare=_src_read),
    Workload("512 MiB sequential write (fio)", _seq_write),
    Workload("untar source tree", _untar),
    Workload("1,000 copy-ups (append 1 byte)", _copyups),
    Workload("first write into 1 GiB lower file", _first_write),
    Workload("git status, cold", _git_status, cold=True),
    Workload("git status, warm", _git_status, prepare=_git_status),
    Workload("compileall (3 packages)", _compileall),
    Workload("4 parallel readers", _parallel, cold=True),
]


# -- driver ------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    def v(cmd: str) -> str:
        r = sh(cmd, check=False)
        lines = (r.stdout + r.stderr).strip().splitlines()
        tool = cmd.split()[0].rsplit("/", 1)[-1]
        return next((ln for ln in lines if ln.startswith(tool)), lines[0] if lines else "?")

    return {
        "kernel": platform.release(),
        "fuse-overlayfs": v("fuse-overlayfs --version"),
        "unionfs-fuse": v("unionfs-fuse --version"),
        "unionmount": v(f"{UM} --version"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--only", default="", help="comma-separated substrings of workload names")
    ap.add_argument(
        "--targets",
        default=";".join(TARGETS),
        help="';'-separated; 'unionmount:OPTS' adds our mount with -o OPTS (e.g. 'unionmount:timeout=0')",
    )
    ap.add_argument("--data", default="/var/tmp/unionmount-bench", help="where the data's filesystem image is kept")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("perf/bench.py: run as root (overlayfs mounts and drop_caches)")
    for tool in ("fuse-overlayfs", "unionfs-fuse", "fio", "git"):
        if shutil.which(tool) is None:
            sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse-overlayfs unionfs-fuse fio git")
            break
    fs = scratch_fs(Path(args.data))
    data = build(fs / "data", args.scale)
    targets = [t for t in args.targets.split(";") if t]
    work = Path(tempfile.mkdtemp(prefix="um-bench.", dir=fs))
    wanted = [w for w in WORKLOADS if not args.only or any(s in w.name for s in args.only.split(","))]
    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[str, list[float]] = {}
    rss = 0
    try:
        for w in wanted:
            print(f"== {w.name}", flush=True)
            for r in range(args.rounds):
                order = targets if r % 2 == 0 else list(reversed(targets))
                for name in order:
                    t = Target(name, data, work / name.replace(":", "-").replace(",", "-"))
                    t.mount()
                    try:
                        if w.prepare:
                            w.prepare(t.mnt, data)
                        if w.cold:
                            drop_caches()
                        os.sync()  # nothing of an earlier run is still being written back
                        c0 = t.cpu()
                        start = time.perf_counter()
                        w.run(t.mnt, data)
                        took = time.perf_counter() - start
                        if name == "unionmount":
                            cpu.setdefault(w.name, []).append(t.cpu() - c0)
                            rss = max(rss, t.rss_kb())
                    finally:
                        t.umount()
                        shutil.rmtree(t.work, ignore_errors=True)
                    times.setdefault((w.name, name), []).append(took)
                    print(f"   {name:<15} {took:8.3f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        release_fs(fs)
    write_results(args, targets, wanted, times, cpu, rss)
    return 0


def _mem_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def write_results(args, targets, wanted, times, cpu, rss) -> None:  # noqa: ANN001
    uname = platform.uname()
    vs = versions()
    lines = [
        f"# Side-by-side benchmark ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {uname.machine}, {os.cpu_count()} cores, {_mem_gib():.0f} GiB, "
        f"kernel {uname.release}. Versions: " + "; ".join(f"{k} {v}" for k, v in vs.items()) + ".",
        f"Command: `{' '.join(sys.argv)}` — median of {args.rounds} rounds, targets interleaved "
        "(order reversed every other round), a fresh upper layer for every run; seconds.",
        "",
        "| workload | " + " | ".join(targets) + " | um/fuse-overlayfs | um/kernel | unionmount CPU s |",
        "| --- | " + " | ".join("---:" for _ in targets) + " | ---: | ---: | ---: |",
    ]
    for w in wanted:
        med = {t: statistics.median(times[(w.name, t)]) for t in targets if (w.name, t) in times}
        um = med.get("unionmount")
        r1 = f"{um / med['fuse-overlayfs']:.2f}" if um and med.get("fuse-overlayfs") else "-"
        r2 = f"{um / med['kernel']:.2f}" if um and med.get("kernel") else "-"
        c = f"{statistics.median(cpu[w.name]):.2f}" if w.name in cpu else "-"
        lines.append(
            f"| {w.name} | "
            + " | ".join(f"{med.get(t, float('nan')):.3f}" for t in targets)
            + f" | {r1} | {r2} | {c} |"
        )
    lines += ["", f"unionmount daemon peak RSS over all runs: {rss / 1024:.0f} MiB."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
