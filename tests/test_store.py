"""The layer store: images built by real tools, mounted, compared with ``umoci unpack``."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from .images import sh, um
from .mounts import COMMAND, fresh_dirs, is_mounted
from .tree import snapshot, store_digest


def mtimes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not stat.S_ISDIR(st.st_mode):
                out[os.path.relpath(p, root)] = st.st_mtime_ns // 10**9
    return out


def test_mounted_image_is_what_umoci_unpacks(image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    r = um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "demo:1")
    assert r.returncode == 0, r.stderr
    r = um("mount", "--root", store, "--image", "demo:1", "--name", "c1", "--image-volumes", "ignore", "--log",
           tmp_path / "log", mnt)  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        oracle = image / "ref" / "rootfs"
        assert snapshot(mnt) == snapshot(oracle)
        assert mtimes(mnt) == mtimes(oracle)
        dirs = [Path(d).relative_to(oracle) for d, _, _ in os.walk(oracle)]
        assert len(dirs) > 3
        for d in dirs:  # a directory's size as the unpacked tree has it on disk (not 0)
            assert (d, os.lstat(mnt / d).st_size) == (d, os.lstat(oracle / d).st_size)
        assert os.stat(mnt / "etc" / "motd").st_ino == os.stat(mnt / "etc" / "motd.hard").st_ino
        assert os.stat(mnt / "d" / "sparse").st_size == 5 * 2**20 + 5
        for path, attr in (("d/ping", "security.capability"), ("d/sub", "system.posix_acl_default")):
            assert os.getxattr(mnt / path, attr) == os.getxattr(oracle / path, attr)
    finally:
        um("umount", mnt)
    blobs = [p for p in (store / "blobs").rglob("*") if p.is_file()]
    sparse = max(blobs, key=lambda p: p.stat().st_size)
    assert sparse.stat().st_blocks * 512 < 1 << 20, "the sparse file's blob is not sparse"


def test_docker_archive_and_dedup(image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    archive = tmp_path / "img.tar"
    subprocess.run(
        ["skopeo", "copy", f"oci:{image}/img:t", f"docker-archive:{archive}:demo:2"], check=True, capture_output=True
    )
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "demo:1").returncode == 0
    nblobs = sum(1 for p in (store / "blobs").rglob("*") if p.is_file())
    r = um("image", "--root", store, "import", f"docker-archive:{archive}")
    assert r.returncode == 0, r.stderr
    assert sum(1 for p in (store / "blobs").rglob("*") if p.is_file()) == nblobs, "shared layers stored twice"
    ls = json.loads(um("image", "--root", store, "ls", "--format", "json").stdout)
    assert sorted(i["Name"] for i in ls) == ["demo:1", "demo:2"]
    r = um("mount", "--root", store, "--image", "demo:2", "--image-volumes", "ignore", "--log", tmp_path / "log", mnt)
    assert r.returncode == 0, r.stderr
    try:
        assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")
    finally:
        um("umount", mnt)
    info = json.loads(um("image", "--root", store, "inspect", "demo:2").stdout)
    assert info["Volumes"] == {"/data": {}} and info["Cmd"] == ["sh"] and len(info["Layers"]) == 3
    oci_tar = tmp_path / "oci.tar"  # the same image as a tar of its OCI layout (podman save --format oci-archive)
    subprocess.run(
        ["skopeo", "copy", f"oci:{image}/img:t", f"oci-archive:{oci_tar}:v3"], check=True, capture_output=True
    )
    r = um("image", "--root", store, "import", f"oci-archive:{oci_tar}:v3", "--tag", "demo:3")
    assert r.returncode == 0, r.stderr
    assert json.loads(um("image", "--root", store, "inspect", "demo:3").stdout)["Layers"] == info["Layers"]
    assert sum(1 for p in (store / "blobs").rglob("*") if p.is_file()) == nblobs
    for spec, needle in (
        (f"oci-archive:{oci_tar}:nope", "no image 'nope'"),
        (f"oci-archive:{archive}", "no index.json"),
    ):
        r = um("image", "--root", store, "import", spec)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_zstd_layers_from_skopeo(image: Path, tmp_path: Path) -> None:
    store, mnt, zimg = tmp_path / "store", tmp_path / "mnt", tmp_path / "z"
    mnt.mkdir()
    subprocess.run(
        ["skopeo", "copy", "--dest-compress", "--dest-compress-format", "zstd", f"oci:{image}/img:t", f"oci:{zimg}:t"],
        check=True, capture_output=True,
    )  # fmt: skip
    magic = {p.read_bytes()[:4] for p in (zimg / "blobs" / "sha256").iterdir()}
    assert b"\x28\xb5\x2f\xfd" in magic  # the layers really are zstd
    r = um("image", "--root", store, "import", f"oci:{zimg}:t", "--tag", "z")
    assert r.returncode == 0, r.stderr
    r = um("mount", "--root", store, "--image", "z", "--image-volumes", "ignore", mnt)
    assert r.returncode == 0, r.stderr
    try:
        assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")
    finally:
        um("umount", mnt)


def test_root_filesystem_tarball_as_docker_import(image: Path, tmp_path: Path) -> None:
    """A flat tarball made by GNU tar (any compression, a file or stdin) becomes a one-layer image of that tree."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    rootfs = image / "ref" / "rootfs"
    plain = tmp_path / "rootfs.tar"
    sh(f"tar --xattrs --xattrs-include='*' -C {rootfs} -cf {plain} .", tmp_path)
    sh(f"gzip -k {plain}", tmp_path)
    r = um("image", "--root", store, "import", f"{plain}.gz", "base:1", "-m", "from tar",
           "--change", 'CMD ["/bin/sh", "-c", "echo hi"]', "-c", "ENV A=1 B='two words'", "-c", "VOLUME /data /srv",
           "-c", "WORKDIR /etc", "-c", "EXPOSE 80", "-c", "LABEL k=v")  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads(um("image", "--root", store, "inspect", "base:1").stdout)
    assert info["Cmd"] == ["/bin/sh", "-c", "echo hi"] and info["Env"] == ["A=1", "B=two words"]
    assert info["Volumes"] == {"/data": {}, "/srv": {}} and info["WorkingDir"] == "/etc"
    assert info["Config"]["config"]["ExposedPorts"] == {"80/tcp": {}} and info["Config"]["config"]["Labels"]["k"] == "v"
    assert info["Config"]["history"][0]["comment"] == "from tar" and len(info["Layers"]) == 1
    for tool in ("zstd", "xz", "bzip2", "cat"):  # through stdin: the same layer whatever the compression
        pack = f"{tool} -c" if tool != "cat" else "cat"
        r = subprocess.run(f"{pack} < {plain} | {' '.join(map(str, COMMAND))} image --root {store} import - {tool}",
                           shell=True, capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(um("image", "--root", store, "inspect", tool).stdout)["Layers"] == info["Layers"]
    assert not os.listdir(store / "tmp"), "the inflated tarball was left behind"
    r = um("mount", "--root", store, "--image", "base:1", "--name", "c", "--log", tmp_path / "log", mnt)
    assert r.returncode == 0, r.stderr
    try:
        tree = snapshot(mnt)
        assert [tree.pop(v)[0] for v in ("data", "srv")] == [oct(stat.S_IFDIR | 0o755)] * 2  # made for VOLUMEs
        assert tree == snapshot(rootfs)
        (mnt / "data" / "in-volume").write_text("v\n")
    finally:
        um("umount", mnt)
    assert "data/in-volume" not in um("diff", "--root", store, "c").stdout  # /data is the image's anonymous volume
    for args, needle in (
        (("-c", "FROM x"), "FROM is not one of"),
        (("-c", "CMD [1]"), "not a JSON array of strings"),
        (("-c", "ENV"), "ENV needs an argument"),
    ):
        r = um("image", "--root", store, "import", plain, "x", *args)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for bad in (tmp_path / "log", tmp_path / "empty"):
        bad.touch()
        r = um("image", "--root", store, "import", bad, "x")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.listdir(store / "tmp") and "x:latest" not in um("image", "--root", store, "ls").stdout


def test_container_layer_survives_remount(image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "demo").returncode == 0
    assert um("mount", "--root", store, "--image", "demo", "--name", "web", mnt).returncode == 0
    try:
        (mnt / "etc" / "motd").write_text("container\n")
        os.unlink(mnt / "d" / "keep")
        os.rename(mnt / "usr" / "share" / "apt", mnt / "usr" / "share" / "apt2")
    finally:
        um("umount", mnt)
    assert um("mount", "--root", store, "--image", "demo", "--name", "web", mnt).returncode == 0
    try:
        assert (mnt / "etc" / "motd").read_text() == "container\n"
        assert not (mnt / "d" / "keep").exists() and (mnt / "d" / "keep.hard").exists()
        assert (mnt / "usr" / "share" / "apt2").is_dir() and not (mnt / "usr" / "share" / "apt").exists()
    finally:
        um("umount", mnt)
    r = um("mount", "--root", store, "--image", "demo", mnt)  # a fresh container
    assert r.returncode == 0 and r.stdout.strip().startswith("c-")
    try:
        assert (mnt / "etc" / "motd").read_text() == "hello\nmore\n"
    finally:
        um("umount", mnt)
    r = um("image", "--root", store, "rm", "demo")
    assert r.returncode != 0 and "used by container" in r.stderr


# -- hostile and broken input ------------------------------------------------------------


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], *, truncate: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return raw[: len(raw) - truncate] if truncate else raw


def _member(name: str, data: bytes = b"x", **kw: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    if info.type == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def make_oci(
    root: Path, layers: list[bytes], *, corrupt: bool = False, gz: Callable[[bytes], bytes] = gzip.compress
) -> Path:
    """An OCI layout holding ``layers`` (uncompressed tars; every other one compressed by ``gz``)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return "sha256:" + h

    descs, diff_ids = [], []
    for i, tar in enumerate(layers):
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        blob = gz(tar) if i % 2 else tar
        d = put(blob)
        if corrupt:
            (blobs / d[7:]).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": len(blob)})
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}, "config": {}}
    ).encode()
    cd = put(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(config)},
            "layers": descs,
        }
    ).encode()
    md = put(manifest)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": md,
                        "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": "t"},
                    }
                ],
            }
        )
    )
    return root


HOSTILE = {
    "dotdot": ([[_member("a"), _member("../../escape")]], "climbs out"),
    "link outside": ([[_member("x", type=tarfile.LNKTYPE, linkname="/etc/passwd")]], "hard link"),
    "below a symlink": ([[_member("s", type=tarfile.SYMTYPE, linkname="/tmp"), _member("s/evil")]], "non-directory"),
    "truncated": ([[_member("big", b"y" * 100000)]], "truncated"),
    "corrupt blob": ([[_member("a")]], "corrupt"),
    "whiteout of the root": ([[_member("a"), _member(".wh.", b"")]], "whiteout of no name"),
    "whiteout of a parent": ([[_member("d/", type=tarfile.DIRTYPE), _member("d/.wh..", b"")]], "whiteout of no name"),
    "name over 255 bytes": ([[_member("d/" + "n" * 256)]], "longer than 255 bytes"),
    "path over the store's keys": ([[_member("/".join(["p" * 200] * 3))]], "has a path of"),
    "uid over 2^32": ([[_member("a", uid=2**32 + 5)]], "owner out of range"),
    "gid of (gid_t)-1": ([[_member("a", gid=2**32 - 1)]], "owner out of range"),
    "mtime 1e300": ([[_member("a", pax_headers={"mtime": "1e300"})]], "mtime out of range"),
    "mtime in the year 10^15": ([[_member("a", pax_headers={"mtime": "9" * 22})]], "mtime out of range"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_layers_are_refused_and_change_nothing(case: str, image: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "good").returncode == 0
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*") if "meta" not in p.parts)
    digest_before = store_digest(store)
    layer_specs, needle = HOSTILE[case]
    tars = [_tar(m, truncate=5000 if case == "truncated" else 0) for m in layer_specs]
    layout = make_oci(tmp_path / "bad", tars, corrupt=case == "corrupt blob")
    r = um("image", "--root", store, "import", f"oci:{layout}:t", "--tag", "bad")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and needle in lines[0], r.stderr
    after = sorted(str(p.relative_to(store)) for p in store.rglob("*") if "meta" not in p.parts)
    assert after == before
    assert store_digest(store) == digest_before
    names = [i["Name"] for i in json.loads(um("image", "--root", store, "ls", "--format", "json").stdout)]
    assert names == ["good:latest"]
    assert not (tmp_path / "escape").exists() and not Path("/tmp/evil").exists()


def _gzip_tool(data: bytes) -> bytes:
    return subprocess.run(["gzip", "-c"], input=data, capture_output=True, check=True).stdout


def test_gzip_members_padding_and_truncation(tmp_path: Path) -> None:
    """Layers as ``gzip -d`` reads them: several members, zero padding after them; a truncated one is refused."""
    store = tmp_path / "store"
    l1 = _tar([_member("base", b"b")])
    l2 = _tar([_member(f"f{i}", os.urandom(300_000)) for i in range(8)])

    def members(tar: bytes) -> bytes:  # two gzip runs concatenated, then padding
        half = len(tar) // 2
        return _gzip_tool(tar[:half]) + _gzip_tool(tar[half:]) + b"\0" * 4096

    layout = make_oci(tmp_path / "multi", [l1, l2], gz=members)
    r = um("image", "--root", store, "import", f"oci:{layout}:t", "--tag", "multi")
    assert r.returncode == 0, r.stderr
    layout = make_oci(tmp_path / "cut", [l1, l2], gz=lambda t: _gzip_tool(t)[:-20_000])
    store = tmp_path / "fresh"  # (the first store has this layer: it would not read it again)
    r = um("image", "--root", store, "import", f"oci:{layout}:t", "--tag", "cut")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ended before the end of its gzip stream" in r.stderr, r.stderr
    assert json.loads(um("image", "--root", store, "ls", "--format", "json").stdout) == []


def test_handmade_layers_follow_oci_rules(tmp_path: Path) -> None:
    """Non-contiguous dirs, missing parents, late opaque markers, dir replaced by file, re-created dirs."""
    d = tarfile.DIRTYPE
    l1 = _tar(
        [
            _member("a/b/f1"),
            _member("top", type=d),
            _member("a/c", type=d),
            _member("a/b/f2"),
            _member("opq/x"),
            _member("opq/y"),
            _member("dir2file/z"),
            _member("recreated/old"),
        ]
    )
    l2 = _tar(
        [
            _member("opq", type=d),
            _member("opq/new"),
            _member("opq/.wh..wh..opq"),
            _member("dir2file", b"F"),
            _member("a/b/.wh.f1"),
            _member(".wh.recreated"),
        ]
    )
    l3 = _tar([_member("recreated", type=d), _member("recreated/new")])
    layout = make_oci(tmp_path / "img", [l1, l2, l3])
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    r = um("image", "--root", store, "import", f"oci:{layout}:t")
    assert r.returncode == 0, r.stderr
    assert um("mount", "--root", store, "--image", r.stdout.split()[0], mnt).returncode == 0
    try:
        files = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
        assert files == ["a", "a/b", "a/b/f2", "a/c", "dir2file", "opq", "opq/new", "recreated", "recreated/new", "top"]
        assert (mnt / "dir2file").read_bytes() == b"F"
    finally:
        um("umount", mnt)
        if is_mounted(mnt):
            shutil.rmtree(mnt, ignore_errors=True)


def test_unknown_source_and_image_errors(image: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    r = um("diff", "--root", store, "c")  # a command that only reads creates no store
    assert r.returncode != 0 and "no store at" in r.stderr and not store.exists()
    for args, needle in (
        (("import", f"oci:{image}/img:t", "--tag", "Bad:Name"), "invalid image name 'Bad:Name'"),
        (("import", "oci:/nonexistent"), "does not exist"),
        (("import", "ftp:x"), "unknown transport 'ftp'"),
        (("import", f"oci:{tmp_path}"), "not an OCI image layout"),
        (("inspect", "nope"), "no image 'nope'"),
        (("rm", "nope"), "no image 'nope'"),
    ):
        r = um("image", "--root", store, *args)
        assert r.returncode != 0 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (m,) = fresh_dirs(tmp_path, "m")
    r = um("mount", "--root", store, "--image", "nope", m)
    assert r.returncode != 0 and "no image 'nope'" in r.stderr


def test_df_gc_check(image: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    layout = tmp_path / "layout"
    shutil.copytree(image / "img", layout)
    sh(
        "umoci unpack --image layout:t b && echo only-in-two > b/rootfs/extra && umoci repack --image layout:two b",
        tmp_path,
    )
    assert um("image", "--root", store, "import", f"oci:{layout}:t", "--tag", "one").returncode == 0
    nblobs = sum(1 for p in (store / "blobs").rglob("*") if p.is_file())
    assert um("image", "--root", store, "import", f"oci:{layout}:two", "--tag", "two").returncode == 0
    assert sum(1 for p in (store / "blobs").rglob("*") if p.is_file()) == nblobs + 1, "the shared base was copied"
    df = um("store", "--root", store, "df")
    assert df.returncode == 0 and "saved by dedup" in df.stdout
    assert um("image", "--root", store, "rm", "two").returncode == 0
    r = um("store", "--root", store, "gc")
    assert r.returncode == 0 and r.stdout.startswith("removed 1 layers and 1 blobs"), r.stdout
    assert sum(1 for p in (store / "blobs").rglob("*") if p.is_file()) == nblobs
    assert um("store", "--root", store, "check").returncode == 0
    victim = next(p for p in (store / "blobs").rglob("*") if p.is_file() and p.stat().st_size > 0)
    victim.chmod(0o644)
    victim.write_bytes(b"damaged")
    r = um("store", "--root", store, "check")
    assert r.returncode != 0 and "damaged" in r.stdout


def test_inspect_sizes(image: Path, tmp_path: Path) -> None:
    store, layout = tmp_path / "store", tmp_path / "layout"
    shutil.copytree(image / "img", layout)
    sh(
        "umoci unpack --image layout:t b && echo unique-to-two > b/rootfs/extra && umoci repack --image layout:two b",
        tmp_path,
    )
    for tag in ("t", "two"):
        assert um("image", "--root", store, "import", f"oci:{layout}:{tag}", "--tag", tag).returncode == 0
    one, two = (json.loads(um("image", "--root", store, "inspect", t).stdout) for t in ("t", "two"))
    assert one["Size"] > 5 * 2**20 and two["Size"] == one["Size"] + len("unique-to-two\n")
    assert 0 < one["SharedSize"] == two["SharedSize"] <= one["Size"]
    assert um("image", "--root", store, "rm", "two").returncode == 0
    assert json.loads(um("image", "--root", store, "inspect", "t").stdout)["SharedSize"] == 0


def _many_files_image(src: Path, files: int, tag: str = "t") -> None:
    sh(
        f"[ -d img ] || umoci init --layout img; umoci new --image img:{tag} && umoci unpack --image img:{tag} b && "
        f"python3 -c \"import os\nfor i in range({files}): open(f'b/rootfs/f{{i}}', 'wb').write(os.urandom(3000))\" && "
        f"umoci repack --image img:{tag} b && rm -rf b",
        src,
    )


def test_file_dedup_across_layers_with_few_fds(tmp_path: Path) -> None:
    """400 files stored again by another layer: each is a dedup hit, none may leak an fd (ulimit -n 64)."""
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    sh(
        "umoci init --layout img && umoci new --image img:a && umoci unpack --image img:a b && "
        "for i in $(seq 400); do echo file $i > b/rootfs/f$i; done && head -c 3000000 /dev/urandom > b/rootfs/big && "
        "cp -a b/rootfs keep && umoci repack --image img:a b && rm -rf b && "
        "umoci new --image img:b && umoci unpack --image img:b b && cp -a keep/. b/rootfs/ && "
        "echo other > b/rootfs/x && "
        "umoci repack --image img:b b && rm -rf b",
        src,
    )
    for tag in ("a", "b"):
        r = subprocess.run(
            ["bash", "-c", 'ulimit -n 64 && exec "$@"', "-", *COMMAND, "image", "--root", str(store), "import",
             f"oci:{src}/img:{tag}", "--tag", tag],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    assert sum(1 for p in (store / "blobs").rglob("*") if p.is_file()) == 400 + 2
    assert um("store", "--root", store, "check").returncode == 0


def test_gc_during_import_and_kill_during_gc(tmp_path: Path) -> None:
    """gc waits for a running import (never deletes a blob it is about to use); kill -9 of gc loses nothing."""
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    _many_files_image(src, 3000, "a")
    _many_files_image(src, 3000, "b")
    assert um("image", "--root", store, "import", f"oci:{src}/img:a", "--tag", "a").returncode == 0
    proc = subprocess.Popen(
        [*COMMAND, "image", "--root", str(store), "import", f"oci:{src}/img:b", "--tag", "b"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    gcs = 0
    while proc.poll() is None or gcs == 0:
        assert um("store", "--root", store, "gc").returncode == 0
        gcs += 1
    assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
    assert um("store", "--root", store, "check").returncode == 0
    # drop a, then kill gc at several points while it frees 3000 blobs
    assert um("image", "--root", store, "rm", "a").returncode == 0
    for delay in ("0.3", "0.6", "1.0"):
        gc = subprocess.Popen([*COMMAND, "store", "--root", str(store), "gc"], stdout=subprocess.DEVNULL)
        subprocess.run(["sleep", delay])
        gc.kill()
        gc.wait()
        r = um("store", "--root", store, "check")
        assert r.returncode == 0, r.stdout
    assert um("store", "--root", store, "gc").returncode == 0
    assert sum(1 for p in (store / "blobs").rglob("*") if p.is_file()) == 3000  # b's files, a's are gone
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert um("mount", "--root", store, "--image", "b", mnt).returncode == 0
    try:
        ref = src / "ref"
        sh(f"umoci unpack --image img:b {ref}", src)
        assert snapshot(mnt) == snapshot(ref / "rootfs")
    finally:
        um("umount", mnt)


def test_kill_during_import_then_import_again(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sh(
        "umoci init --layout img && umoci new --image img:t && umoci unpack --image img:t b && "
        "for i in $(seq 400); do head -c 100000 /dev/urandom > b/rootfs/f$i; done && "
        "head -c 300000000 /dev/urandom > b/rootfs/big && umoci repack --image img:t b && rm -rf b",
        src,
    )
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([*COMMAND, "image", "--root", str(store), "import", f"oci:{src}/img:t", "--tag", "x"])
    deadline = 200
    while deadline and not (store / "blobs").exists():
        deadline -= 1
        subprocess.run(["sleep", "0.05"])
    subprocess.run(["sleep", "0.5"])
    proc.kill()
    proc.wait()
    r = um("store", "--root", store, "check")
    assert r.returncode == 0, r.stdout + r.stderr
    r = um("image", "--root", store, "import", f"oci:{src}/img:t", "--tag", "x")
    assert r.returncode == 0, r.stderr
    assert um("store", "--root", store, "check").returncode == 0
    assert um("mount", "--root", store, "--image", "x", mnt).returncode == 0
    try:
        ref = src / "ref"
        sh(f"umoci unpack --image img:t {ref}", src)
        assert snapshot(mnt) == snapshot(ref / "rootfs")
    finally:
        um("umount", mnt)
    assert not list((store / "tmp").iterdir())


def _index(layout: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((layout / "index.json").read_text())


def _manifest_blob(layout: Path) -> Path:
    return layout / "blobs" / "sha256" / _index(layout)["manifests"][0]["digest"][7:]


def _rewrite_manifest(layout: Path, change: Callable[[dict], object]) -> None:  # type: ignore[type-arg]
    """Replace the manifest by ``change(manifest)`` (stored under its new digest, the index updated)."""
    old = _manifest_blob(layout)
    data = json.dumps(change(json.loads(old.read_bytes()))).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    index = _index(layout)
    index["manifests"][0].update(digest="sha256:" + digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def _set_index(layout: Path, index: object) -> None:
    (layout / "index.json").write_text(json.dumps(index))


def _swap_blob(layout: Path, make: Callable[[Path], None], which: str = "manifest") -> None:
    if which == "manifest":
        p = _manifest_blob(layout)
    else:
        manifest = json.loads(_manifest_blob(layout).read_bytes())
        p = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
    p.unlink()
    make(p)


def _sparse(size: int) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        with open(p, "wb") as f:
            f.truncate(size)

    return make


REF_NAME = "org.opencontainers.image.ref.name"
BAD_LAYOUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "manifests not a list": (lambda lay: _set_index(lay, {"manifests": "x"}), "not a list"),
    "index not an object": (lambda lay: _set_index(lay, [1, 2]), "not a JSON object"),
    "index entry without digest": (
        lambda lay: _set_index(lay, {"manifests": [{"size": 3, "annotations": {REF_NAME: "t"}}]}),
        "no 'digest' string",
    ),
    "config not an object": (lambda lay: _rewrite_manifest(lay, lambda m: {**m, "config": "x"}), "not a JSON object"),
    "layers not a list": (lambda lay: _rewrite_manifest(lay, lambda m: {**m, "layers": {"a": 1}}), "not a list"),
    "layer without digest": (lambda lay: _rewrite_manifest(lay, lambda m: {**m, "layers": [{"size": 1}] * 2}), "dig"),
    "manifest a list": (lambda lay: _rewrite_manifest(lay, lambda m: [m]), "not a JSON object"),
    "manifest a symlink to /dev/zero": (lambda lay: _swap_blob(lay, lambda p: p.symlink_to("/dev/zero")), "regular"),
    "manifest a FIFO": (lambda lay: _swap_blob(lay, lambda p: os.mkfifo(p)), "not a regular file"),
    "manifest a sparse 8 GiB file": (lambda lay: _swap_blob(lay, _sparse(8 << 30)), "larger than its descriptor"),
    "layer a sparse 8 GiB file": (lambda lay: _swap_blob(lay, _sparse(8 << 30), "layer"), "larger than its descriptor"),
    "layer a symlink out of the layout": (
        lambda lay: _swap_blob(lay, lambda p: p.symlink_to("/etc/passwd"), "layer"),
        "not a regular file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYOUTS))
def test_malformed_layouts_are_refused_with_one_line(case: str, image: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "good").returncode == 0
    before = store_digest(store)
    layout = make_oci(tmp_path / "bad", [_tar([_member("a")]), _tar([_member("b")])])
    spoil, needle = BAD_LAYOUTS[case]
    spoil(layout)
    r = subprocess.run([*COMMAND, "image", "--root", str(store), "import", f"oci:{layout}:t", "--tag", "bad"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and needle in lines[0], r.stderr
    assert store_digest(store) == before


def test_docker_archive_with_a_malformed_manifest(tmp_path: Path) -> None:
    for manifest in (b'{"a": 1}', b"[1]", b'[{"Config": 5, "Layers": []}]', b'[{"Config": "c", "Layers": "x"}]'):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo("manifest.json")
            info.size = len(manifest)
            t.addfile(info, io.BytesIO(manifest))
            info = tarfile.TarInfo("c")
            info.size = 2
            t.addfile(info, io.BytesIO(b"{}"))
        (tmp_path / "a.tar").write_bytes(buf.getvalue())
        r = um("image", "--root", tmp_path / "store", "import", f"docker-archive:{tmp_path / 'a.tar'}")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_nanosecond_mtimes_survive_import_mount_and_save(tmp_path: Path) -> None:
    """A PAX mtime with nanoseconds comes back to the nanosecond: through the mount, and after save + umoci unpack."""
    ns = 1796395976_421930827
    layer = _tar([_member("f", b"data", pax_headers={"mtime": "1796395976.421930827"}),
                  _member("old", b"x", pax_headers={"mtime": "-1.5"})])  # fmt: skip
    layout = make_oci(tmp_path / "lay", [layer])
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert um("image", "--root", store, "import", f"oci:{layout}:t", "--tag", "ns:1").returncode == 0
    r = um("mount", "--root", store, "--image", "ns:1", "--name", "c", mnt)
    assert r.returncode == 0, r.stderr
    try:
        assert os.lstat(mnt / "f").st_mtime_ns == ns
        assert os.lstat(mnt / "old").st_mtime_ns == -1_500_000_000
    finally:
        um("umount", mnt)
    r = um("image", "--root", store, "save", "ns:1", f"oci:{tmp_path / 'out'}:t")
    assert r.returncode == 0, r.stderr
    sh(f"umoci unpack --image {tmp_path / 'out'}:t {tmp_path / 'b'} >/dev/null", tmp_path)
    assert os.lstat(tmp_path / "b" / "rootfs" / "f").st_mtime_ns == ns
    assert os.lstat(tmp_path / "b" / "rootfs" / "old").st_mtime_ns == -1_500_000_000
