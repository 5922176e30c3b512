"""Docker volume plugins, against a real one: `rclone serve docker`, with `rclone serve webdav` as the remote.

Two stores stand for two hosts: each records the plugin's volume and mounts it, and what
one writes the other reads. The plugin is found as Docker finds it (a socket, a .spec file
with a tcp address); `$UNIONMOUNT_PLUGIN_PATH` points the tests at their own directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .images import um
from .mounts import force_unmount, is_mounted

WEBDAV = ["-o", "type=webdav", "-o", "webdav-vendor=other"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check, what: str, seconds: float = 20) -> None:  # type: ignore[no-untyped-def]  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.1)


class Rclone:
    """A webdav remote and a docker volume plugin in front of it, stopped (and unmounted) at the end."""

    def __init__(self, base: Path, tcp: bool = False) -> None:
        self.base = base
        base.mkdir()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.plugins = base / "plugins"
        self.plugins.mkdir()
        (base / "remote").mkdir()
        self.procs = [
            subprocess.Popen(
                ["rclone", "serve", "webdav", str(base / "remote"), "--addr", f"127.0.0.1:{self.port}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        ]
        self.addr = f"127.0.0.1:{_free_port()}" if tcp else str(self.plugins / "rclone.sock")
        self.procs.append(
            subprocess.Popen(
                [
                    "rclone",
                    "serve",
                    "docker",
                    "--base-dir",
                    str(base / "mounts"),
                    "--socket-addr",
                    self.addr,
                    "--cache-dir",
                    str(base / "cache"),
                    "--config",
                    str(base / "rclone.conf"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        )
        if tcp:
            (self.plugins / "rclone.spec").write_text(f"tcp://{self.addr}\n")
            host, port = self.addr.split(":")
            _wait(lambda: _connects(host, int(port)), "the plugin")
        else:
            _wait(lambda: Path(self.addr).exists(), "the plugin")
        _wait(lambda: _connects("127.0.0.1", self.port), "the webdav remote")

    def opts(self) -> list[str]:
        return [*WEBDAV, "-o", f"webdav-url={self.url}"]

    def _ask(self, what: str, body: dict) -> dict:  # type: ignore[type-arg]
        import httpx

        transport = httpx.HTTPTransport(uds=self.addr) if not self.addr[0].isdigit() else None
        base = "http://plugin" if transport else f"http://{self.addr}"
        with httpx.Client(transport=transport) as c:
            return c.post(base + "/VolumeDriver." + what, content=json.dumps(body)).json()  # type: ignore[no-any-return]

    def mounts_of(self, name: str) -> list[str]:
        """The IDs the plugin has the volume mounted for."""
        return list(self._ask("Get", {"Name": name})["Volume"]["Status"].get("Mounts") or [])

    def names(self) -> list[str]:
        return [v["Name"] for v in self._ask("List", {}).get("Volumes") or []]

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        mounts = self.base / "mounts"
        if mounts.exists():
            for d in mounts.iterdir():
                force_unmount(d)


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def rclone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rclone]:
    assert shutil.which("rclone"), "scripts/setup installs rclone"
    r = Rclone(tmp_path / "rclone")
    monkeypatch.setenv("UNIONMOUNT_PLUGIN_PATH", str(r.plugins))
    try:
        yield r
    finally:
        r.stop()


def _mount(*args: str | Path) -> None:
    r = um("mount", *args)
    assert r.returncode == 0, r.stderr


def _umount(mnt: Path) -> None:
    if is_mounted(mnt) and um("umount", mnt).returncode != 0:
        force_unmount(mnt)


def test_two_hosts_share_a_plugin_volume(rclone: Rclone, tmp_path: Path) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    lower, ua, wa, ma, ub, wb, mb = (tmp_path / n for n in ("l", "ua", "wa", "ma", "ub", "wb", "mb"))
    for d in (lower, ua, wa, ma, ub, wb, mb):
        d.mkdir()
    r = um("volume", "--root", a, "create", "-d", "rclone", *rclone.opts(), "shared")
    assert r.returncode == 0, r.stderr
    assert um("volume", "--root", b, "create", "-d", "rclone", *rclone.opts(), "shared").returncode == 0
    rows = json.loads(um("volume", "--root", a, "ls", "--format", "json").stdout)
    assert [(v["Name"], v["Driver"]) for v in rows] == [("shared", "rclone")]
    try:
        _mount("--root", a, "--lower", lower, "--upper", ua, "--work", wa, "-v", "shared:/data", ma)
        _mount("--root", b, "--lower", lower, "--upper", ub, "--work", wb,
               "--mount", "type=volume,source=shared,target=/data,volume-driver=rclone", mb)  # fmt: skip
        (ma / "data" / "hello").write_text("from host A\n")
        _wait(lambda: (mb / "data" / "hello").exists(), "the file through host B", 30)
        assert (mb / "data" / "hello").read_text() == "from host A\n"
        assert (rclone.base / "remote" / "hello").read_text() == "from host A\n"  # it is on the remote
        assert len(rclone.mounts_of("shared")) == 2  # one Mount ID per mount
        (info,) = json.loads(um("volume", "--root", a, "inspect", "shared").stdout)
        assert info["Driver"] == "rclone" and info["Scope"] == "local" and len(info["Status"]["Mounts"]) == 2
        assert info["UsedBy"] == [str(ma)]
        r = um("volume", "--root", a, "rm", "-f", "shared")
        assert r.returncode != 0 and "in use" in r.stderr
    finally:
        _umount(ma)
        _umount(mb)
    assert rclone.mounts_of("shared") == []  # Unmount with the same IDs at the end
    assert um("volume", "--root", b, "rm", "shared").returncode == 0  # the plugin removes it
    assert "shared" not in rclone.names()
    (info,) = json.loads(um("volume", "--root", a, "inspect", "shared").stdout)  # A's record of a gone volume
    assert info["Mountpoint"] == "" and info["Status"] == {}


def test_a_killed_daemon_is_unmounted_from_the_plugin_by_the_next_command(rclone: Rclone, tmp_path: Path) -> None:
    store = tmp_path / "store"
    lower, up, work, mnt = (tmp_path / n for n in ("l", "u", "w", "m"))
    for d in (lower, up, work, mnt):
        d.mkdir()
    assert um("volume", "--root", store, "create", "-d", "rclone", *rclone.opts(), "v").returncode == 0
    _mount("--root", store, "--lower", lower, "--upper", up, "--work", work, "-v", "v:/data", mnt)
    pid = int(os.getxattr(mnt, "user.unionmount.pid"))
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not Path(f"/proc/{pid}").exists(), "the daemon's end")
    force_unmount(mnt)
    assert len(rclone.mounts_of("v")) == 1  # the plugin still thinks it is used
    assert um("volume", "--root", store, "ls").returncode == 0
    assert rclone.mounts_of("v") == []
    assert um("volume", "--root", store, "rm", "v").returncode == 0


def test_missing_dead_and_silent_plugins_fail_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    monkeypatch.setenv("UNIONMOUNT_PLUGIN_PATH", str(plugins))
    monkeypatch.setenv("UNIONMOUNT_PLUGIN_TIMEOUT", "2")
    store = tmp_path / "store"
    r = um("volume", "--root", store, "create", "-d", "nosuch", "v")
    assert r.returncode != 0 and "volume plugin 'nosuch' not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(plugins / "dead.sock"))
    dead.close()  # a socket file nobody listens on
    r = um("volume", "--root", store, "create", "-d", "dead", "v")
    assert r.returncode != 0 and "plugin 'dead'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(plugins / "silent.sock"))
    silent.listen(8)  # connects, never answers
    try:
        t0 = time.monotonic()
        r = um("volume", "--root", store, "create", "-d", "silent", "v")
        assert r.returncode != 0 and "plugin 'silent' did not answer" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 30
    finally:
        silent.close()
    assert um("volume", "--root", store, "ls", "--format", "json").stdout.strip() in ("[]", "")


def test_a_plugin_found_by_a_spec_file_with_a_tcp_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As Docker finds it: /etc/docker/plugins/NAME.spec holding tcp://HOST:PORT."""
    r = Rclone(tmp_path / "rclone", tcp=True)
    name = f"umtest{os.getpid()}"
    spec = Path("/etc/docker/plugins") / f"{name}.spec"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(f"tcp://{r.addr}\n")
    monkeypatch.delenv("UNIONMOUNT_PLUGIN_PATH", raising=False)
    store, lower, up, work, mnt = (tmp_path / n for n in ("store", "l", "u", "w", "m"))
    for d in (lower, up, work, mnt):
        d.mkdir()
    try:
        assert um("volume", "--root", store, "create", "-d", name, *r.opts(), "t").returncode == 0
        _mount("--root", store, "--lower", lower, "--upper", up, "--work", work, "-v", "t:/t", mnt)
        try:
            (mnt / "t" / "f").write_text("over tcp\n")
        finally:
            _umount(mnt)
        assert (r.base / "remote" / "f").read_text() == "over tcp\n"
    finally:
        spec.unlink()
        r.stop()


def test_a_plugin_error_or_a_plugin_gone_at_mount_time_is_one_line(rclone: Rclone, tmp_path: Path) -> None:
    store, lower, up, work, mnt = (tmp_path / n for n in ("store", "l", "u", "w", "m"))
    for d in (lower, up, work, mnt):
        d.mkdir()
    r = um("volume", "--root", store, "create", "-d", "rclone", "-o", "type=nosuchbackend", "bad")
    assert r.returncode != 0 and "plugin 'rclone'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert um("volume", "--root", store, "create", "-d", "rclone", *rclone.opts(), "v").returncode == 0
    rclone.stop()  # the plugin is gone when the mount needs it
    r = um("mount", "--root", store, "--lower", lower, "--upper", up, "--work", work, "-v", "v:/data", mnt)
    assert r.returncode != 0 and "plugin 'rclone'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not is_mounted(mnt)
    (info,) = json.loads(um("volume", "--root", store, "inspect", "v").stdout)
    assert info["UsedBy"] == [] and "Error" in info["Status"]  # no lease left; the plugin's absence is shown
