"""What the union shows on a path instead of its layers: a volume, a host directory, a tmpfs."""

from __future__ import annotations

from dataclasses import dataclass

from .idmap import IdMap


@dataclass(slots=True, frozen=True)
class Graft:
    """A directory grafted on a path of the union: a volume, a host directory, a tmpfs.

    Below ``target`` the mount shows ``source`` as it is (no layers, no
    copy-up); ``uidmap``/``gidmap`` (empty: the mount's own) translate owners.
    """

    target: bytes  # path in the union, without the leading slash
    source: str  # the host directory shown there
    read_only: bool = False
    kind: str = "bind"  # "volume", "bind" or "tmpfs"
    name: str | None = None  # the volume's name
    uidmap: IdMap = IdMap()
    gidmap: IdMap = IdMap()
    nocopy: bool = False

    def describe(self) -> dict[str, object]:
        """As recorded with a container (for ``--volumes-from`` and ``volume inspect``)."""
        return {
            "Type": self.kind,
            "Name": self.name,
            "Source": self.source,
            "Destination": "/" + self.target.decode("utf-8", "surrogateescape"),
            "RW": not self.read_only,
        }
