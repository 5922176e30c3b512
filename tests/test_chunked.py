"""zstd:chunked images (issue 21), made by skopeo, and eStargz images, written by :mod:`tests.estargz`: served
by a real docker-registry, pulled by their tables of contents, file by file, through a proxy that counts the
bytes (:class:`tests.registry.BlobProxy`)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import lmdb

from . import estargz
from .images import image_mount, mounted, sh, um
from .mounts import daemon_pid, force_unmount
from .registry import PASSWORD, USER, BlobProxy, Registry, registry
from .tree import snapshot

CHUNKED = ["--dest-compress-format", "zstd:chunked"]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@contextmanager
def served(base: Path, ranges: bool = True, parts: bool = True) -> Iterator[tuple[Registry, BlobProxy]]:
    with registry(base / "reg") as reg:
        proxy = BlobProxy(reg.host, ranges, parts)
        try:
            yield reg, proxy
        finally:
            proxy.close()


def lazy_mount(store: Path, ref: str, mnt: Path, *extra: str) -> AbstractContextManager[Path]:
    """``mount --pull lazy --no-prefetch`` (and ``extra``); always unmounted on exit."""
    return mounted("mount", "--root", store, "--image", ref, "--pull", "lazy", "--no-prefetch", *extra, mnt=mnt)


def _pull(store: Path, ref: str) -> None:
    r = um("image", "--root", store, "pull", ref)
    assert r.returncode == 0, r.stderr


def _one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode != 0 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def _layers(reg: Registry, digest: str) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(reg.blob_file(digest).read_bytes())["layers"]


def _gnu_tar_image(base: Path) -> tuple[Path, Path]:
    """An image whose one layer GNU tar wrote (skopeo rewrites such a tar when it makes it zstd:chunked,
    keeping the old diff_id); and the tree it holds."""
    tree = base / "tree"
    base.mkdir()
    sh(
        f"""
        mkdir -p {tree}/etc {tree}/bin {tree}/empty
        echo hello > {tree}/etc/os-release; ln {tree}/etc/os-release {tree}/etc/hard
        head -c 300000 /dev/urandom > {tree}/bin/big; : > {tree}/etc/zero; ln -s ../etc/os-release {tree}/bin/l
        chmod 4711 {tree}/bin/big; chown 7:8 {tree}/etc/os-release
        tar --format=gnu -C {tree} -cf layer.tar .
        umoci init --layout img; umoci new --image img:t; umoci raw add-layer --image img:t layer.tar
        """,
        base,
    )
    return base / "img", tree


def test_zstd_chunked_images_pull_by_toc_and_mount_as_they_are(image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    gnu, tree = _gnu_tar_image(tmp_path / "gnu")
    with served(tmp_path) as (reg, proxy):
        digest = reg.push(f"oci:{image}/img:t", "app:1", *CHUNKED)
        assert all("zstd-chunked.manifest-checksum" in str(la.get("annotations")) for la in _layers(reg, digest))
        _pull(store, f"{proxy.host}/app:1")
        layers = {la["digest"] for la in _layers(reg, digest)}
        assert all(r is not None for p, r, _ in proxy.gets if p.rsplit("/", 1)[-1] in layers)  # parts only
        info = json.loads(um("image", "--root", store, "inspect", f"{proxy.host}/app:1").stdout)
        assert all(la.startswith("toc:") for la in info["Layers"]), info["Layers"]
        with image_mount(store, f"{proxy.host}/app:1", "c1", mnt):
            assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")
        # pushed on, the image is the same tree to a fresh store
        r = um("image", "--root", store, "push", f"{proxy.host}/app:1", f"{reg.host}/back:1")
        assert r.returncode == 0, r.stderr
        _pull(tmp_path / "fresh", f"{reg.host}/back:1")
        with image_mount(tmp_path / "fresh", f"{reg.host}/back:1", "c3", mnt):
            assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")

        # a layer skopeo re-wrote: its diff_id no longer matches, its TOC does (was refused before)
        reg.push(f"oci:{gnu}:t", "gnu:1", *CHUNKED)
        _pull(store, f"{proxy.host}/gnu:1")
        with image_mount(store, f"{proxy.host}/gnu:1", "c2", mnt):
            assert snapshot(mnt) == snapshot(tree)
        assert um("store", "--root", store, "check").returncode == 0


def test_a_push_names_the_blobs_it_pulled(image: Path, tmp_path: Path) -> None:
    """Pushed to the registry it came from, a pulled image keeps its blobs: the same layer descriptors
    (zstd:chunked annotations included) and config, mounted from their repository, nothing uploaded."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    with served(tmp_path) as (reg, proxy):
        pulled = {"app": reg.push(f"oci:{image}/img:t", "app:1", *CHUNKED)}
        pulled["gz"] = reg.push(f"oci:{image}/img:t", "gz:1")
        pulled["v"] = reg.push(f"oci:{_versions(tmp_path)}:1", "v:1", *CHUNKED)  # (podman cannot apply img:t's layers)
        for name in pulled:
            _pull(store, f"{reg.host}/{name}:1")
        for name, digest in pulled.items():
            r = um("image", "--root", store, "push", f"{reg.host}/{name}:1", f"{reg.host}/team/{name}:2")
            assert r.returncode == 0, r.stderr
            n = len(_layers(reg, digest)) + 1
            assert f"(0 of {n} blobs uploaded" in r.stdout, r.stdout  # mounted across repositories
            pushed = json.loads(reg.blob_file(r.stdout.split()[1]).read_bytes())
            original = json.loads(reg.blob_file(digest).read_bytes())
            assert pushed["layers"] == original["layers"] and pushed["config"]["digest"] == original["config"]["digest"]
        # pulled lazily, pushed to its own registry: nothing of it is fetched first, nothing uploaded
        lazy = tmp_path / "lazy"
        assert um("image", "--root", lazy, "pull", "--lazy", f"{reg.host}/v:1").returncode == 0
        missing = _missing(lazy, f"{reg.host}/v:1")
        r = um("image", "--root", lazy, "push", f"{reg.host}/v:1", f"{reg.host}/team/lazy:2")
        assert r.returncode == 0 and "(0 of" in r.stdout, r.stdout + r.stderr
        assert missing > 0 and _missing(lazy, f"{reg.host}/v:1") == missing
        # the same repository, another tag: the registry has every blob
        r = um("image", "--root", store, "push", f"{reg.host}/gz:1", f"{reg.host}/gz:again")
        assert r.returncode == 0 and "(0 of" in r.stdout, r.stdout + r.stderr
        # what was pushed is whole: skopeo copies it and podman pulls it (checking every digest); read by its
        # TOC, lazily
        sh(f"skopeo copy --src-tls-verify=false docker://{reg.host}/team/gz:2 oci:{tmp_path}/out:x", tmp_path)
        runroot = tempfile.mkdtemp(prefix="pdr.")  # podman wants a short runroot path
        podman = ["podman", "--root", str(tmp_path / "pd"), "--runroot", runroot, "--storage-driver", "vfs"]
        try:
            r = subprocess.run([*podman, "pull", "--tls-verify=false", f"{reg.host}/team/v:2"],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
            assert r.returncode == 0, r.stderr
        finally:
            subprocess.run([*podman, "rmi", "-a", "-f"], capture_output=True)
            shutil.rmtree(runroot, ignore_errors=True)
        fresh = tmp_path / "fresh"
        with lazy_mount(fresh, f"{proxy.host}/team/app:2", mnt, "--image-volumes", "ignore"):
            assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")
        info = json.loads(um("image", "--root", fresh, "inspect", f"{proxy.host}/team/app:2").stdout)
        assert all(la.startswith("toc:") for la in info["Layers"]), info["Layers"]


def test_a_push_to_another_registry_copies_the_blobs_it_pulled(image: Path, tmp_path: Path) -> None:
    """Pushed to another registry, a pulled image keeps its digests (as ``skopeo copy`` does): each layer blob
    is copied from the registry it came from, checked, uploaded; a lazily pulled image fetches nothing into
    the store for it. With that registry gone, the layers are compressed again (a warning says so)."""
    store, lazy = tmp_path / "store", tmp_path / "lazy"
    with registry(tmp_path / "other") as other:
        with served(tmp_path) as (reg, _):
            pulled = {"app": reg.push(f"oci:{image}/img:t", "app:1", *CHUNKED)}
            pulled["gz"] = reg.push(f"oci:{image}/img:t", "gz:1")
            for name in pulled:
                _pull(store, f"{reg.host}/{name}:1")
            assert um("image", "--root", lazy, "pull", "--lazy", f"{reg.host}/app:1").returncode == 0
            missing = _missing(lazy, f"{reg.host}/app:1")
            for where, name in ((store, "app"), (store, "gz"), (lazy, "app")):
                r = um("image", "--root", where, "push", f"{reg.host}/{name}:1", f"{other.host}/{where.name}/{name}:1")
                assert r.returncode == 0, r.stderr
                pushed = json.loads(other.blob_file(r.stdout.split()[1]).read_bytes())
                original = json.loads(reg.blob_file(pulled[name]).read_bytes())
                assert pushed["layers"] == original["layers"], (pushed, original)  # digests, annotations kept
                assert pushed["config"]["digest"] == original["config"]["digest"]
                for desc in pushed["layers"]:
                    assert other.blob_file(desc["digest"]).read_bytes() == reg.blob_file(desc["digest"]).read_bytes()
            assert _missing(lazy, f"{reg.host}/app:1") == missing > 0  # (copied, not fetched into the store)
        # the first registry gone: written again, and what was pushed is whole (skopeo checks every digest)
        r = um("image", "--root", store, "push", f"{reg.host}/gz:1", f"{other.host}/again:1")
        assert r.returncode == 0, r.stderr
        assert "not copied from" in r.stderr and "Traceback" not in r.stderr, r.stderr
        pushed = json.loads(other.blob_file(r.stdout.split()[1]).read_bytes())
        assert pushed["layers"] != json.loads(reg.blob_file(pulled["gz"]).read_bytes())["layers"]
        sh(f"skopeo copy --src-tls-verify=false docker://{other.host}/again:1 oci:{tmp_path}/out:x", tmp_path)


def test_a_lazy_mount_fetches_with_the_login_it_was_given(tmp_path: Path) -> None:
    """``mount --pull lazy --creds``: the daemon fetches files with that login too (it had the auth files' only)."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    img = _versions(tmp_path)
    with registry(tmp_path / "reg", "htpasswd") as reg:
        reg.push(f"oci:{img}:1", "app:1", *CHUNKED)
        with lazy_mount(store, f"{reg.host}/app:1", mnt, "--creds", f"{USER}:{PASSWORD}"):
            assert (mnt / "data" / "f7").read_bytes() == _file(img, "1", "data/f7")


def _versions(base: Path) -> Path:
    """Two versions of one image (tags 1 and 2) of 60 files of 40 KiB each; version 2 changes 3 and adds 1."""
    sh(
        """
        umoci init --layout img; umoci new --image img:1; umoci unpack --image img:1 b
        mkdir b/rootfs/data
        for i in $(seq 60); do head -c 40960 /dev/urandom > b/rootfs/data/f$i; done
        umoci repack --image img:1 b; rm -rf b
        umoci unpack --image img:1 b
        for i in 7 30 55; do head -c 40960 /dev/urandom > b/rootfs/data/f$i; done
        head -c 40960 /dev/urandom > b/rootfs/data/new
        umoci repack --image img:2 b; rm -rf b
        """,
        base,
    )
    return base / "img"


def test_a_new_version_downloads_only_its_new_files(tmp_path: Path) -> None:
    store, other = tmp_path / "store", tmp_path / "other"
    img = _versions(tmp_path)
    with served(tmp_path) as (reg, proxy):
        reg.push(f"oci:{img}:1", "app:1", *CHUNKED)
        d2 = reg.push(f"oci:{img}:2", "app:2", *CHUNKED)
        _pull(store, f"{proxy.host}/app:1")
        before = proxy.blob_bytes()
        _pull(store, f"{proxy.host}/app:2")
        fetched = proxy.blob_bytes() - before
        # version 2 is two layers here (umoci repacks a diff): what both share is there already
        size = sum(la["size"] for la in _layers(reg, d2))
        assert fetched <= 0.15 * size, (fetched, size)
        assert fetched >= 4 * 40960  # the 4 new files did come (random: zstd cannot shrink them)

        # files the store holds from a gzip pull count too: a chunked pull of the same image fetches TOCs only
        reg.push(f"oci:{img}:1", "plain:1")
        _pull(other, f"{proxy.host}/plain:1")
        before = proxy.blob_bytes()
        _pull(other, f"{proxy.host}/app:1")
        assert proxy.blob_bytes() - before < 16384
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        for s in (store, other):
            with image_mount(s, f"{proxy.host}/app:1", "c", mnt):
                assert sorted(os.listdir(mnt / "data")) == sorted(f"f{i}" for i in range(1, 61))
                assert (mnt / "data" / "f7").read_bytes() == _file(img, "1", "data/f7")
        # what the store learnt of sha256s goes with the blobs
        assert _sha256_rows(other) == 60  # (the layer holds 60 files)
        assert um("container", "--root", other, "rm", "c").returncode == 0
        for name in (f"{proxy.host}/app:1", f"{proxy.host}/plain:1"):
            assert um("image", "--root", other, "rm", name).returncode == 0
        assert um("store", "--root", other, "gc").returncode == 0
        assert _sha256_rows(other) == 0


def test_a_new_version_asks_for_its_ranges_several_to_a_request(tmp_path: Path) -> None:
    """A second version in one layer, every third file changed: its 20 ranges go several to a request
    (``multipart/byteranges``), and a registry that sends one part at a time gets them one by one."""
    sh(
        """
        umoci init --layout img; umoci new --image img:1; umoci unpack --image img:1 b
        mkdir b/rootfs/data
        for i in $(seq 60); do head -c 40960 /dev/urandom > b/rootfs/data/f$i; done
        umoci repack --image img:1 b
        for i in $(seq 1 3 60); do head -c 40960 /dev/urandom > b/rootfs/data/f$i; done
        umoci new --image img:2; umoci unpack --image img:2 b2; cp -a b/rootfs/data b2/rootfs/
        umoci repack --image img:2 b2
        """,
        tmp_path,
    )  # (version 2 made afresh: one layer, not a diff over version 1)
    img, mnt = tmp_path / "img", tmp_path / "mnt"
    mnt.mkdir()
    for parts in (True, False):
        store = tmp_path / f"store-{parts}"
        with served(tmp_path / f"s-{parts}", parts=parts) as (reg, proxy):
            reg.push(f"oci:{img}:1", "app:1", *CHUNKED)
            reg.push(f"oci:{img}:2", "app:2", *CHUNKED)
            _pull(store, f"{proxy.host}/app:1")
            seen = len(proxy.gets)
            _pull(store, f"{proxy.host}/app:2")
            ranged = [r for path, r, _ in proxy.gets[seen:] if "/blobs/" in path and r]
            several = [r for r in ranged if "," in r]
            asked = sum(r.count(",") + 1 for r in ranged) - 1  # ranges asked for (less the TOC's)
            assert asked >= 10, ranged  # (changed files next to each other in the blob share one)
            if parts:
                assert several and len(ranged) <= 1 + 6, ranged  # the TOC, then at most PARALLEL requests
            else:
                assert 1 <= len(several) <= 6 and len(ranged) >= 1 + 10, ranged  # refused, then one by one
            with image_mount(store, f"{proxy.host}/app:2", "c", mnt):
                for i in range(1, 61):
                    assert (mnt / "data" / f"f{i}").read_bytes() == _file(img, "2", f"data/f{i}"), i


def _sha256_rows(store: Path) -> int:
    env = lmdb.open(str(store / "meta"), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return int(txn.stat(env.open_db(b"sha256", txn=txn))["entries"])
    finally:
        env.close()


def _file(img: Path, tag: str, path: str) -> bytes:
    """A file of an image version, as ``umoci unpack`` extracts it."""
    out = img.parent / f"unpacked-{tag}"
    if not out.exists():
        subprocess.run(["umoci", "unpack", "--image", f"{img}:{tag}", str(out)], check=True, capture_output=True)
    return (out / "rootfs" / path).read_bytes()


def test_a_registry_that_ignores_ranges_serves_the_whole_blob(image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    with served(tmp_path, ranges=False) as (reg, proxy):
        reg.push(f"oci:{image}/img:t", "app:1", *CHUNKED)
        _pull(store, f"{proxy.host}/app:1")
        with image_mount(store, f"{proxy.host}/app:1", "c1", mnt):
            assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")


def test_damaged_chunked_layers_are_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    img = _versions(tmp_path)
    with served(tmp_path) as (reg, proxy):
        digest = reg.push(f"oci:{img}:1", "app:1", *CHUNKED)
        _refused_when_damaged(reg, digest, store, f"{proxy.host}/app:1")

        # a manifest whose TOC checksum is not the TOC's
        manifest = json.loads(reg.blob_file(digest).read_bytes())
        for la in manifest["layers"]:
            for k in la["annotations"]:
                if k.endswith("manifest-checksum"):
                    la["annotations"][k] = "sha256:" + "0" * 64
        put = httpx.put(f"http://{reg.host}/v2/app/manifests/lying", content=json.dumps(manifest),
                        headers={"Content-Type": MANIFEST})  # fmt: skip
        assert put.status_code == 201, put.text
        _one_line_error(um("image", "--root", store, "pull", f"{proxy.host}/app:lying"), "does not match its checksum")
        # and one whose TOC lies beyond the blob
        for la in manifest["layers"]:
            for k in la["annotations"]:
                if k.endswith("manifest-position"):
                    la["annotations"][k] = f"{la['size']}:100:200:1"
        put = httpx.put(f"http://{reg.host}/v2/app/manifests/beyond", content=json.dumps(manifest),
                        headers={"Content-Type": MANIFEST})  # fmt: skip
        assert put.status_code == 201, put.text
        _one_line_error(um("image", "--root", store, "pull", f"{proxy.host}/app:beyond"), "beyond the end")
        assert um("store", "--root", store, "check").returncode == 0
        _pull(store, f"{proxy.host}/app:1")  # the sound image still pulls


def _refused_when_damaged(reg: Registry, digest: str, store: Path, ref: str) -> None:
    """A byte of a file's bytes in the biggest layer of manifest ``digest`` changed (the blob's digest is never
    checked when files come in parts): the pull of ``ref`` fails in one line and leaves no blob."""
    blob = reg.blob_file(max(_layers(reg, digest), key=lambda la: la["size"])["digest"])
    good = blob.read_bytes()
    bad = bytearray(good)
    bad[len(good) // 3] ^= 0x55
    blob.write_bytes(bytes(bad))
    try:
        r = um("image", "--root", store, "pull", ref)
    finally:
        blob.write_bytes(good)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sha256" in r.stderr or "decompress" in r.stderr, r.stderr
    assert not [p for p in (store / "blobs").rglob("*") if p.is_file()], "a refused pull left blobs"


def _missing(store: Path, ref: str) -> int:
    info = json.loads(um("image", "--root", store, "inspect", ref).stdout)
    return int(info["Missing"]["Files"])


def test_a_lazy_mount_fetches_what_is_read(tmp_path: Path) -> None:
    """``mount --pull lazy``: up from the TOC alone; a file's bytes come when it is first read, once; the tree,
    sizes and owners are all there before; ``image pull`` completes what is left."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    img = _versions(tmp_path)
    with served(tmp_path) as (reg, proxy):
        digest = reg.push(f"oci:{img}:1", "app:1", *CHUNKED)
        ref = f"{proxy.host}/app:1"
        args = ["mount", "--root", store, "--image", ref, "--name", "c", "--pull", "lazy", "--no-prefetch", mnt]
        r = um(*args)
        assert r.returncode == 0, r.stderr
        try:
            toc = proxy.blob_bytes()
            assert toc < 20_000  # manifest, config and the TOCs: not one file
            assert sorted(os.listdir(mnt / "data")) == sorted(f"f{i}" for i in range(1, 61))
            assert all((mnt / "data" / f"f{i}").stat().st_size == 40960 for i in range(1, 61))
            assert proxy.blob_bytes() == toc  # listing and stat fetch nothing
            assert (mnt / "data" / "f7").read_bytes() == _file(img, "1", "data/f7")
            assert 40960 <= proxy.blob_bytes() - toc < 41_500  # that file's frames and nothing else
            assert (mnt / "data" / "f7").read_bytes() == _file(img, "1", "data/f7")
            (mnt / "data" / "f8").write_bytes(b"changed")  # a copy-up of a file not fetched yet
            assert (mnt / "data" / "f8").read_bytes() == b"changed"
            assert _missing(store, ref) == 58
        finally:
            um("umount", mnt)
        assert um("store", "--root", store, "check").returncode == 0
        # layers stored by the lazy pull are what a full pull reads, missing files and all
        before = proxy.blob_bytes()
        _pull(store, ref)
        assert _missing(store, ref) == 0 and proxy.blob_bytes() - before > 57 * 40960
        size = sum(la["size"] for la in _layers(reg, digest))
        assert proxy.blob_bytes() < 1.1 * size  # each byte came once
        with image_mount(store, ref, "c2", mnt):
            assert (mnt / "data" / "f60").read_bytes() == _file(img, "1", "data/f60")
        # save of an image pulled lazily writes it whole
        assert um("image", "--root", store, "pull", "--lazy", f"{proxy.host}/app:1").returncode == 0
        assert um("store", "--root", store, "check").returncode == 0


def test_a_lazy_mount_fetches_the_rest_in_the_background_and_survives_kill(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    img = _versions(tmp_path)
    with served(tmp_path) as (reg, proxy):
        reg.push(f"oci:{img}:1", "app:1", *CHUNKED)
        ref = f"{proxy.host}/app:1"
        assert um("image", "--root", store, "pull", "--lazy", ref).returncode == 0
        assert _missing(store, ref) == 60
        # a daemon killed while it fetches: what it stored is kept, consistently; the next mount goes on
        r = um("mount", "--root", store, "--image", ref, "--name", "c", mnt)
        assert r.returncode == 0, r.stderr
        pid = daemon_pid(mnt)
        os.kill(pid, signal.SIGKILL)
        force_unmount(mnt)
        assert um("store", "--root", store, "check").returncode == 0
        r = um("mount", "--root", store, "--image", ref, "--name", "c", mnt)
        assert r.returncode == 0, r.stderr
        try:
            deadline = time.monotonic() + 60
            while _missing(store, ref) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _missing(store, ref) == 0
            assert (mnt / "data" / "f1").read_bytes() == _file(img, "1", "data/f1")
        finally:
            um("umount", mnt)
        assert um("store", "--root", store, "check").returncode == 0
        # gone with the image: gc leaves a consistent, empty store
        assert um("container", "--root", store, "rm", "c").returncode == 0
        assert um("image", "--root", store, "rm", ref).returncode == 0
        assert um("store", "--root", store, "gc").returncode == 0
        assert um("store", "--root", store, "check").returncode == 0
        assert not [p for p in (store / "blobs").rglob("*") if p.is_file()]


def test_a_lazy_mount_without_its_registry_fails_reads_not_the_mount(tmp_path: Path) -> None:
    """With the registry gone, files already fetched read; a missing one fails with EIO (and a log line
    naming it), at once, and the mount goes on."""
    store, mnt, log = tmp_path / "store", tmp_path / "mnt", tmp_path / "log"
    mnt.mkdir()
    img = _versions(tmp_path)
    with served(tmp_path) as (reg, proxy):
        reg.push(f"oci:{img}:1", "app:1", *CHUNKED)
        ref = f"{proxy.host}/app:1"
        assert um("image", "--root", store, "pull", "--lazy", ref).returncode == 0
        args = ["mount", "--root", store, "--image", ref, "--pull", "never", "--no-prefetch", "--log", log, mnt]
        r = um(*args)
        assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "data" / "f2").stat().st_size == 40960
        start = time.monotonic()
        try:
            (mnt / "data" / "f2").read_bytes()
            raise AssertionError("a file that cannot be fetched was read")
        except OSError as e:
            assert e.errno == errno.EIO
        assert time.monotonic() - start < 60
        assert "data/f2" in log.read_text() and "cannot fetch" in log.read_text()
        assert sorted(os.listdir(mnt / "data"))[:2] == ["f1", "f10"]
    finally:
        um("umount", mnt)
    # what needs every file (save, push) says in one line that it cannot have them
    _one_line_error(um("image", "--root", store, "save", ref, f"oci:{tmp_path / 'out'}:x"), "cannot fetch")


def _stargz(img: Path, tags: list[str], chunk: int, min_chunk: int = 0) -> Path:
    """The OCI layout ``img`` with an eStargz version of each of ``tags`` (tagged ``sgz-TAG``), in place."""
    for tag in tags:
        estargz.convert(img, tag, f"sgz-{tag}", chunk, min_chunk)
    return img


def test_estargz_images_pull_by_toc_and_mount_as_they_are(image: Path, tmp_path: Path) -> None:
    """An eStargz image (its layers also plain gzip tars) is taken by its TOCs, in ranges; its tree is the image's,
    without the TOC's landmark files; pushed on, it keeps its blobs; and it reads whole from a registry that
    ignores ``Range``."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    layout = _stargz(Path(shutil.copytree(image / "img", tmp_path / "img")), ["t"], 64 << 10)
    with served(tmp_path) as (reg, proxy):
        digest = reg.push(f"oci:{layout}:sgz-t", "app:1")
        assert all(estargz.ANNOTATION in la.get("annotations", {}) for la in _layers(reg, digest))
        ref = f"{proxy.host}/app:1"
        _pull(store, ref)
        layers = {la["digest"] for la in _layers(reg, digest)}
        assert all(r is not None for p, r, _ in proxy.gets if p.rsplit("/", 1)[-1] in layers)  # parts only
        info = json.loads(um("image", "--root", store, "inspect", ref).stdout)
        assert all(la.startswith("sgz:") for la in info["Layers"]), info["Layers"]
        with image_mount(store, ref, "c1", mnt):
            assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")
        assert um("store", "--root", store, "check").returncode == 0
        _pull(store, f"{reg.host}/app:1")  # (the proxy takes no uploads: the registry's own name, a pull of nothing)
        r = um("image", "--root", store, "push", f"{reg.host}/app:1", f"{reg.host}/team/app:2")
        assert r.returncode == 0 and f"(0 of {len(layers) + 1} blobs uploaded" in r.stdout, r.stdout + r.stderr
        # the same image from a registry that sends whole blobs only
        whole = BlobProxy(reg.host, ranges=False)
        try:
            _pull(tmp_path / "whole", f"{whole.host}/app:1")
            with image_mount(tmp_path / "whole", f"{whole.host}/app:1", "c2", mnt):
                assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")
        finally:
            whole.close()


def test_estargz_files_packed_in_one_member_pull_and_read_lazily(image: Path, tmp_path: Path) -> None:
    """An eStargz image whose small files share members (``--estargz-min-chunk-size``, ``innerOffset``): pulled
    by its TOCs it is the image's tree; mounted lazily, each file reads right as it is first read."""
    store, lazy, mnt = tmp_path / "store", tmp_path / "lazy", tmp_path / "mnt"
    mnt.mkdir()
    layout = _stargz(Path(shutil.copytree(image / "img", tmp_path / "img")), ["t"], 64 << 10, 8 << 10)
    with served(tmp_path) as (reg, proxy):
        digest = reg.push(f"oci:{layout}:sgz-t", "app:1")
        tocs = [reg.blob_file(la["digest"]).read_bytes() for la in _layers(reg, digest)]
        assert any(b'"innerOffset"' in gzip.decompress(t) for t in tocs)  # (the TOCs are gzip tar entries too)
        ref = f"{proxy.host}/app:1"
        _pull(store, ref)
        with image_mount(store, ref, "c1", mnt):
            assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")
        assert um("store", "--root", store, "check").returncode == 0
        with lazy_mount(lazy, ref, mnt, "--image-volumes", "ignore"):
            assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")  # (every file read, each fetched on its own)
        _pull(lazy, ref)  # (and what the mount did not read: files of lower layers that upper ones replace)
        assert _missing(lazy, ref) == 0 and um("store", "--root", lazy, "check").returncode == 0


def test_estargz_lazy_mounts_and_partial_pulls(tmp_path: Path) -> None:
    """A lazy mount fetches a file's members when it is read (three chunks of one file here); a second version
    fetches only its new files; damaged bytes and a lying annotation are refused in one line."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    img = _stargz(_versions(tmp_path), ["1", "2"], 16 << 10)
    with served(tmp_path) as (reg, proxy):
        reg.push(f"oci:{img}:sgz-1", "app:1")
        d2 = reg.push(f"oci:{img}:sgz-2", "app:2")
        ref = f"{proxy.host}/app:1"
        with lazy_mount(store, ref, mnt):
            toc = proxy.blob_bytes()
            assert sorted(os.listdir(mnt / "data")) == sorted(f"f{i}" for i in range(1, 61))
            assert all((mnt / "data" / f"f{i}").stat().st_size == 40960 for i in range(1, 61))
            assert proxy.blob_bytes() == toc  # listing and stat fetch nothing
            assert (mnt / "data" / "f7").read_bytes() == _file(img, "1", "data/f7")
            assert 40960 <= proxy.blob_bytes() - toc < 42_000  # its members, the next header, nothing else
            assert not (mnt / ".no.prefetch.landmark").exists()
        assert _missing(store, ref) == 59
        _pull(store, ref)  # completes the lazy pull
        assert _missing(store, ref) == 0
        before = proxy.blob_bytes()
        _pull(store, f"{proxy.host}/app:2")
        fetched = proxy.blob_bytes() - before
        size = sum(la["size"] for la in _layers(reg, d2))
        assert 4 * 40960 <= fetched <= 0.15 * size, (fetched, size)
        with image_mount(store, f"{proxy.host}/app:2", "c2", mnt):
            for name in ("f7", "new", "f8"):
                assert (mnt / "data" / name).read_bytes() == _file(img, "2", f"data/{name}")
        assert um("store", "--root", store, "check").returncode == 0

        # damaged: a byte of a file's members, then a manifest whose annotation is not its TOC's digest
        fresh = tmp_path / "fresh"
        _refused_when_damaged(reg, d2, fresh, f"{proxy.host}/app:2")
        manifest = json.loads(reg.blob_file(d2).read_bytes())
        manifest["layers"][-1]["annotations"][estargz.ANNOTATION] = "sha256:" + "0" * 64
        put = httpx.put(f"http://{reg.host}/v2/app/manifests/lying", content=json.dumps(manifest),
                        headers={"Content-Type": MANIFEST})  # fmt: skip
        assert put.status_code == 201, put.text
        _one_line_error(um("image", "--root", fresh, "pull", f"{proxy.host}/app:lying"), "does not match its digest")


def test_a_push_writes_zstd_chunked_layers(image: Path, tmp_path: Path) -> None:
    """``push --compression zstd:chunked``: layers podman pulls (checking each diff_id) and skopeo copies, that
    unionmount pulls lazily by their TOCs, the same tree; a gzip blob pulled is not reused for it."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    with served(tmp_path) as (reg, proxy):
        reg.push(f"oci:{image}/img:t", "gz:1")
        img = _versions(tmp_path)
        reg.push(f"oci:{img}:1", "v:1")
        pushed = {}
        for name in ("gz", "v"):
            _pull(store, f"{reg.host}/{name}:1")
            r = um("image", "--root", store, "push", "--compression", "zstd:chunked",
                   f"{reg.host}/{name}:1", f"{reg.host}/ch-{name}:1")  # fmt: skip
            assert r.returncode == 0 and "(0 of" not in r.stdout, r.stdout + r.stderr
            pushed[name] = r.stdout.split()[1]
            for la in _layers(reg, pushed[name]):
                assert la["mediaType"].endswith("+zstd") and "io.containers.zstd-chunked.manifest-checksum" in la[
                    "annotations"], la  # fmt: skip
        fresh = tmp_path / "fresh"
        with lazy_mount(fresh, f"{proxy.host}/ch-gz:1", mnt, "--image-volumes", "ignore"):
            assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")
        info = json.loads(um("image", "--root", fresh, "inspect", f"{proxy.host}/ch-gz:1").stdout)
        assert all(la.startswith("toc:") for la in info["Layers"]), info["Layers"]
        # pushed again as zstd:chunked from the store that pushed it: its own blobs, nothing written again
        _pull(store, f"{reg.host}/ch-v:1")
        r = um("image", "--root", store, "push", "--compression", "zstd:chunked", f"{reg.host}/ch-v:1",
               f"{reg.host}/again:1")  # fmt: skip
        assert r.returncode == 0 and "(0 of" in r.stdout, r.stdout + r.stderr
        sh(f"skopeo copy --src-tls-verify=false docker://{reg.host}/ch-v:1 oci:{tmp_path}/out:x", tmp_path)
        # podman pulls it whole (checking the diff_ids), and file by file by its TOC (partial pulls on)
        for driver, partial in (("vfs", False), ("overlay", True)):
            log = _podman_export(tmp_path / driver, driver, partial, f"{reg.host}/ch-v:1", tmp_path / "x.tar")
            f7 = subprocess.run(["tar", "-xOf", tmp_path / "x.tar", "data/f7"], capture_output=True, check=True)
            assert f7.stdout == _file(img, "1", "data/f7")
            assert ("Retrieved partial blob" in log) == partial, log[-2000:]


def _podman_export(base: Path, driver: str, partial: bool, ref: str, out: Path) -> str:
    """podman (its own storage under ``base``) pulls ``ref`` and exports a container of it to ``out``; returns
    the pull's debug log."""
    base.mkdir()
    runroot = tempfile.mkdtemp(prefix="pdr.")  # podman wants a short runroot path
    conf = base / "storage.conf"
    options = '[storage.options]\npull_options = {enable_partial_images = "true"}\n' if partial else ""
    conf.write_text(f'[storage]\ndriver = "{driver}"\ngraphroot = "{base}/g"\nrunroot = "{runroot}"\n{options}')
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}
    try:
        r = subprocess.run(["podman", "--log-level", "debug", "pull", "--tls-verify=false", ref],
                           capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        subprocess.run(["podman", "create", "--name", "x", ref, "true"], check=True, capture_output=True, env=env)
        with out.open("wb") as f:
            subprocess.run(["podman", "export", "x"], stdout=f, check=True, timeout=300, env=env)
        return r.stderr
    finally:
        subprocess.run(["podman", "rm", "-a", "-f"], capture_output=True, env=env)
        subprocess.run(["podman", "rmi", "-a", "-f"], capture_output=True, env=env)
        shutil.rmtree(runroot, ignore_errors=True)
