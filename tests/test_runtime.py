"""A container runtime as the client: runc runs a process whose root is an image mount.

The image holds what a minimal container needs (dash, coreutils and their
libraries, copied from the host by umoci); the container writes to its root
(the container layer), to a named volume and deletes an image file, exactly as
``docker run`` would have it do. What the runtime did is then read back the way
a user would: ``unionmount diff``, the volume on the host, and a remount.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .images import sh, um
from .mounts import force_unmount, is_mounted

TOOLS = ["/bin/dash", "/bin/cat", "/bin/ls", "/bin/rm", "/bin/mkdir", "/usr/bin/id", "/usr/bin/stat"]


@pytest.fixture(scope="module")
def runtime_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout ``img:t``: the tools above with their libraries, /etc/motd, and VOLUME /data."""
    base = tmp_path_factory.mktemp("rt-image")
    libs = set()
    for tool in TOOLS:
        out = subprocess.run(["ldd", tool], capture_output=True, text=True, check=True).stdout
        libs |= {w for w in out.split() if w.startswith("/")}
    copies = " && ".join(f"mkdir -p .{Path(f).parent} && cp -L {f} .{f}" for f in sorted(libs | set(TOOLS)))
    sh(
        f"""
        umoci init --layout img && umoci new --image img:t && umoci unpack --image img:t b
        cd b/rootfs && {copies} && ln -s dash bin/sh
        mkdir -p etc tmp proc dev sys data && echo hello > etc/motd && echo old > etc/gone
        cd ../.. && umoci repack --image img:t b
        umoci config --image img:t --config.volume /data
        """,
        base,
    )
    return base


def _bundle(path: Path, rootfs: Path, script: str) -> Path:
    path.mkdir()
    subprocess.run(["runc", "spec"], cwd=path, check=True, capture_output=True)
    config = json.loads((path / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/sh", "-c", script]
    config["root"] = {"path": str(rootfs), "readonly": False}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_runc_runs_a_container_on_an_image_mount(runtime_image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert um("image", "--root", store, "import", f"oci:{runtime_image}/img:t", "--tag", "rt:1").returncode == 0
    assert um("volume", "--root", store, "create", "vol").returncode == 0
    script = (
        "cat /etc/motd; echo written > /tmp/new; rm /etc/gone; mkdir -p /var/log; echo log > /var/log/app; "
        "echo kept > /data/file; echo more >> /etc/motd; id -u; stat -c %i /etc/motd"
    )
    r = um("mount", "--root", store, "--image", "rt:1", "--name", "c1", "-v", "vol:/data", "--log", tmp_path / "log",
           mnt)  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        bundle = _bundle(tmp_path / "bundle", mnt, script)
        run = subprocess.run(["runc", "run", "--bundle", str(bundle), f"um-{tmp_path.name}"[:60]],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert run.returncode == 0, run.stderr
        motd, uid, ino = run.stdout.split("\n")[:3]
        assert motd == "hello" and uid == "0"
        assert int(ino) == (mnt / "etc" / "motd").stat().st_ino  # the container saw the mount's inode
        assert (mnt / "etc" / "motd").read_text() == "hello\nmore\n"
    finally:
        if um("umount", mnt).returncode != 0:
            force_unmount(mnt)
    assert not is_mounted(mnt)
    diff = um("diff", "--root", store, "c1")
    assert diff.returncode == 0, diff.stderr
    lines = set(diff.stdout.splitlines())
    assert {"C /etc/motd", "D /etc/gone", "A /tmp/new", "A /var/log/app"} <= lines, diff.stdout
    assert not any("/data" in line for line in lines)  # the volume is not the container layer
    vol = json.loads(um("volume", "--root", store, "inspect", "vol").stdout)[0]["Mountpoint"]
    assert (Path(vol) / "file").read_text() == "kept\n"
    # the container layer is there at the next mount
    r = um("mount", "--root", store, "--image", "rt:1", "--name", "c1", "--image-volumes", "ignore", mnt)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "tmp" / "new").read_text() == "written\n"
        assert not (mnt / "etc" / "gone").exists()
    finally:
        if um("umount", mnt).returncode != 0:
            force_unmount(mnt)
    shutil.rmtree(tmp_path / "bundle", ignore_errors=True)


def _mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


@pytest.fixture
def podman():  # noqa: ANN201
    """podman with private storage whose overlay driver mounts through unionmount (fuse-overlayfs' role).

    Explicit ulimits: podman's defaults raise limits, which needs CAP_SYS_RESOURCE (this VM's root lacks it).
    """
    base = Path(tempfile.mkdtemp(prefix="um-podman-", dir="/tmp"))  # podman wants a runroot under 50 characters
    cmd = ["podman", "--root", str(base / "root"), "--runroot", str(base / "run"),
           "--storage-driver", "overlay", "--storage-opt", f"overlay.mount_program={shutil.which('unionmount')}",
           "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "none"]  # fmt: skip
    try:
        yield cmd
    finally:
        subprocess.run([*cmd, "rm", "-af"], capture_output=True, timeout=120)
        subprocess.run([*cmd, "system", "reset", "-f"], capture_output=True, timeout=120)
        for m in reversed(_mounts_below(base)):
            force_unmount(Path(m))
        shutil.rmtree(base, ignore_errors=True)


def test_podman_uses_unionmount_as_its_mount_program(runtime_image: Path, podman: list[str]) -> None:
    def p(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*podman, *args], capture_output=True, text=True, timeout=120)

    assert shutil.which("unionmount"), "setup links unionmount into /usr/local/bin"
    r = p("pull", "-q", f"oci:{runtime_image}/img:t")
    assert r.returncode == 0, r.stderr
    image = r.stdout.strip()
    run = ["run", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]
    r = p(*run, "--name", "c1", image, "sh", "-c",
          "cat /proc/mounts; echo written > /tmp/new; rm /etc/gone; echo more >> /etc/motd; cat /etc/motd")  # fmt: skip
    assert r.returncode == 0, r.stderr
    root = r.stdout.splitlines()[0].split()
    assert root[1:3] == ["/", "fuse.unionmount"], r.stdout  # the container's root is our mount
    assert r.stdout.endswith("hello\nmore\n")
    diff = p("diff", "c1")
    assert diff.returncode == 0 and {"A /tmp/new", "D /etc/gone", "C /etc/motd"} <= set(diff.stdout.splitlines())
    # what we wrote in the upper layer is what podman's overlay driver reads: commit, run the new image
    assert p("commit", "-q", "c1", "localhost/next:1").returncode == 0
    r = p(*run, "--rm", "localhost/next:1", "sh", "-c", "cat /tmp/new /etc/motd; ls /etc")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["written", "hello", "more"] and "gone" not in r.stdout, r.stdout
