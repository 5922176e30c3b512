"""A resident command server: commands start from a process that has already imported everything.

``unionmount server`` imports the command line, the daemon, the FUSE layer and the store
once, then listens on a Unix socket (:func:`socket_path`). A command started while it
runs (:mod:`unionfs.cli.fast`, the ``unionmount`` entry point) sends its arguments, working
directory, environment and its stdin, stdout and stderr over the socket; the server
has a child forked ahead waiting for it (so the fork is not on the command's path), and that child
runs the command exactly as ``unionmount ARGS`` would, writing
straight to the caller's terminal or pipes, then sends back the exit status. The child
first sends its pid: SIGINT, SIGTERM and SIGHUP sent to the caller are passed on to it
(so ``mount -f`` ends on Ctrl-C as it would without the server). So a mount
costs a fork instead of a Python start and a third of a second of imports.

Guarantees: the server serves only callers with its own user id (``SO_PEERCRED``), on a
socket only that user can reach. Nothing is opened before the fork that a command
could share with another (no store, no trio run): each command's child is what a fresh
process would be, bar the imported modules. A child that dies without an answer makes
the caller exit 1 with one line. The server ends on SIGTERM or SIGINT, removing its socket.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import sys
import time

OTHER_INSTALLATION = -1  # (as unionfs.cli.fast)
_MAX = 1 << 20  # the largest request (arguments and environment) taken


def socket_path() -> str:
    """Where the server of this user listens: ``/run/unionmount/server.sock`` for root,
    ``$XDG_RUNTIME_DIR/unionmount/server.sock`` otherwise (``UNIONMOUNT_SERVER`` overrides both)."""
    explicit = os.environ.get("UNIONMOUNT_SERVER")
    if explicit:
        return explicit
    base = "/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", f"/tmp/unionmount-{os.geteuid()}")
    return os.path.join(base, "unionmount", "server.sock")


_MAGIC = b"unionmount-command/1"


def encode_request(package: str, cwd: str, args: list[str], env: dict[bytes, bytes]) -> bytes:
    """A command for the server: the caller's package directory, working directory,
    arguments and environment, NUL-separated (none of them can hold a NUL)."""
    fields = [_MAGIC, os.fsencode(package), os.fsencode(cwd), str(len(args)).encode()]
    fields += [os.fsencode(a) for a in args]
    fields += [k + b"=" + v for k, v in env.items()]
    return b"\0".join(fields)


def decode_request(msg: bytes) -> tuple[str, str, list[str], dict[bytes, bytes]]:
    """The inverse of :func:`encode_request`; ValueError if ``msg`` is not one."""
    fields = msg.split(b"\0")
    if len(fields) < 4 or fields[0] != _MAGIC:
        raise ValueError("not a unionmount command")
    n = int(fields[3])
    if not 0 <= n <= len(fields) - 4:
        raise ValueError("not a unionmount command")
    args = [os.fsdecode(a) for a in fields[4 : 4 + n]]
    env = dict(f.split(b"=", 1) for f in fields[4 + n :] if b"=" in f)
    return os.fsdecode(fields[1]), os.fsdecode(fields[2]), args, env


def _preload() -> None:
    """Import what the commands import, so that no child pays for it."""
    import httpcore  # noqa: F401  (httpx imports it at its first client: 60 ms of a lazy mount's)
    import trio  # noqa: F401

    import layerstore.store  # noqa: F401
    import layerstore.volumes  # noqa: F401
    import unionfs.cli.containers  # noqa: F401
    import unionfs.cli.images  # noqa: F401
    import unionfs.cli.main  # noqa: F401
    import unionfs.cli.mounts  # noqa: F401
    import unionfs.cli.volumes  # noqa: F401
    import unionfs.daemon.mount  # noqa: F401
    import unionfs.fuse.handlers  # noqa: F401

    unionfs.cli.main._parser()  # argparse's construction is a fifth of a mount's time
    _libc()  # (each spare's _die_with_parent)


LISTEN_FDS_START = 3  # sd_listen_fds(3): the first socket a service manager passes


def activated() -> socket.socket | None:
    """The listening socket a service manager started this process for (systemd's socket activation:
    ``LISTEN_PID`` is this process and ``LISTEN_FDS`` 1, the socket at fd 3), else None.

    The variables are removed, so that no command's child takes them for its own; ValueError if
    what was passed is not one listening Unix stream socket."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count != "1":
        raise ValueError(f"expected one socket from the service manager, got LISTEN_FDS={count[:10]!r}")
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
    except OSError as e:
        raise ValueError(f"the socket passed at fd {LISTEN_FDS_START} is not usable: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError("the socket passed is not a Unix stream socket (ListenStream= a path)")
    sock.set_inheritable(False)
    return sock


def serve(path: str | None = None) -> int:
    """Run the server in the foreground until SIGTERM or SIGINT.

    Started by a service manager for its socket (:func:`activated`; ``contrib/systemd``), it
    serves that socket from the first command on, and leaves it in place at its end: the
    manager starts it again for the next command. Otherwise it listens on ``path``
    (default :func:`socket_path`), made afresh and removed at its end."""
    try:
        passed = activated()
    except ValueError as e:
        print(f"unionmount: {e}", file=sys.stderr)
        return 2
    path = path or socket_path()
    _preload()
    if passed is not None:
        listener = passed
    else:
        listener = _listen(path)
    stop = False
    spare = 0  # the child waiting in accept() for the next command

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True
        if spare:
            os.kill(spare, signal.SIGTERM)  # its end closes the pipe the loop waits on

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = os.getpid()
    try:
        while not stop:
            taken, told = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(taken)
                _spare(listener, told, server)  # never returns
            spare = pid
            os.close(told)
            if stop:  # (a signal while it was forked)
                os.kill(pid, signal.SIGTERM)
            try:
                started = time.monotonic()
                got = os.read(taken, 1)  # a byte once the spare has a command; nothing if it died first
            finally:
                spare = 0  # (it runs a command now: a signal to the server is not for it)
                os.close(taken)
            _reap()
            if not got and not stop and time.monotonic() - started < 0.1:
                time.sleep(0.1)  # a spare that dies at once: not a fork loop
    finally:
        listener.close()
        if passed is None:
            try:
                os.unlink(path)
            except OSError:
                pass
    return 0


def _listen(path: str) -> socket.socket:
    """A socket listening on ``path`` that only this user can reach."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)
    return listener


def _spare(listener: socket.socket, told: int, server: int) -> None:
    """A child forked ahead of the next command (the fork is not on the command's path): takes the next
    connection of this user, tells the server (which forks the next spare), runs it; never returns.

    Until it has a command it ends with the server, however the server ends (``PR_SET_PDEATHSIG``; even
    SIGKILL): no spare outlives it to take commands on a socket it no longer serves. Once it has
    one, it lives on as that command's process (a mount's daemon outlives the server)."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _die_with_parent(signal.SIGTERM)
        if os.getppid() != server:  # it ended before that took hold
            os._exit(0)
        while True:
            conn, _ = listener.accept()
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid == os.geteuid():
                break
            conn.close()
        _die_with_parent(0)
        os.write(told, b"!")
        os.close(told)
        listener.close()
    except BaseException:  # noqa: BLE001 - a spare that cannot serve ends; the server forks another
        os._exit(1)
    _child(conn)


_PR_SET_PDEATHSIG = 1


_LIBC: list[object] = []  # (no functools, no typing: fast.py imports this module, each import costs a command)


def _libc() -> object:
    """The C library, through ctypes (loaded by the server once, before its forks)."""
    if not _LIBC:
        import ctypes

        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def _die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent ends (0: no longer)."""
    if _libc().prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:  # type: ignore[attr-defined]  # (ctypes.CDLL)
        import ctypes

        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(conn: socket.socket) -> None:
    """Run one command for the caller on ``conn``; exits with its status."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        conn.sendall(struct.pack("=i", os.getpid()))  # the caller forwards its signals here
        fds = array.array("i")
        msg, ancdata, _, _ = conn.recvmsg(_MAX, socket.CMSG_LEN(3 * fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if len(fds) != 3:
            os._exit(1)
        while msg and len(msg) <= _MAX:  # the caller shuts its side down once all is sent
            more = conn.recv(_MAX)
            if not more:
                break
            msg += more
        package, cwd, args, env = decode_request(msg)
        if package != os.path.dirname(os.path.dirname(os.path.abspath(__file__))):
            code = OTHER_INSTALLATION  # the caller runs the command itself
            for fd in fds:
                os.close(fd)
            return
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        os.setsid()
        os.chdir(cwd)
        os.environb.clear()
        os.environb.update(env)
        sys.argv = ["unionmount", *args]
        from unionfs.cli.main import main

        code = main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the caller gets a status whatever happens
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        try:
            conn.sendall(struct.pack("=i", code))
        except OSError:
            pass
        os._exit(code & 0xFF)
