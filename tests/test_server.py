"""The resident command server (``unionmount server``, :mod:`unionfs.cli.server`) on real mounts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .mounts import BIN, COMMAND, daemon_pid, force_unmount, fresh_dirs, is_mounted
from .test_rootless import PY, home, user_run  # noqa: F401 - the fixture

#: the C launcher scripts/setup builds and links into /usr/local/bin (unionfs/cli/launch.c)
LAUNCHER = BIN.parent / "unionmount-launch"


@pytest.fixture(params=["python", "launcher"])
def client(request: pytest.FixtureRequest) -> list[str]:
    """The command a caller runs: the Python entry point, or the C launcher in front of it."""
    if request.param == "python":
        return COMMAND
    assert LAUNCHER.exists(), "scripts/setup builds the launcher"
    return [str(LAUNCHER)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A server on a socket of the test's own; yields the environment that sends commands to it."""
    env = {**os.environ, "UNIONMOUNT_SERVER": str(tmp_path / "run" / "server.sock")}
    proc = subprocess.Popen([*COMMAND, "server"], env=env)
    try:
        for _ in range(200):
            if Path(env["UNIONMOUNT_SERVER"]).exists():
                break
            time.sleep(0.025)
        assert Path(env["UNIONMOUNT_SERVER"]).exists(), "the server did not listen"
        yield env
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        assert not Path(env["UNIONMOUNT_SERVER"]).exists()


def test_commands_run_in_the_server_with_the_callers_stdio(
    server: dict[str, str], client: list[str], tmp_path: Path
) -> None:
    def _um(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*client, *args], env=env, capture_output=True, text=True, timeout=60)

    lower, u, w, m = fresh_dirs(tmp_path, "l", "u", "w", "m")
    (lower / "f").write_text("hello\n")
    r = _um(server, "--version")
    assert r.returncode == 0 and r.stdout.startswith("unionmount ")
    big = {**server, **{f"BIG{i}": "x" * 100_000 for i in range(8)}}  # more than a socket buffer holds
    r = subprocess.run([*client, "mount", "--lower", "missing", "m"], env=big, capture_output=True, text=True)
    assert r.returncode == 2 and "missing" in r.stderr
    r = _um(server, "mount", "--lower", "missing", "--upper", "u", "--work", "w", "m")  # relative: the caller's cwd
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing" in r.stderr
    try:
        r = subprocess.run(
            [*client, "mount", "--lower", "l", "--upper", "u", "--work", "w", "m"],
            env=server, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (m / "f").read_text() == "hello\n"
        # the daemon is a fork of the server (its command line is the server's)
        assert Path(f"/proc/{daemon_pid(m)}/cmdline").read_bytes().split(b"\0")[-2:] == [b"server", b""]
        assert _um(server, "umount", str(m)).returncode == 0
        assert not is_mounted(m)
    finally:
        force_unmount(m)


def test_another_user_is_not_served(server: dict[str, str], home: Path) -> None:  # noqa: F811 - the fixture
    """A plain user's command cannot reach root's server; it runs itself (and fails as that user would)."""
    os.chmod(Path(server["UNIONMOUNT_SERVER"]).parent, 0o755)
    r = user_run(home, "env", f"UNIONMOUNT_SERVER={server['UNIONMOUNT_SERVER']}", PY, "-m", "unionfs", "--version")
    assert r.returncode == 0 and r.stdout.startswith("unionmount ")  # run by itself: the socket is root's alone


def test_signals_reach_the_command(server: dict[str, str], client: list[str], tmp_path: Path) -> None:
    """Ctrl-C on a foreground mount run by the server ends it as it would end one run here: unmounted, status 0."""
    lower, m = fresh_dirs(tmp_path, "l", "m")
    (lower / "f").write_text("hello\n")
    cmd = [*client, "mount", "-f", "--lower", str(lower), str(m)]
    proc = subprocess.Popen(cmd, env=server, stderr=subprocess.PIPE)
    try:
        for _ in range(400):
            if is_mounted(m) or proc.poll() is not None:
                break
            time.sleep(0.025)
        assert (m / "f").read_text() == "hello\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not is_mounted(m)
    finally:
        if proc.poll() is None:
            proc.kill()
        force_unmount(m)


def test_the_launcher_runs_commands_itself_without_a_server(tmp_path: Path) -> None:
    """No server (or ``UNIONMOUNT_NO_SERVER=1``): the launcher runs the Python entry point, same output and status."""
    assert LAUNCHER.exists(), "scripts/setup builds the launcher"
    for extra in ({"UNIONMOUNT_SERVER": str(tmp_path / "none.sock")}, {"UNIONMOUNT_NO_SERVER": "1"}):
        env = {**os.environ, **extra}
        r = subprocess.run([str(LAUNCHER), "--version"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("unionmount "), r.stderr
        r = subprocess.run([str(LAUNCHER), "umount", str(tmp_path / "nothing")], env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert r.returncode == 2 and r.stderr.startswith("unionmount: cannot unmount"), r.stderr


def test_a_socket_activated_server_starts_with_the_first_command(client: list[str], tmp_path: Path) -> None:
    """Started for its socket by a service manager (``contrib/systemd``; here ``systemd-socket-activate``,
    which starts the server at the first connection), the server runs that command and the next ones, and
    leaves the socket to the manager at its end; a bad hand-over is one line."""
    sock = tmp_path / "run" / "server.sock"
    sock.parent.mkdir(mode=0o700)
    env = {**os.environ, "UNIONMOUNT_SERVER": str(sock)}
    activator = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), *COMMAND, "server"], env=env,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
    lower, u, w, m = fresh_dirs(tmp_path, "l", "u", "w", "m")
    (lower / "f").write_text("hello\n")
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.025)
        assert Path(f"/proc/{activator.pid}/comm").read_text().startswith("systemd-socket")  # nothing started yet
        r = subprocess.run([*client, "mount", "--lower", lower, "--upper", u, "--work", w, m], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (m / "f").read_text() == "hello\n"
        assert Path(f"/proc/{daemon_pid(m)}/cmdline").read_bytes().split(b"\0")[-2:] == [b"server", b""]
        assert Path(f"/proc/{activator.pid}/cmdline").read_bytes().split(b"\0")[-2:] == [b"server", b""]
        assert subprocess.run([*client, "umount", m], env=env, timeout=60).returncode == 0
        activator.terminate()
        assert activator.wait(timeout=20) == 0
        assert sock.exists()  # the manager's: it starts the server again for the next command
    finally:
        if activator.poll() is None:
            activator.kill()
        force_unmount(m)
    with socket.socket() as probe:  # a free TCP port: a stream socket, but not a Unix one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tcp = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", *COMMAND, "server"], env=env,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except ConnectionRefusedError:
                time.sleep(0.025)
        _, err = tcp.communicate(timeout=60)
        assert tcp.returncode == 2
        assert err.splitlines()[-1] == (
            "unionmount: the socket passed is not a Unix stream socket (ListenStream= a path)"
        )
    finally:
        if tcp.poll() is None:
            tcp.kill()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry))
    return out


def test_a_killed_server_leaves_no_spare_behind(tmp_path: Path) -> None:
    """The child a server forks ahead for the next command ends with the server, even when the server is
    killed (SIGKILL, the OOM killer, a service manager's last word); a command's process does not."""
    sock = tmp_path / "run" / "server.sock"
    env = {**os.environ, "UNIONMOUNT_SERVER": str(sock)}
    proc = subprocess.Popen([*COMMAND, "server"], env=env)
    lower, u, w, m = fresh_dirs(tmp_path, "l", "u", "w", "m")
    try:
        for _ in range(400):
            if sock.exists() and _children(proc.pid):
                break
            time.sleep(0.025)
        r = subprocess.run([*COMMAND, "mount", "--lower", lower, "--upper", u, "--work", w, m], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        daemon = daemon_pid(m)
        for _ in range(400):
            spares = [c for c in _children(proc.pid) if c != daemon]
            if spares:
                break
            time.sleep(0.025)
        assert spares, "the server forked no spare"
        proc.kill()
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{s}").exists() for s in spares) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [s for s in spares if Path(f"/proc/{s}").exists()]
        assert not left, f"spares outlived the server: {left}"
        assert is_mounted(m) and Path(f"/proc/{daemon}").exists()  # the mount's daemon lives on
        assert subprocess.run([*COMMAND, "umount", m], env={**env, "UNIONMOUNT_NO_SERVER": "1"}).returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        force_unmount(m)
