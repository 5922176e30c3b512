"""The bodies of ``unionmount volume create|ls|inspect|rm|prune`` (Docker's volume commands)."""

from __future__ import annotations

import json
import sys
import time

from layerstore import volumes as vols
from layerstore.store import StoreError
from unionfs.daemon.config import UsageError
from unionfs.daemon.store import open_store


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise UsageError(f"{what} '{item}' is not KEY=VALUE")
        out[k] = v
    return out


def create(root: str | None, name: str | None, driver: str, opts: list[str], labels: list[str]) -> int:
    with open_store(root, create=True) as store:
        vol, _ = vols.create(store, name, driver, _pairs(opts, "option"), _pairs(labels, "label"))
    print(vol.name)
    return 0


def _describe(store, v: vols.Volume) -> dict:  # type: ignore[no-untyped-def,type-arg]  # noqa: ANN001
    d = {
        "Name": v.name,
        "Driver": v.driver,
        "Mountpoint": v.mountpoint,
        "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.created)),
        "Labels": v.labels,
        "Options": v.options,
        "Scope": "local",
        "Anonymous": v.anonymous,
        "UsedBy": vols.users(store, v.name),
    }
    if v.driver != "local":  # what the plugin says of it: where it is mounted, its status, its scope
        try:
            with vols.plugin(v.driver) as p:
                info = p.get(v.name) or {}
                d["Mountpoint"] = info.get("Mountpoint") or ""
                d["Status"] = info.get("Status") or {}
                d["Scope"] = p.scope()
        except StoreError as e:
            d["Status"] = {"Error": str(e)}
    return d


def _plugin_only(store, known: set[str]) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]  # noqa: ANN001
    """The volumes of the plugins this store uses that the store does not record (made by another host)."""
    out = []
    for driver in sorted({v.driver for v in vols.all_volumes(store)} - {"local"}):
        try:
            with vols.plugin(driver) as p:
                listed = p.list()
        except StoreError as e:
            print(f"unionmount: warning: {e}", file=sys.stderr)
            continue
        for v in listed:
            if v["Name"] not in known:
                out.append({"Name": v["Name"], "Driver": driver, "Mountpoint": v.get("Mountpoint") or "",
                            "Status": v.get("Status") or {}, "UsedBy": [], "InStore": False})  # fmt: skip
    return out


def ls(root: str | None, fmt: str, quiet: bool) -> int:
    with open_store(root, create=True) as store:
        vols.sweep(store)  # what dead daemons left mounted
        rows = [_describe(store, v) for v in vols.all_volumes(store)]
        rows += _plugin_only(store, {r["Name"] for r in rows})
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif quiet:
        for r in rows:
            print(r["Name"])
    else:
        width = max([8] + [len(r["Driver"]) for r in rows])
        print(f"{'DRIVER':<{width}} {'VOLUME NAME':<66} USED BY")
        for r in rows:
            print(f"{r['Driver']:<{width}} {r['Name']:<66} {','.join(r['UsedBy']) or '-'}")
    return 0


def inspect(root: str | None, names: list[str]) -> int:
    with open_store(root) as store:
        print(json.dumps([_describe(store, vols.get(store, n)) for n in names], indent=2))
    return 0


def rm(root: str | None, names: list[str], force: bool) -> int:
    with open_store(root) as store:
        vols.sweep(store)
        for n in names:
            vols.remove(store, n, force=force)
            print(n)
    return 0


def prune(root: str | None, everything: bool) -> int:
    with open_store(root) as store:
        vols.sweep(store)
        for n in vols.prune(store, everything=everything):
            print(n)
    return 0
