"""Pulling from and pushing to a real registry (distribution's ``docker-registry``); skopeo is the other side.

Covers what ``docker pull`` users rely on: tags and digests, multi-platform indexes,
the three ways registries ask for a login (htpasswd, TLS with a private CA, tokens),
layers the store already has never downloaded again, and a registry that serves
damaged content refused with one line and nothing recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .images import image_mount, sh, um
from .mounts import COMMAND
from .registry import PASSWORD, USER, CuttingProxy, auth_file, registry
from .tree import snapshot, view


def _one_line_error(r, needle: str) -> None:  # noqa: ANN001
    assert r.returncode != 0 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def _images(store: Path) -> list[str]:
    r = um("image", "--root", store, "ls", "--format", "json")
    return sorted(i["Name"] for i in json.loads(r.stdout)) if r.returncode == 0 else []


def test_pull_by_tag_and_digest_then_mount(image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    with registry(tmp_path / "reg") as reg:
        digest = reg.push(f"oci:{image}/img:t", "team/app:1")
        r = um("image", "--root", store, "pull", f"{reg.host}/team/app:1")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{reg.host}/team/app:1 ")
        info = json.loads(um("image", "--root", store, "inspect", f"{reg.host}/team/app:1").stdout)
        assert info["Manifest"] == digest and len(info["Layers"]) == 3 and info["Volumes"] == {"/data": {}}
        with image_mount(store, f"{reg.host}/team/app:1", "c1", mnt):
            assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")

        # skopeo's transport syntax and a digest reference give the same image
        r = um("image", "--root", store, "import", f"docker://{reg.host}/team/app@{digest}", "--tag", "pinned:1")
        assert r.returncode == 0, r.stderr
        pinned = json.loads(um("image", "--root", store, "inspect", "pinned:1").stdout)
        assert pinned["Id"] == info["Id"]
        # the digest it was pulled by names it from now on, as Docker's RepoDigests
        assert pinned["RepoDigests"] == [f"{reg.host}/team/app@{digest}"]
        by_digest = json.loads(um("image", "--root", store, "inspect", f"{reg.host}/team/app@{digest}").stdout)
        assert by_digest["Id"] == info["Id"]
        with image_mount(store, f"{reg.host}/team/app@{digest}", "c-pinned", mnt):  # (--pull never would do)
            assert (mnt / "etc" / "motd").exists()

        # the store has every layer: a new tag pulls with the registry's layer blobs gone
        reg.push(f"oci:{image}/img:t", "team/app:2")  # the same manifest under another tag
        manifest = json.loads(reg.blob_file(digest).read_bytes())
        for layer in manifest["layers"]:
            reg.blob_file(layer["digest"]).unlink()
        r = um("image", "--root", store, "pull", f"{reg.host}/team/app:2")
        assert r.returncode == 0, r.stderr
        # a fresh store needs them, and says what is missing
        r = um("image", "--root", tmp_path / "fresh", "pull", f"{reg.host}/team/app:2")
        _one_line_error(r, f"{reg.host}/team/app@sha256:")
        assert _images(tmp_path / "fresh") == []


def test_pull_refuses_what_the_registry_damaged(image: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    with registry(tmp_path / "reg") as reg:
        digest = reg.push(f"oci:{image}/img:t", "app:1")
        manifest = json.loads(reg.blob_file(digest).read_bytes())
        biggest = max(manifest["layers"], key=lambda b: b["size"])["digest"]
        victim = reg.blob_file(biggest)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        r = um("image", "--root", store, "pull", f"{reg.host}/app:1")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "corrupt" in r.stderr or "cannot read layer" in r.stderr, r.stderr
        assert _images(store) == []
        assert not [p for p in (store / "blobs").rglob("*") if p.is_file()], "a refused pull left blobs"
        assert um("store", "--root", store, "check").returncode == 0

        # a manifest that understates a layer's size (the registry takes it): the download stops there
        lying = json.loads(reg.blob_file(digest).read_bytes())
        big = max(lying["layers"], key=lambda b: b["size"])
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))  # the layer is sound again: only its size is wrong
        big["size"] = 1000
        mt = lying.get("mediaType", "application/vnd.oci.image.manifest.v1+json")
        put = httpx.put(f"http://{reg.host}/v2/app/manifests/small", content=json.dumps(lying),
                        headers={"Content-Type": mt})  # fmt: skip
        assert put.status_code == 201, put.text
        _one_line_error(um("image", "--root", store, "pull", f"{reg.host}/app:small"), "longer than the 1000 bytes")
        # a manifest changed under its digest
        raw = reg.blob_file(digest)
        raw.write_bytes(raw.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion": 2'))
        _one_line_error(um("image", "--root", store, "pull", f"{reg.host}/app:1"), "does not match its digest")
        _one_line_error(um("image", "--root", store, "pull", f"{reg.host}/app@{digest}"), "does not match its digest")
        assert _images(store) == []


def _multi_platform_layout(base: Path) -> Path:
    """An OCI layout whose ``multi`` is an index of a linux/amd64 and a linux/arm64/v8 image."""
    sh(
        """
        umoci init --layout l
        umoci new --image l:amd
        umoci unpack --image l:amd b; echo amd64 > b/rootfs/arch; umoci repack --image l:amd b; rm -rf b
        umoci new --image l:arm
        umoci unpack --image l:arm b; echo arm64 > b/rootfs/arch; umoci repack --image l:arm b; rm -rf b
        umoci config --image l:arm --architecture arm64
        """,
        base,
    )
    layout = base / "l"
    index = json.loads((layout / "index.json").read_text())
    entries = []
    for m in index["manifests"]:
        ref = m["annotations"]["org.opencontainers.image.ref.name"]
        platform = {"os": "linux", "architecture": "amd64"} if ref == "amd" else {
            "os": "linux", "architecture": "arm64", "variant": "v8"}  # fmt: skip
        entries.append({k: m[k] for k in ("mediaType", "digest", "size")} | {"platform": platform})
    blob = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": entries}).encode()  # fmt: skip
    digest = hashlib.sha256(blob).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(blob)
    ref = {"org.opencontainers.image.ref.name": "multi"}
    index["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": f"sha256:{digest}",
                               "size": len(blob), "annotations": ref})  # fmt: skip
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def test_multi_platform_index(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    layout = _multi_platform_layout(tmp_path)
    with registry(tmp_path / "reg") as reg:
        reg.push(f"oci:{layout}:multi", "multi:1", "--all")
        assert um("image", "--root", store, "pull", f"{reg.host}/multi:1").returncode == 0
        with image_mount(store, f"{reg.host}/multi:1", "c1", mnt):
            assert (mnt / "arch").read_text() == "amd64\n"  # this machine's
        r = um("image", "--root", store, "pull", "--platform", "linux/arm64", f"{reg.host}/multi:1", "--tag", "m:arm")
        assert r.returncode == 0, r.stderr
        arm = json.loads(um("image", "--root", store, "inspect", "m:arm").stdout)
        assert arm["Config"]["architecture"] == "arm64"
        index = json.loads(um("image", "--root", store, "inspect", f"{reg.host}/multi:1").stdout)["RepoDigests"]
        assert arm["RepoDigests"] == index and arm["Manifest"] not in index[0]  # the index's digest, as Docker
        _one_line_error(
            um("image", "--root", store, "pull", "--platform", "linux/s390x", f"{reg.host}/multi:1"),
            "no linux/s390x image in the index (it has: linux/amd64, linux/arm64/v8)",
        )
        # a single-platform image is checked against --platform too, as docker pull does
        reg.push(f"oci:{layout}:amd", "amd:1")
        _one_line_error(
            um("image", "--root", store, "pull", "--platform", "linux/arm64", f"{reg.host}/amd:1"),
            "the image is for linux/amd64, not linux/arm64",
        )
        # the same index read from the layout directly
        r = um("image", "--root", store, "import", "--platform", "linux/arm64/v8", f"oci:{layout}:multi", "--tag", "a")
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("auth", ["htpasswd", "token"])
def test_logins(auth: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    layout = _multi_platform_layout(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no auth file of this machine's user
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    with registry(tmp_path / "reg", auth) as reg:
        reg.push(f"oci:{layout}:amd", "app:1")
        ref = f"{reg.host}/app:1"
        if auth == "htpasswd":
            _one_line_error(um("image", "--root", store, "pull", ref), "wants a login: pass --creds")
        else:
            _one_line_error(um("image", "--root", store, "pull", ref), "token service")
        _one_line_error(um("image", "--root", store, "pull", "--creds", f"{USER}:wrong", ref), "check the credentials")
        assert _images(store) == []
        r = um("image", "--root", store, "pull", "--creds", f"{USER}:{PASSWORD}", ref)
        assert r.returncode == 0, r.stderr
        # podman login's file, found where podman keeps it
        auth_dir = tmp_path / "home" / ".config" / "containers"
        auth_dir.mkdir(parents=True)
        auth_file(auth_dir / "auth.json", reg.host)
        assert um("image", "--root", store, "pull", ref, "--tag", "via-file:1").returncode == 0
        # docker's credential helpers (credHelpers for the host, else credsStore), found on $PATH
        (auth_dir / "auth.json").unlink()
        bin_dir, docker_dir = tmp_path / "bin", tmp_path / "home" / ".docker"
        bin_dir.mkdir()
        docker_dir.mkdir()
        helper = bin_dir / "docker-credential-test"
        helper.write_text(
            f'#!/bin/sh\nread host; [ "$host" = {reg.host} ] || exit 1\n'
            f'echo \'{{"ServerURL": "{reg.host}", "Username": "{USER}", "Secret": "{PASSWORD}"}}\'\n'
        )
        helper.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        for config in ({"credHelpers": {reg.host: "test"}}, {"credsStore": "test"}):
            (docker_dir / "config.json").write_text(json.dumps(config))
            r = um("image", "--root", store, "pull", ref, "--tag", "via-helper:1")
            assert r.returncode == 0, r.stderr
        (docker_dir / "config.json").write_text(json.dumps({"credHelpers": {reg.host: "missing"}}))
        _one_line_error(um("image", "--root", store, "pull", ref), "wants a login" if auth == "htpasswd" else "token")
        if reg.tokens is not None:  # the token service saw the password, the registry only tokens
            assert any(c.startswith("Basic ") for c in reg.tokens.calls)
    assert _images(store) == [f"{reg.host}/app:1", "via-file:1", "via-helper:1"]


def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    store = tmp_path / "store"
    layout = _multi_platform_layout(tmp_path)
    with registry(tmp_path / "reg", "tls") as reg:
        assert reg.certs is not None
        reg.push(f"oci:{layout}:amd", "app:1")
        ref = f"{reg.host}/app:1"
        _one_line_error(um("image", "--root", store, "pull", ref), "certificate verify failed")
        assert um("image", "--root", store, "pull", "--cert-dir", reg.certs, ref).returncode == 0
        r = um("image", "--root", store, "pull", "--tls-verify=false", ref, "--tag", "insecure:1")
        assert r.returncode == 0, r.stderr


def test_bad_references_and_unreachable_registries(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for args, needle in (
        (("pull", "Bad Name"), "is not an image reference"),
        (("pull", "app@sha256:123"), "a digest is sha256: and 64"),
        (("pull", "127.0.0.1:1/app:1"), "cannot reach registry 127.0.0.1:1"),
        (("pull", "--platform", "amd64", "app"), "is not OS/ARCH"),
        (("pull", "--tls-verify=maybe", "app"), "is not true or false"),
        (("import", "docker://127.0.0.1:1/app"), "cannot reach registry"),
    ):
        _one_line_error(um("image", "--root", store, *args), needle)
    with registry(tmp_path / "reg") as reg:
        _one_line_error(um("image", "--root", store, "pull", f"{reg.host}/nothere:1"), "nothere:1: not found")
    assert _images(store) == []


def test_reference_normalisation() -> None:
    from layerstore.registry import parse_reference

    for text, want in (
        ("alpine", ("docker.io", "library/alpine", "latest", None)),
        ("docker.io/library/alpine:3", ("docker.io", "library/alpine", "3", None)),
        ("me/tool", ("docker.io", "me/tool", "latest", None)),
        ("localhost/app", ("localhost", "app", "latest", None)),
        ("localhost:5000/a/b:v1", ("localhost:5000", "a/b", "v1", None)),
        ("quay.io/x/y@sha256:" + "a" * 64, ("quay.io", "x/y", None, "sha256:" + "a" * 64)),
        ("ghcr.io/o/r:t@sha256:" + "b" * 64, ("ghcr.io", "o/r", "t", "sha256:" + "b" * 64)),
    ):
        r = parse_reference(text)
        assert (r.host, r.repo, r.tag, r.digest) == want, text


@pytest.mark.parametrize("auth", ["htpasswd", "token"])
def test_commit_push_and_pull_back(auth: str, image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert um("image", "--root", store, "import", f"oci:{image}/img:t", "--tag", "base").returncode == 0
    with image_mount(store, "base", "c1", mnt):
        (mnt / "etc" / "motd").write_text("changed\n")
        (mnt / "new").mkdir()
        (mnt / "new" / "file").write_bytes(b"x" * 100_000)
        (mnt / "d" / "keep").unlink()
        seen = view(mnt)
    assert um("commit", "--root", store, "c1", "--tag", "app:2").returncode == 0
    with registry(tmp_path / "reg", auth) as reg:
        creds = ["--creds", f"{USER}:{PASSWORD}"]
        login = "wants a login" if auth == "htpasswd" else "token service"
        _one_line_error(um("image", "--root", store, "push", "app:2", f"{reg.host}/app:2"), login)
        r = um("image", "--root", store, "push", "app:2", f"{reg.host}/team/app:2", *creds)
        assert r.returncode == 0, r.stderr
        assert "(5 of 5 blobs uploaded" in r.stdout, r.stdout  # four layers and the config
        digest = r.stdout.split()[1]
        # skopeo reads it back, umoci unpacks what the container showed
        out = tmp_path / "out"
        sh(f"skopeo copy --src-tls-verify=false --src-creds {USER}:{PASSWORD} "
           f"docker://{reg.host}/team/app:2 oci:{out}:x --digestfile {tmp_path}/d && umoci unpack --image {out}:x u",
           tmp_path)  # fmt: skip
        assert (tmp_path / "d").read_text().strip() == digest
        assert view(tmp_path / "u" / "rootfs") == seen
        # pushed again (another tag): the registry has every blob, the layers are byte-identical
        r = um("image", "--root", store, "push", "app:2", f"{reg.host}/team/app:again", *creds)
        assert r.returncode == 0 and "(0 of 5 blobs uploaded" in r.stdout, r.stdout + r.stderr
        assert r.stdout.split()[1] == digest
        # and a fresh store pulls it, mounted it is the container's tree
        fresh = tmp_path / "fresh"
        assert um("image", "--root", fresh, "pull", f"{reg.host}/team/app:2", *creds).returncode == 0
        with image_mount(fresh, f"{reg.host}/team/app:2", "c2", mnt):
            assert view(mnt) == seen
        # an upload the network breaks is started over
        proxy = CuttingProxy(reg.host, cut_after=200_000, cuts=2, upstream=True)
        try:
            r = um("image", "--root", store, "push", "app:2", f"{proxy.host}/team/flaky:1", *creds)
            assert r.returncode == 0, r.stderr
            assert proxy.cut == 2
        finally:
            proxy.close()
        # push's default destination is the image's own name
        assert um("image", "--root", store, "tag", "app:2", f"{reg.host}/mine:1").returncode == 0
        r = um("image", "--root", store, "push", f"{reg.host}/mine:1", *creds)
        assert r.returncode == 0 and r.stdout.startswith(f"{reg.host}/mine:1 "), r.stdout + r.stderr
        _one_line_error(
            um("image", "--root", store, "push", "app:2", f"{reg.host}/app@sha256:{'a' * 64}", *creds),
            "push to a tag, not a digest",
        )
        _one_line_error(um("image", "--root", store, "push", "nope:1", f"{reg.host}/x:1"), "no image 'nope:1'")


def test_mount_pulls_a_missing_image(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    layout = _multi_platform_layout(tmp_path)
    with registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/app:1"
        reg.push(f"oci:{layout}:amd", "app:1")
        args = ("mount", "--root", store, "--image", ref, "--image-volumes", "ignore")
        r = um(*args, "--name", "c1", mnt)  # --pull missing, as docker run
        assert r.returncode == 0 and f"pulled {ref} " in r.stderr, r.stderr
        try:
            assert (mnt / "arch").read_text() == "amd64\n"
        finally:
            assert um("umount", mnt).returncode == 0
        # --pull always follows a tag that moved
        reg.push(f"oci:{layout}:arm", "app:1")
        r = um(*args, "--name", "c2", "--pull", "always", mnt)
        assert r.returncode == 0, r.stderr
        try:
            assert (mnt / "arch").read_text() == "arm64\n"
        finally:
            assert um("umount", mnt).returncode == 0
        reg.push(f"oci:{layout}:amd", "other:1")
        _one_line_error(um("mount", "--root", store, "--image", f"{reg.host}/other:1", "--pull", "never", mnt),
                        f"no image '{reg.host}/other:1' in the store")  # fmt: skip
        _one_line_error(
            um("mount", "--root", store, "--image", f"{reg.host}/no:1", mnt),
            f"no image '{reg.host}/no:1' in the store, and pulling it failed: {reg.host}/no:1: not found",
        )


def test_broken_downloads_resume(image: Path, tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    with registry(tmp_path / "reg") as reg:
        reg.push(f"oci:{image}/img:t", "app:1")
        proxy = CuttingProxy(reg.host, cut_after=64 * 1024, cuts=2)  # in the middle of the largest layer
        try:
            r = um("image", "--root", store, "pull", f"{proxy.host}/app:1")
            assert r.returncode == 0, r.stderr
            assert proxy.cut == 2
            with image_mount(store, f"{proxy.host}/app:1", "c1", mnt):
                assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")
        finally:
            proxy.close()
        # layers are fetched several at a time, each through its own connection (as docker pull does)
        proxy = CuttingProxy(reg.host, rate=2_000_000)
        try:
            r = um("image", "--root", tmp_path / "s3", "pull", f"{proxy.host}/app:1")
            assert r.returncode == 0, r.stderr
            assert proxy.max_active >= 2, proxy.max_active  # (one layer at a time would use one connection)
        finally:
            proxy.close()
        assert not list((tmp_path / "s3" / "tmp").iterdir()), "downloads left behind"
        # a network that keeps breaking: given up after a few tries, one line, nothing kept
        proxy = CuttingProxy(reg.host, cut_after=64 * 1024, cuts=100)
        try:
            r = um("image", "--root", tmp_path / "s2", "pull", f"{proxy.host}/app:1")
        finally:
            proxy.close()
        _one_line_error(r, "broke off")
        assert _images(tmp_path / "s2") == []


def test_registries_conf_mirrors_insecure_and_blocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    layout = _multi_platform_layout(tmp_path)
    conf = tmp_path / "registries.conf"
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    with (
        registry(tmp_path / "mirror") as mirror,
        registry(tmp_path / "origin") as origin,
        registry(tmp_path / "tls", "tls") as tls,
    ):
        mirror.push(f"oci:{layout}:arm", "team/both:1")  # the mirror's copy differs: we can tell who answered
        origin.push(f"oci:{layout}:amd", "team/both:1")
        origin.push(f"oci:{layout}:amd", "team/origin-only:1")
        tls.push(f"oci:{layout}:amd", "app:1")
        conf.write_text(f"""
[[registry]]
prefix = "example.test/team"
location = "{origin.host}/team"
[[registry.mirror]]
location = "{mirror.host}/team"

[[registry]]
location = "{tls.host}"
insecure = true

[[registry]]
prefix = "blocked.test"
blocked = true
""")
        ok = um("image", "--root", store, "pull", "--platform", "linux/arm64", "example.test/team/both:1")
        assert ok.returncode == 0, ok.stderr  # from the mirror (the origin has only amd64 there)
        # the mirror lacks it: the origin answers; the image keeps the name it was asked by
        r = um("image", "--root", store, "pull", "example.test/team/origin-only:1")
        assert r.returncode == 0, r.stderr
        assert "example.test/team/origin-only:1" in _images(store)
        # insecure = true: a self-signed registry without --tls-verify=false
        assert um("image", "--root", store, "pull", f"{tls.host}/app:1").returncode == 0
        _one_line_error(um("image", "--root", store, "pull", "blocked.test/x:1"), "is blocked by registries.conf")
        _one_line_error(um("image", "--root", store, "pull", "example.test/team/nowhere:1"),
                        "team/nowhere:1: not found (and mirrors:")  # fmt: skip
        # a push goes to the rewritten location, never to a mirror
        assert um("image", "--root", store, "push", "example.test/team/origin-only:1",
                  "example.test/team/pushed:1").returncode == 0  # fmt: skip
        assert um("image", "--root", tmp_path / "s2", "pull", f"{origin.host}/team/pushed:1").returncode == 0
        conf.write_text("[[registry]\nbroken")
        _one_line_error(um("image", "--root", store, "pull", "example.test/team/both:1"), "cannot read")


def test_kill_during_pull_then_pull_again(image: Path, tmp_path: Path) -> None:
    """kill -9 in the middle of a (slow) pull: the store stays consistent, the next pull completes and
    sweeps the dead pull's downloads."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    with registry(tmp_path / "reg") as reg:
        reg.push(f"oci:{image}/img:t", "app:1")
        proxy = CuttingProxy(reg.host, rate=200_000)
        try:
            proc = subprocess.Popen([*COMMAND, "image", "--root", str(store), "pull", f"{proxy.host}/app:1"],
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            for _ in range(200):  # until the downloads are under way
                if (store / "tmp").is_dir() and any(p.stat().st_size for p in (store / "tmp").iterdir()):
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the pull never started downloading")
            proc.kill()
            proc.wait()
        finally:
            proxy.close()
        assert any((store / "tmp").iterdir())  # the dead pull's files are there...
        assert um("store", "--root", store, "check").returncode == 0
        assert _images(store) == []
        r = um("image", "--root", store, "pull", f"{reg.host}/app:1")
        assert r.returncode == 0, r.stderr
        assert not list((store / "tmp").iterdir())  # ...and swept by the next one
        with image_mount(store, f"{reg.host}/app:1", "c1", mnt):
            assert snapshot(mnt) == snapshot(image / "ref" / "rootfs")
