"""A flat root filesystem tarball as a one-layer image: ``docker import``.

The tarball (a file, or ``-`` for standard input) may be plain, gzip, zstd, xz or
bzip2. It is inflated once into the store's ``tmp/`` (named by the importing
process, so that a later import sweeps it after a kill) while its sha256, the
layer's ``diff_id``, is taken; the config is then written around it. ``--change``
takes Dockerfile instructions as ``docker import --change`` does: ``CMD``,
``ENTRYPOINT``, ``ENV``, ``EXPOSE``, ``LABEL``, ``STOPSIGNAL``, ``USER``,
``VOLUME`` and ``WORKDIR``.

Guarantees: nothing but the temporary is written before the store's own import
starts (which checks every member as for any layer); every malformed change or
unreadable tarball is a :class:`~layerstore.oci.SourceError` with one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any, BinaryIO

from .layerstream import DECODE_ERRORS, decompressed
from .oci import ImageSource, LayerRef, SourceError, host_platform

_CHUNK = 1 << 20


def open_rootfs(
    path: str,
    tmpdir: str,  # an existing directory (the store's tmp/)
    changes: Sequence[str] = (),
    message: str | None = None,
    platform: str | None = None,
) -> ImageSource:
    """The image made of the tarball at ``path`` (``-``: standard input)."""
    config: dict[str, Any] = {}
    for change in changes:
        apply_change(config, change)
    tmp = os.path.join(tmpdir, f"{os.getpid()}.rootfs-{time.monotonic_ns()}")
    try:
        diff_id = _spool(path, tmp)
        doc = _image_config(config, diff_id, message, platform)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    layer = LayerRef(diff_id, None, lambda: open(tmp, "rb"), os.path.getsize(tmp))
    return ImageSource(
        raw, "sha256:" + hashlib.sha256(raw).hexdigest(), "", [layer], [], close=lambda: _unlink_quiet(tmp)
    )


def _spool(path: str, tmp: str) -> str:
    """Inflate ``path`` into ``tmp``; returns the sha256 of what was written."""
    try:
        src: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise SourceError(f"cannot read '{path}': {e.strerror}") from None
    h = hashlib.sha256()
    try:
        with open(tmp, "xb") as out:
            plain = decompressed(io.BufferedReader(src, _CHUNK))  # type: ignore[arg-type]
            while chunk := plain.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
    except DECODE_ERRORS as e:
        raise SourceError(f"cannot read '{path}': {getattr(e, 'strerror', None) or e}") from None
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    if os.path.getsize(tmp) == 0:
        raise SourceError(f"'{path}' is empty")
    return "sha256:" + h.hexdigest()


def _image_config(config: dict[str, Any], diff_id: str, message: str | None, platform: str | None) -> dict[str, Any]:
    os_, _, rest = (platform or host_platform()).partition("/")
    arch, _, variant = rest.partition("/")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    history: dict[str, str] = {"created": now, "created_by": "unionmount image import"}
    if message:
        history["comment"] = message
    doc: dict[str, Any] = {
        "architecture": arch,
        "os": os_,
        "created": now,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [history],
    }
    if variant:
        doc["variant"] = variant
    return doc


def apply_change(config: dict[str, Any], change: str) -> None:
    """Apply one Dockerfile instruction (``docker import --change``) to an image's ``config``."""
    verb, _, arg = change.strip().partition(" ")
    verb, arg = verb.upper(), arg.strip()
    if not arg:
        raise SourceError(f"--change '{change}': {verb or 'the instruction'} needs an argument")
    if verb in ("CMD", "ENTRYPOINT"):
        config["Cmd" if verb == "CMD" else "Entrypoint"] = _json_or(arg, lambda a: ["/bin/sh", "-c", a], change)
    elif verb == "VOLUME":
        for v in _json_or(arg, str.split, change):
            config.setdefault("Volumes", {})[v] = {}
    elif verb == "EXPOSE":
        for port in arg.split():
            config.setdefault("ExposedPorts", {})[port if "/" in port else port + "/tcp"] = {}
    elif verb in ("ENV", "LABEL"):
        pairs = _pairs(arg, change)
        if verb == "ENV":
            env = [e for e in config.get("Env", []) if e.split("=", 1)[0] not in pairs]
            config["Env"] = env + [f"{k}={v}" for k, v in pairs.items()]
        else:
            config.setdefault("Labels", {}).update(pairs)
    elif verb in ("USER", "WORKDIR", "STOPSIGNAL"):
        config[{"USER": "User", "WORKDIR": "WorkingDir", "STOPSIGNAL": "StopSignal"}[verb]] = arg
    else:
        raise SourceError(
            f"--change '{change}': {verb} is not one of CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, STOPSIGNAL, USER, "
            "VOLUME, WORKDIR"
        )


def _json_or(arg: str, shell_form: Any, change: str) -> list[str]:
    """A JSON array of strings (exec form), else ``shell_form(arg)``."""
    if not arg.startswith("["):
        return list(shell_form(arg))
    try:
        value = json.loads(arg)
    except ValueError:
        raise SourceError(f"--change '{change}': not a JSON array of strings") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SourceError(f"--change '{change}': not a JSON array of strings")
    return value


def _pairs(arg: str, change: str) -> dict[str, str]:
    """``K=V K2="V 2"``, or the old one-pair form ``K V...``."""
    try:
        words = shlex.split(arg)
    except ValueError as e:
        raise SourceError(f"--change '{change}': {e}") from None
    if "=" not in words[0]:
        key, _, value = arg.partition(" ")
        return {key: value.strip()}
    out = {}
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or not key:
            raise SourceError(f"--change '{change}': '{w}' is not KEY=VALUE")
        out[key] = value
    return out


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
