"""The ``unionmount`` entry point: hand the command to a running server, or run it here.

Where ``unionmount server`` runs for this user (:mod:`unionfs.cli.server`), the command
is sent to it with this process's stdin, stdout and stderr, and this process only waits
for the exit status: it imports nothing beyond the standard library's socket.
Otherwise (no server, ``UNIONMOUNT_NO_SERVER=1``, or the server and this process are
different installations) the command runs here, as :func:`unionfs.cli.main.main`.
"""

from __future__ import annotations

import os
import socket
import sys

OTHER_INSTALLATION = -1  # the server's answer when it runs another copy of unionmount than the caller


def _receive(s: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``s``, or fewer if it ends first."""
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _forward(args: list[str]) -> int | None:
    """The command's exit status from the server, or None if no server takes it."""
    from unionfs.cli.server import encode_request, socket_path

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(socket_path())
    except OSError:
        s.close()
        return None
    import array

    with s:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        req = encode_request(here, os.getcwd(), args, dict(os.environb))
        fds = array.array("i", [0, 1, 2])
        try:
            sent = s.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
            s.sendall(req[sent:])
            s.shutdown(socket.SHUT_WR)  # the end of the request
        except OSError:
            pass  # the server gave up on the request: its answer says so
        got = _receive(s, 4)
        if len(got) == 4:
            import signal

            child = int.from_bytes(got, sys.byteorder, signed=True)

            def forward(signum: int, frame: object) -> None:
                try:
                    os.kill(child, signum)
                except OSError:
                    pass  # it has ended already

            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, forward)
            got = _receive(s, 4)
    if len(got) < 4:
        print("unionmount: the command server ended the command without an answer", file=sys.stderr)
        return 1
    code = int.from_bytes(got, sys.byteorder, signed=True)
    return None if code == OTHER_INSTALLATION else code


def main() -> int:
    args = sys.argv[1:]
    if os.environ.get("UNIONMOUNT_NO_SERVER") != "1" and args[:1] != ["server"]:
        code = _forward(args)
        if code is not None:
            return code
    from unionfs.cli.main import main as run

    return run(args)
