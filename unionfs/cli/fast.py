"""The ``unionmount`` entry point: hand the command to a running server, or run it here.

Where ``unionmount server`` runs for this user (:mod:`unionfs.cli.server`), the command
is sent to it with this process's stdin, stdout and stderr, and this process only waits
for the exit status: it imports nothing beyond the standard library's socket and json.
Otherwise (no server, ``UNIONMOUNT_NO_SERVER=1``, or the server and this process are
different installations) the command runs here, as :func:`unionfs.cli.main.main`.
"""

from __future__ import annotations

import os
import sys

OTHER_INSTALLATION = -1  # the server's answer when it runs another copy of unionmount than the caller


def _forward(args: list[str]) -> int | None:
    """The command's exit status from the server, or None if no server takes it."""
    import socket

    from unionfs.cli.server import socket_path

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(socket_path())
    except OSError:
        s.close()
        return None
    import array
    import json
    import struct

    with s:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        req = json.dumps({"args": args, "cwd": os.getcwd(), "env": dict(os.environ), "package": here}).encode()
        fds = array.array("i", [0, 1, 2])
        s.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        got = b""
        try:
            while len(got) < 4:
                chunk = s.recv(4 - len(got))
                if not chunk:
                    break
                got += chunk
        except KeyboardInterrupt:
            return 130
    if len(got) < 4:
        print("unionmount: the command server ended the command without an answer", file=sys.stderr)
        return 1
    code = int(struct.unpack("i", got)[0])
    return None if code == OTHER_INSTALLATION else code


def main() -> int:
    args = sys.argv[1:]
    if os.environ.get("UNIONMOUNT_NO_SERVER") != "1" and args[:1] != ["server"]:
        code = _forward(args)
        if code is not None:
            return code
    from unionfs.cli.main import main as run

    return run(args)
