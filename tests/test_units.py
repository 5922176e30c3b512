"""The fast tier: parsers, codecs and rules checked in-process, without root, a mount or a server.

Run alone with ``pytest -m "not mount"`` (seconds). Each test here guards a rule that a
real-mount test also exercises end to end; these say which piece broke.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
from pathlib import Path

import msgpack
import pytest

from layerstore import names, plugins, tarwrite
from layerstore.entry import Entry, dir_size
from layerstore.oci import META_MAX, SourceError, open_regular, read_meta
from layerstore.tarlayer import MAX_PATH, LayerError, mtime_ns, read_layer
from unionfs.cli.server import decode_request, encode_request
from unionfs.daemon.config import MountConfig, UsageError, parse_o
from unionfs.daemon.grafts import parse_mount, parse_volume
from unionfs.union.idmap import IdMap, IdMapError

# -- command-line specs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "source", "target", "ro"),
    [
        ("/data", "volume", None, b"data", False),
        ("pg:/var/lib/pg", "volume", "pg", b"var/lib/pg", False),
        ("/srv/conf:/etc/app:ro", "bind", "/srv/conf", b"etc/app", True),
        ("/data:ro", "volume", None, b"data", True),
        ("v:/x:ro,nocopy,z", "volume", "v", b"x", True),
    ],
)
def test_volume_specs(spec: str, kind: str, source: str | None, target: bytes, ro: bool) -> None:
    s = parse_volume(spec)
    assert (s.kind, s.source, s.target, s.read_only) == (kind, source, target, ro)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("rel/dir:/x", "relative"),
        ("v:x", "not an absolute path"),
        ("v:/", "cannot graft on '/'"),
        ("v:/x:rw,bogus", "unknown volume option"),
        ("a" * 200 + ":/x", "characters long"),
        ("a:b:c:d", "SOURCE:TARGET"),
    ],
)
def test_bad_volume_specs(spec: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_volume(spec)


def test_mount_specs() -> None:
    s = parse_mount("type=tmpfs,target=/run,tmpfs-size=64m,tmpfs-mode=1770")
    assert (s.kind, s.target, s.tmpfs_size, s.tmpfs_mode) == ("tmpfs", b"run", 64 << 20, 0o1770)
    s = parse_mount("type=volume,src=v,dst=/d,volume-driver=rclone,volume-opt=type=webdav,volume-opt=a=b,readonly")
    assert (s.source, s.driver, s.driver_opts, s.read_only) == ("v", "rclone", {"type": "webdav", "a": "b"}, True)
    s = parse_mount("type=bind,source=/h,target=/h,z")
    assert (s.kind, s.relabel) == ("bind", "z")
    for bad, needle in (
        ("type=tmpfs,target=/t,tmpfs-size=abc", "not a size"),
        ("type=tmpfs,target=/t,tmpfs-mode=99999", "octal mode"),
        ("type=bind,source=/x,target=/t,volume-driver=d", "for type=volume"),
        ("type=volume,source=v,target=/t,volume-opt=novalue", "KEY=VALUE"),
        ("type=nfs,target=/t", "unknown mount type"),
        ("type=bind,target=/t", "needs source"),
        ("source=v", "no target"),
    ):
        with pytest.raises(UsageError, match=needle):
            parse_mount(bad)


def test_overlay_options() -> None:
    cfg = MountConfig(mountpoint="/m", lowers=[])
    parse_o(["lowerdir=/a:/b,upperdir=/u,workdir=/w,nosuid,writeback=0", "uidmapping=0:1000:1:1:100000:65536"], cfg)
    assert cfg.lowers == ["/a", "/b"] and (cfg.upper, cfg.work, cfg.writeback) == ("/u", "/w", False)
    assert "nosuid" in cfg.fuse_options and cfg.uidmap_specs == ["0:1000:1", "1:100000:65536"]
    for bad in ("writeback=2", "settle=-1", "timeout=x", "uidmapping=1:2"):
        with pytest.raises(UsageError):
            parse_o([bad], MountConfig(mountpoint="/m", lowers=[]))


def test_id_maps() -> None:
    m = IdMap.parse(["0:100000:65536", "65536:1000:1"])
    assert m.to_inside(100000) == 0 and m.to_inside(1000) == 65536 and m.to_inside(5) == 65534
    assert m.to_outside(1) == 100001
    with pytest.raises(OSError):
        m.to_outside(70000)
    for bad in (["4294967295:0:1"], ["0:4294967295:1"], ["0:1:0"], ["0:10:5", "2:100:1"], ["x:1:1"]):
        with pytest.raises(IdMapError):
            IdMap.parse(bad)


# -- names ---------------------------------------------------------------------------------


def test_names() -> None:
    assert names.container("web-1.a_b") == "web-1.a_b" and names.is_volume("a")
    for bad in ("", ".x", "-x", "a/b", "a b", "a" * 129):
        assert not names.is_container(bad)
        with pytest.raises(names.InvalidName):
            names.volume(bad)
    names.repository_length("reg.io:5000/" + "a" * 200 + ":" + "t" * 128)
    with pytest.raises(names.InvalidName):
        names.repository_length("a" * 256)
    with pytest.raises(names.InvalidName):
        names.tag("-x")


# -- layer tars, in memory ---------------------------------------------------------------


def _member(name: str, **kw: object) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def _roundtrip(info: tarfile.TarInfo) -> tarfile.TarInfo:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r") as t:
        return t.getmembers()[0]


@pytest.mark.parametrize("ns", [1796395976_421930827, 0, 1_000_000_000, -1_500_000_000, 5])
def test_mtimes_round_trip_to_the_nanosecond(ns: int) -> None:
    assert mtime_ns(_roundtrip(tarwrite.info(b"f", stat.S_IFREG | 0o644, 0, 0, ns))) == ns


def test_mtimes_out_of_range() -> None:
    for text in ("1e300", "9" * 22, "abc", "1.2.3"):
        with pytest.raises(LayerError, match="mtime out of range"):
            mtime_ns(_roundtrip(_member("f", pax_headers={"mtime": text})))


def _layer(root: Path, *members: tarfile.TarInfo) -> list[tuple[bytes, object]]:
    from layerstore.blobs import BlobStore

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for m in members:
            t.addfile(m, io.BytesIO(b"") if m.isreg() else None)
    buf.seek(0)
    blobs = BlobStore(str(root))
    try:
        return list(read_layer(buf, blobs, lambda p: False, lambda d: None))
    finally:
        blobs.close()


@pytest.mark.parametrize(
    ("member", "needle"),
    [
        (_member(".wh."), "whiteout of no name"),
        (_member("d/.wh.."), "whiteout of no name"),
        (_member("d/" + "n" * 256), "longer than 255 bytes"),
        (_member("/".join(["p" * 200] * 3)), f"the store takes {MAX_PATH}"),
        (_member("a", uid=2**32), "owner out of range"),
        (_member("../escape"), "climbs out"),
    ],
)
def test_hostile_members(member: tarfile.TarInfo, needle: str, tmp_path: Path) -> None:
    with pytest.raises(LayerError, match=needle):
        _layer(tmp_path, member)


def test_directory_sizes_as_ext4() -> None:
    assert dir_size([]) == 4096 and dir_size([b"f%06d.txt" % i for i in range(50)]) == 4096
    assert dir_size([b"file%06d.txt" % i for i in range(1000)]) == 36864  # ext4 here: 36864


# -- image metadata -------------------------------------------------------------------------


def test_metadata_reads_are_bounded(tmp_path: Path) -> None:
    assert read_meta(io.BytesIO(b"{}"), "x", 2) == b"{}"
    with pytest.raises(SourceError, match="larger than its descriptor"):
        read_meta(io.BytesIO(b"{}   "), "x", 2)
    with pytest.raises(SourceError, match="descriptor says 9"):
        read_meta(io.BytesIO(b"{}"), "x", 9)
    with pytest.raises(SourceError, match="larger than 4 MiB"):
        read_meta(io.BytesIO(b" " * (META_MAX + 1)), "x")
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "f").write_text("{}")
    (tmp_path / "blobs" / "link").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "blobs" / "fifo")
    assert open_regular(str(tmp_path), "blobs/f").read() == b"{}"
    for name in ("blobs/link", "blobs/fifo"):
        with pytest.raises(SourceError, match="not a regular file"):
            open_regular(str(tmp_path), name)


# -- plugin discovery ------------------------------------------------------------------------


def test_plugins_are_found_where_docker_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIONMOUNT_PLUGIN_PATH", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "sub" / "sub.sock").touch()
    (tmp_path / "b" / "t.spec").write_text("tcp://127.0.0.1:9\n")
    (tmp_path / "b" / "j.json").write_text('{"Name": "j", "Addr": "unix:///run/j.sock"}')
    assert plugins.find("sub") == f"unix://{tmp_path / 'a' / 'sub' / 'sub.sock'}"
    assert plugins.find("t") == "tcp://127.0.0.1:9"
    assert plugins.find("j") == "unix:///run/j.sock"
    for bad in ("nosuch", "../x", ""):
        with pytest.raises(plugins.PluginError):
            plugins.find(bad)


def test_command_server_requests_round_trip() -> None:
    """What the entry point sends ``unionmount server``: arguments (empty ones and undecodable bytes
    included) and the environment arrive as they were sent."""
    args = ["mount", "", "--lower", os.fsdecode(b"l\xff"), "a=b", "m"]
    env = {b"PATH": b"/bin", b"EMPTY": b"", b"X": b"a=b=c"}
    assert decode_request(encode_request("/pkg", "/cwd", args, env)) == ("/pkg", "/cwd", args, env)
    assert decode_request(encode_request("/pkg", "/", [], {})) == ("/pkg", "/", [], {})


@pytest.mark.parametrize("msg", [b"", b"{}", b"unionmount-command/1\0/p\0/c", b"unionmount-command/1\0/p\0/c\09\0a"])
def test_command_server_refuses_what_is_not_a_request(msg: bytes) -> None:
    with pytest.raises(ValueError):
        decode_request(msg)


def test_entry_records_keep_their_format() -> None:
    """A record is the msgpack array of the fields in order; one without a sha256 is the 13-field record
    older versions wrote and read, so stores made before stay readable and the same."""
    e = Entry(0o100644, 1, 2, 3, 4, 0, None, {b"user.a": b"b"}, b"xxh3:1", None, 0, 7, 2)
    assert msgpack.unpackb(e.pack(), raw=True, strict_map_key=False) == [
        0o100644, 1, 2, 3, 4, 0, None, {b"user.a": b"b"}, b"xxh3:1", None, 0, 7, 2
    ]  # fmt: skip
    assert Entry.unpack(e.pack()) == e
    lazy = e.with_(blob=None, sha256=b"s" * 32)
    assert (lazy.blob, lazy.sha256, lazy.ino, e.blob) == (None, b"s" * 32, 7, b"xxh3:1")
    assert Entry.unpack(lazy.pack()) == lazy


# -- the FUSE wire format ------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"a", b"ab", b"abcdefg", b"abcdefgh", b"pkg1234.list", b"x" * 255])
def test_a_listing_entry_is_an_entry_then_a_dirent(name: bytes) -> None:
    """``struct fuse_direntplus``, packed in one go, is ``fuse_entry_out`` then ``fuse_dirent`` and the name,
    padded to 8 bytes; times before 1970 and odd timeouts included."""
    from unionfs.fuse import wire
    from unionfs.union.records import Attrs

    a = Attrs()
    a.st_ino, a.st_size, a.st_blocks, a.st_nlink, a.st_uid, a.st_gid = 1 << 40 | 7, 5000, 16, 3, 1000, 100
    a.st_mode, a.st_rdev, a.generation = stat.S_IFLNK | 0o777, 0x1_0000_0203, 9
    a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = -1_500_000_001, 1_700_000_000_123_456_789, 0
    a.entry_timeout, a.attr_timeout = 1.25, -3.0
    got = wire.direntplus(name, a, 42)
    entry = wire.entry_out(a)
    assert got[: len(entry)] == entry and len(got) % 8 == 0
    ino, off, namelen, kind = wire.DIRENT.unpack_from(got, len(entry))
    assert (ino, off, namelen, kind) == (a.st_ino, 42, len(name), stat.S_IFLNK >> 12)
    rest = got[len(entry) + wire.DIRENT.size :]
    assert rest.rstrip(b"\0") == name.rstrip(b"\0") and len(rest) - len(name) < 8
    nodeid, gen, es, as_, ens, ans = struct.unpack_from("=QQQQII", entry)
    assert (nodeid, gen, es, ens, as_, ans) == (a.st_ino, 9, 1, 250_000_000, 0, 0)


def test_socket_activation_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service manager's variables are taken only when they name this process, and never left for a child."""
    from unionfs.cli.server import activated

    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert activated() is None and os.environ["LISTEN_FDS"] == "1"  # another process's
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "a:b")
    with pytest.raises(ValueError, match="expected one socket"):
        activated()
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)
