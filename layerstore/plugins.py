"""Docker volume plugins: the protocol as Docker documents it, spoken to the plugins people already run.

A plugin is found where Docker looks for it (``/run/docker/plugins/NAME.sock`` or
``/run/docker/plugins/NAME/NAME.sock``, then ``NAME.spec`` or ``NAME.json`` in
``/etc/docker/plugins`` and ``/usr/lib/docker/plugins``; a spec holds ``unix:///path``
or ``tcp://host:port``, a json ``{"Name", "Addr"}``). ``$UNIONMOUNT_PLUGIN_PATH``
(directories, ``:``-separated) replaces those directories, for tests and private
set-ups. Requests are JSON POSTs with Docker's media type
(``application/vnd.docker.plugins.v1.2+json``): ``/Plugin.Activate`` once, then
``/VolumeDriver.Create|Remove|Mount|Unmount|Path|Get|List|Capabilities``.

Every failure is one :class:`PluginError` line naming the plugin: not found, not
answering within its timeout, answering an ``Err``, or answering nonsense. A plugin
never hangs a command: each request has a timeout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"
SOCKET_DIRS = ("/run/docker/plugins",)
SPEC_DIRS = ("/etc/docker/plugins", "/usr/lib/docker/plugins")
#: seconds for a request, and for Create, Mount and Remove (a plugin may reach a remote store first);
#: ``$UNIONMOUNT_PLUGIN_TIMEOUT`` sets both
TIMEOUT = float(os.environ.get("UNIONMOUNT_PLUGIN_TIMEOUT") or 10.0)
SLOW = float(os.environ.get("UNIONMOUNT_PLUGIN_TIMEOUT") or 60.0)


class PluginError(Exception):
    """A plugin that is missing, silent or refusing (the message is one line)."""


def _dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    env = os.environ.get("UNIONMOUNT_PLUGIN_PATH")
    if env:
        dirs = tuple(d for d in env.split(":") if d)
        return dirs, dirs
    return SOCKET_DIRS, SPEC_DIRS


def find(name: str) -> str:
    """The address of plugin ``name``: ``unix:///path`` or ``tcp://host:port``."""
    if not name or "/" in name or name.startswith("."):
        raise PluginError(f"'{name}' is not a plugin name")
    sockets, specs = _dirs()
    for d in sockets:
        for path in (os.path.join(d, f"{name}.sock"), os.path.join(d, name, f"{name}.sock")):
            if os.path.exists(path):
                return "unix://" + path
    for d in specs:
        spec = os.path.join(d, f"{name}.spec")
        if os.path.isfile(spec):
            with open(spec) as f:
                return f.read().strip()
        js = os.path.join(d, f"{name}.json")
        if os.path.isfile(js):
            try:
                with open(js) as f:
                    return str(json.load(f)["Addr"])
            except (ValueError, KeyError, TypeError):
                raise PluginError(f"plugin '{name}': {js} has no Addr") from None
    raise PluginError(f"volume plugin '{name}' not found (no socket in /run/docker/plugins, no spec file)")


@dataclass(slots=True)
class Plugin:
    """One volume plugin, activated on first use."""

    name: str
    address: str
    _client: httpx.Client | None = None  # (a string annotation: httpx is imported when first used)
    _base: str = ""

    @classmethod
    def open(cls, name: str) -> Plugin:
        """The plugin called ``name`` (not yet contacted); use it in a ``with`` block, which closes it."""
        return cls(name, find(name))

    def __enter__(self) -> Plugin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> httpx.Client:
        import httpx  # (here: a command that never meets a plugin does not pay for importing it)

        if self._client is not None:
            return self._client
        addr = self.address
        if addr.startswith("unix://"):
            transport = httpx.HTTPTransport(uds=addr[len("unix://") :])
            self._base = "http://plugin"
        elif addr.startswith(("tcp://", "http://")):
            transport = httpx.HTTPTransport()
            self._base = "http://" + addr.split("://", 1)[1]
        else:
            raise PluginError(f"plugin '{self.name}': address '{addr}' is neither unix:// nor tcp://")
        self._client = httpx.Client(transport=transport, headers={"Accept": MEDIA_TYPE})
        answer = self._post("/Plugin.Activate", {}, TIMEOUT)
        if "VolumeDriver" not in (answer.get("Implements") or []):
            raise PluginError(f"plugin '{self.name}' is not a volume driver (it implements {answer.get('Implements')})")
        return self._client

    def _post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        import httpx

        assert self._client is not None
        try:
            r = self._client.post(
                self._base + path, content=json.dumps(body), headers={"Content-Type": MEDIA_TYPE}, timeout=timeout
            )
        except httpx.TimeoutException:
            raise PluginError(f"plugin '{self.name}' did not answer {path} within {timeout:g} s") from None
        except httpx.HTTPError as e:
            raise PluginError(f"plugin '{self.name}' at {self.address}: {e}") from None
        try:
            answer = r.json() if r.content else {}
        except ValueError:
            raise PluginError(f"plugin '{self.name}' answered {path} with HTTP {r.status_code}, not JSON") from None
        if not isinstance(answer, dict):
            raise PluginError(f"plugin '{self.name}' answered {path} with something other than an object")
        err = answer.get("Err")
        if err:
            raise PluginError(f"plugin '{self.name}': {err}")
        if r.status_code >= 400:
            raise PluginError(f"plugin '{self.name}' answered {path} with HTTP {r.status_code}")
        return answer

    def call(self, what: str, body: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        self._connect()
        return self._post(f"/VolumeDriver.{what}", body, timeout)

    # -- the protocol ------------------------------------------------------------------
    def create(self, name: str, opts: dict[str, str]) -> None:
        self.call("Create", {"Name": name, "Opts": opts}, SLOW)

    def remove(self, name: str) -> None:
        self.call("Remove", {"Name": name}, SLOW)

    def mount(self, name: str, ident: str) -> str:
        path = self.call("Mount", {"Name": name, "ID": ident}, SLOW).get("Mountpoint")
        if not isinstance(path, str) or not path.startswith("/"):
            raise PluginError(f"plugin '{self.name}' mounted '{name}' nowhere (Mountpoint {path!r})")
        return path

    def unmount(self, name: str, ident: str) -> None:
        self.call("Unmount", {"Name": name, "ID": ident})

    def get(self, name: str) -> dict[str, Any] | None:
        """The plugin's record of volume ``name`` (Name, Mountpoint, Status, ...), or None if it has none."""
        try:
            v = self.call("Get", {"Name": name}).get("Volume")
        except PluginError as e:
            if "not found" in str(e).lower() or "no such" in str(e).lower() or "doesn't exist" in str(e).lower():
                return None
            raise
        return v if isinstance(v, dict) else None

    def list(self) -> list[dict[str, Any]]:
        vols = self.call("List", {}).get("Volumes") or []
        return [v for v in vols if isinstance(v, dict) and isinstance(v.get("Name"), str)]

    def scope(self) -> str:
        """``local`` or ``global`` (Docker's default when the plugin does not say: local)."""
        try:
            caps = self.call("Capabilities", {}).get("Capabilities") or {}
        except PluginError:
            return "local"
        return "global" if isinstance(caps, dict) and caps.get("Scope") == "global" else "local"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
