"""Images for tests, built by real tools (umoci, from host files), and the CLI as a subprocess."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .mounts import COMMAND, force_unmount, run


def sh(script: str, cwd: Path) -> None:
    subprocess.run(["bash", "-ec", script], cwd=cwd, check=True, capture_output=True, timeout=300)


def um(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run([*COMMAND, *map(str, args)], check=False)


def build_image(base: Path) -> Path:
    """A three-layer OCI image at ``base/img:t`` and ``umoci unpack`` of it at ``base/ref``.

    It holds what real layers hold: hard links (within a layer and to a lower
    one), symlinks, a fifo, a device, a sparse file, xattrs, a file capability,
    POSIX ACLs, a 200-byte name, setuid, whiteouts, a directory replaced by a
    file and a deleted directory re-created without an opaque marker.
    """
    sh(
        """
        umoci init --layout img
        umoci new --image img:t
        umoci unpack --image img:t b
        r=b/rootfs
        mkdir -p $r/etc $r/usr/share $r/d/sub $r/gone/inner $r/r
        cp -a /usr/share/doc/bash /etc/apt $r/usr/share/ 2>/dev/null || true
        echo hello > $r/etc/motd; ln $r/etc/motd $r/etc/motd.hard
        ln -s ../etc/motd $r/d/rel-link; ln -s /etc/motd $r/d/abs-link
        mkfifo $r/d/fifo; mknod $r/d/null c 1 3
        truncate -s 5M $r/d/sparse; echo tail >> $r/d/sparse
        setfattr -n user.color -v blue $r/d/sub
        cp /bin/true $r/d/ping; setcap cap_net_raw+ep $r/d/ping
        setfacl -m u:1000:rwx $r/d/sub; setfacl -d -m g:100:rx $r/d/sub
        echo x > $r/d/sub/$(printf 'n%.0s' $(seq 200))
        echo 1 > $r/gone/inner/f; echo keep > $r/d/keep; echo drop > $r/d/drop; echo dir > $r/r/file
        chown 1000:1000 $r/d/keep; chmod 4755 $r/d/keep
        umoci repack --image img:t b
        rm -rf b
        umoci unpack --image img:t b
        rm -rf $r/gone $r/d/drop $r/r; echo now-a-file > $r/r
        echo more >> $r/etc/motd; ln $r/d/keep $r/d/keep.hard
        umoci repack --image img:t b
        rm -rf b
        umoci unpack --image img:t b
        mkdir -p $r/gone; echo back > $r/gone/new; chmod 700 $r/d/sub; chown 5:6 $r/etc/motd
        umoci repack --image img:t b
        umoci config --image img:t --config.volume /data --config.cmd sh --config.env A=1
        rm -rf b
        umoci unpack --image img:t ref
        """,
        base,
    )
    return base


@contextmanager
def image_mount(
    store: Path, image: str, name: str, mnt: Path, log: Path | None = None, volumes: str = "ignore"
) -> Iterator[Path]:
    """``unionmount mount --image`` (the image's VOLUMEs ignored unless asked); always unmounted on exit."""
    args = ["mount", "--root", store, "--image", image, "--name", name, "--image-volumes", volumes]
    with mounted(*args, *(["--log", log] if log else []), mnt=mnt):
        yield mnt


@contextmanager
def mounted(*args: str | Path, mnt: Path) -> Iterator[Path]:
    """``unionmount ARGS MNT``, which must succeed; always unmounted on exit."""
    r = um(*args, mnt)
    assert r.returncode == 0, r.stderr
    try:
        yield mnt
    finally:
        if um("umount", mnt).returncode != 0:
            force_unmount(mnt)
