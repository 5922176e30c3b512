"""Layouts of lowers, upper, work directory, grafts and mount point: none may hang the daemon.

A layer that contains the mount point is seen as kernel overlayfs sees it, without the
mounts inside it (the union's own included): the daemon would otherwise cross into its
own mount and wait for itself. A hung mount is aborted through fusectl and fails the test.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .images import um
from .mounts import force_unmount, is_mounted, overlay


def _abort(mnt: Path) -> None:
    """Abort the FUSE connection of ``mnt`` (what a hung mount needs)."""
    if not os.path.ismount("/sys/fs/fuse/connections"):
        subprocess.run(["mount", "-t", "fusectl", "none", "/sys/fs/fuse/connections"], capture_output=True)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt) and "fuse" in line:
                minor = fields[2].split(":")[1]
                Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")


def _walk(mnt: Path) -> list[str]:
    """Every path below ``mnt`` with its type, by a separate process that must finish within 20 s."""
    p = subprocess.Popen(["find", str(mnt), "-printf", "%P %y\\n"], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        _abort(mnt)  # first: a process in uninterruptible sleep cannot be killed
        p.kill()
        p.communicate()
        pytest.fail(f"the walk of {mnt} hung")
    assert p.returncode == 0
    return sorted(out.splitlines())


LAYOUTS = {
    # name: (lower dirs, upper, work, extra args, mount point), relative to the test's directory
    "lower contains the mount point": (["t/mnt"], None, None, [], "t/mnt/a"),
    "lower is the mount point": (["t/mnt"], None, None, [], "t/mnt"),
    "upper contains the mount point": (["t/l"], "t/u", "t/w", [], "t/u/m"),
    "work contains the mount point": (["t/l"], "t/u", "t/w", [], "t/w/m"),
    "two lowers, the second contains it": (["t/l", "t/mnt"], "t/u", "t/w", [], "t/mnt/a"),
    "a bind contains the mount point": (["t/l"], "t/u", "t/w", ["-v", "T:/host"], "t/m"),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_no_layout_hangs_the_daemon(name: str, tmp_path: Path) -> None:
    lowers, upper, work, extra, mnt_rel = LAYOUTS[name]
    t = tmp_path / "t"
    for d in ("mnt/a", "mnt/b", "l/dir", "u", "w", "m"):
        (t / d).mkdir(parents=True, exist_ok=True)
    (t / "mnt" / "b" / "f").write_text("below\n")
    (t / "l" / "dir" / "g").write_text("lower\n")
    (t / "u" / "m").mkdir(exist_ok=True)
    (t / "w" / "m").mkdir(exist_ok=True)
    mnt = tmp_path / mnt_rel
    args = ["mount", "--lower", ":".join(str(tmp_path / p) for p in lowers)]
    if upper:
        args += ["--upper", str(tmp_path / upper), "--work", str(tmp_path / work)]
    args += [a.replace("T", str(t)) for a in extra]
    r = um(*args, mnt)
    if r.returncode != 0:  # refused is fine (with one line), hanging is not
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert not is_mounted(mnt)
        return
    try:
        seen = _walk(mnt)
        assert seen  # the walk finished and saw the layers
        if upper:
            (mnt / "new").write_text("written\n")  # a copy-up and a create work through the view
            assert (mnt / "new").read_text() == "written\n"
    finally:
        if is_mounted(mnt):
            if um("umount", mnt).returncode != 0:
                _abort(mnt)
                force_unmount(mnt)


def test_a_lower_containing_the_mount_point_shows_as_overlayfs_shows_it(tmp_path: Path) -> None:
    t = tmp_path / "t"
    for d in ("mnt/a", "mnt/b", "u1", "w1", "u2", "w2"):
        (t / d).mkdir(parents=True)
    (t / "mnt" / "b" / "f").write_text("below\n")
    (t / "mnt" / "a" / "hidden").write_text("under the mount point\n")
    ours, ref = t / "mnt" / "a", tmp_path / "ref"
    ref.mkdir()
    with overlay(ref, [t / "mnt"], t / "u2", t / "w2"):
        want = _walk(ref)
    r = um("mount", "--lower", t / "mnt", "--upper", t / "u1", "--work", t / "w1", ours)
    assert r.returncode == 0, r.stderr
    try:
        assert _walk(ours) == want
        assert "a/hidden f" in want and os.listdir(ours / "a") == ["hidden"]
    finally:
        if um("umount", ours).returncode != 0:
            _abort(ours)
            force_unmount(ours)
