"""The command: its three syntaxes, unmounting, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .mounts import COMMAND, daemon_pid, fresh_dirs, is_mounted, run, union


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    names = ("lower", "lower2", "upper", "work", "mnt")
    out = dict(zip(names, fresh_dirs(tmp_path, *names), strict=True))
    (out["lower"] / "hello").write_text("hi\n")
    (out["lower2"] / "base").write_text("base\n")
    return out


def unionmount(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run([*COMMAND, *map(str, args)], check=False)


def assert_one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("unionmount: "), r.stderr
    assert needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def cleanup(mnt: Path) -> None:
    if is_mounted(mnt):
        unionmount("umount", mnt)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing lower", "does not exist"),
        ("no lower", "no lower directory"),
        ("upper without work", "needs a work directory"),
        ("work inside upper", "must not contain each other"),
        ("lower is upper", "overlaps the upper"),
        ("mountpoint is a file", "is not a directory"),
        ("different filesystems", "different filesystems"),
        ("unknown option", "unknown mount option"),
        ("bad timeout", "timeout takes seconds"),
        ("bad settle", "settle takes milliseconds"),
        ("bad spin", "spin takes 0 or 1"),
        ("unknown flag", "unknown option"),
        ("missing mountpoint", "does not exist"),
    ],
)
def test_bad_arguments_get_one_line(case: str, needle: str, dirs: dict[str, Path], tmp_path: Path) -> None:
    lo, up, wk, mnt = dirs["lower"], dirs["upper"], dirs["work"], dirs["mnt"]
    args: list[str | Path]
    if case == "missing lower":
        args = ["mount", "--lower", tmp_path / "nope", mnt]
    elif case == "no lower":
        args = ["mount", mnt]
    elif case == "upper without work":
        args = ["mount", "--lower", lo, "--upper", up, mnt]
    elif case == "work inside upper":
        (up / "w").mkdir()
        args = ["mount", "--lower", lo, "--upper", up, "--work", up / "w", mnt]
    elif case == "lower is upper":
        args = ["mount", "--lower", up, "--upper", up, "--work", wk, mnt]
    elif case == "mountpoint is a file":
        (tmp_path / "file").touch()
        args = ["mount", "--lower", lo, tmp_path / "file"]
    elif case == "different filesystems":
        shm = Path(os.environ.get("TMPFS_DIR", "/dev/shm")) / f"unionmount-test-{os.getpid()}"
        shm.mkdir(exist_ok=True)
        try:
            r = unionmount("mount", "--lower", lo, "--upper", up, "--work", shm, mnt)
        finally:
            shutil.rmtree(shm)
        assert_one_line_error(r, needle)
        return
    elif case == "unknown option":
        args = ["-o", f"lowerdir={lo},bogus=1", mnt]
    elif case == "bad timeout":
        args = ["-o", f"lowerdir={lo},timeout=soon", mnt]
    elif case == "bad settle":
        args = ["-o", f"lowerdir={lo},settle=-1", mnt]
    elif case == "bad spin":
        args = ["-o", f"lowerdir={lo},spin=yes", mnt]
    elif case == "unknown flag":
        args = ["--frobnicate", mnt]
    else:
        args = ["mount", "--lower", lo, tmp_path / "no-such-mnt"]
    r = unionmount(*args)
    assert_one_line_error(r, needle)
    assert not is_mounted(mnt)


def test_already_mounted_is_refused(dirs: dict[str, Path]) -> None:
    with union(dirs["mnt"], [dirs["lower"]]):
        r = unionmount("mount", "--lower", dirs["lower2"], dirs["mnt"])
        assert_one_line_error(r, "already mounted")


def test_fuse_overlayfs_syntax(dirs: dict[str, Path]) -> None:
    lo, lo2, up, wk, mnt = (dirs[k] for k in ("lower", "lower2", "upper", "work", "mnt"))
    opts = f'lowerdir={lo}:{lo2},upperdir={up},workdir={wk},fsync=0,noxattrs=0,context="x",allow_other'
    r = unionmount("-o", opts, mnt)
    try:
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(mnt)) == ["base", "hello"]
        (mnt / "new").write_text("n")
        assert (up / "new").read_text() == "n"
    finally:
        cleanup(mnt)


def test_mount_helper_syntax(dirs: dict[str, Path]) -> None:
    """mount(8) → mount.fuse3 → `unionmount SRC MNT -o rw,...` (needs the /usr/local/bin link setup makes)."""
    lo, up, wk, mnt = (dirs[k] for k in ("lower", "upper", "work", "mnt"))
    assert shutil.which("mount.fuse3") or Path("/sbin/mount.fuse3").exists()
    r = subprocess.run(
        ["mount", "-t", "fuse.unionmount", "myunion", str(mnt), "-o", f"lowerdir={lo},upperdir={up},workdir={wk}"],
        capture_output=True,
        text=True,
    )
    try:
        assert r.returncode == 0, r.stderr
        assert (mnt / "hello").read_text() == "hi\n"
        line = next(x for x in Path("/proc/self/mounts").read_text().splitlines() if f" {mnt} " in x)
        assert line.startswith("myunion ") and " fuse.unionmount " in line
    finally:
        cleanup(mnt)


def test_umount_ends_the_daemon(dirs: dict[str, Path]) -> None:
    lo, mnt = dirs["lower"], dirs["mnt"]
    r = unionmount("mount", "--lower", lo, mnt)
    assert r.returncode == 0, r.stderr
    try:
        pid = daemon_pid(mnt)
        r = unionmount("umount", mnt)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        cleanup(mnt)
    r = unionmount("umount", mnt)
    assert_one_line_error(r, "cannot unmount")


def test_foreground_and_sigint(dirs: dict[str, Path]) -> None:
    lo, mnt = dirs["lower"], dirs["mnt"]
    proc = subprocess.Popen([*COMMAND, "mount", "-f", "--lower", str(lo), str(mnt)], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if is_mounted(mnt) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert is_mounted(mnt)
        assert (mnt / "hello").read_text() == "hi\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not is_mounted(mnt)
        assert "mounted" in proc.stderr.read()  # logs go to stderr in the foreground
    finally:
        if proc.poll() is None:
            proc.kill()
        cleanup(mnt)


def test_help_and_version() -> None:
    r = unionmount("--help")
    assert r.returncode == 0 and "unionmount mount --lower" in r.stdout
    r = unionmount("--version")
    assert r.returncode == 0 and r.stdout.startswith("unionmount ")


def test_stats_counts_requests(dirs: dict[str, Path]) -> None:
    import json

    with union(dirs["mnt"], [dirs["lower"]], dirs["upper"], dirs["work"]) as mnt:
        for i in range(20):
            (mnt / f"n{i}").write_text("x")
        os.listdir(mnt)
        r = run([*COMMAND, "stats", str(mnt), "--format", "json"], check=False)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        # root on Linux >= 6.9: the kernel writes the files itself (passthrough), the daemon sees no WRITE
        assert data["settings"]["passthrough"] is True
        assert data["ops"]["create"]["count"] == 20 and "write" not in data["ops"]
        # the kernel splits CPU time between user and system by sampling ticks; only their sum is exact
        cpu = data["cpu_user_s"] + data["cpu_system_s"]
        assert data["ops"]["create"]["mean_us"] > 0 and data["max_rss_kb"] > 0 and cpu > 0
        table = run([*COMMAND, "stats", str(mnt)]).stdout
        assert "create" in table and "MEAN" in table
    r = run([*COMMAND, "stats", str(dirs["mnt"])], check=False)
    assert r.returncode != 0 and "no unionmount daemon serves" in r.stderr


def test_root_before_or_after_the_action(image: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    r = run([*COMMAND, "image", "import", f"oci:{image}/img:t", "--tag", "a:1", "--root", str(store)], check=False)
    assert r.returncode == 0, r.stderr
    after = run([*COMMAND, "image", "ls", "--root", str(store), "--format", "json"], check=False)
    before = run([*COMMAND, "image", "--root", str(store), "ls", "--format", "json"], check=False)
    assert after.returncode == 0 and after.stdout == before.stdout and '"a:1"' in after.stdout
    for cmd in (["container", "ls", "--root", str(store)], ["volume", "ls", "--root", str(store)]):
        assert run([*COMMAND, *cmd], check=False).returncode == 0


def test_only_the_daemon_serving_the_mount_is_ever_signalled(dirs: dict[str, Path]) -> None:
    """`stats` and `umount` reach the daemon through the mount: a wrapper whose command line names it is left alone."""
    mnt = dirs["mnt"]
    wrapper = subprocess.Popen(["timeout", "120", *COMMAND, "mount", "-f", "--lower", str(dirs["lower"]), str(mnt)])
    try:
        for _ in range(200):
            if is_mounted(mnt) or wrapper.poll() is not None:
                break
            time.sleep(0.05)
        assert is_mounted(mnt)
        r = run([*COMMAND, "stats", str(mnt), "--format", "json"], check=False)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["pid"] == daemon_pid(mnt) != wrapper.pid
        time.sleep(0.2)
        assert wrapper.poll() is None, "the wrapper was signalled"
        assert (mnt / "hello").read_text() == "hi\n"
        assert run([*COMMAND, "umount", str(mnt)], check=False).returncode == 0
        assert wrapper.wait(timeout=30) == 0  # the daemon exited 0 and the wrapper passed that on
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        cleanup(mnt)
    r = run([*COMMAND, "stats", str(dirs["lower"])], check=False)  # not a mount
    assert r.returncode != 0 and "no unionmount daemon serves" in r.stderr
