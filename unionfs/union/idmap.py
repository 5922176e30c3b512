"""uid/gid range maps (podman's ``INSIDE:OUTSIDE:COUNT``), for the whole mount or one graft.

INSIDE is the id a process sees through the mount, OUTSIDE the id stored on
disk. An empty map is the identity. With a map, ids on disk that no range
covers show as :data:`OVERFLOW_ID` (65534, the kernel's overflow id), and an
inside id that no range covers cannot be stored: :meth:`IdMap.to_outside`
raises EINVAL (what ``chown`` to an unmapped id returns).

Guarantee: a map is a bijection between its INSIDE and OUTSIDE ranges; ranges
that overlap on either side are refused when the map is parsed.
"""

from __future__ import annotations

import errno
import os
from bisect import bisect_right
from dataclasses import dataclass

OVERFLOW_ID = 65534
MAX_ID = 2**32 - 1


class IdMapError(ValueError):
    """A map spec that makes no sense (message is one line)."""


@dataclass(slots=True, frozen=True)
class IdMap:
    ranges: tuple[tuple[int, int, int], ...] = ()  # (inside, outside, count), sorted by inside

    @classmethod
    def parse(cls, specs: list[str], what: str = "uidmap") -> IdMap:
        """``["0:1000:1", "1:100000:65536"]`` (also ``/``-separated lists in one spec, as podman allows)."""
        ranges = []
        for spec in specs:
            for part in spec.replace("/", ",").split(","):
                if not part:
                    continue
                try:
                    inside, outside, count = (int(x) for x in part.split(":"))
                except ValueError:
                    raise IdMapError(f"{what} '{part}' is not INSIDE:OUTSIDE:COUNT") from None
                # MAX_ID is (uid_t)-1, "no id": the kernel's maps refuse it too
                if min(inside, outside) < 0 or count <= 0 or max(inside, outside) + count - 1 >= MAX_ID:
                    raise IdMapError(f"{what} '{part}' is out of range (ids are 0 to {MAX_ID - 1})")
                ranges.append((inside, outside, count))
        for side in (0, 1):
            spans = sorted((r[side], r[side] + r[2]) for r in ranges)
            for (_, a1), (b0, _) in zip(spans, spans[1:], strict=False):
                if b0 < a1:
                    name = "inside" if side == 0 else "outside"
                    raise IdMapError(f"{what} ranges overlap on the {name} side (at {b0})")
        return cls(tuple(sorted(ranges)))

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def to_inside(self, outside: int) -> int:
        """The id a process sees for ``outside`` on disk (65534 when unmapped)."""
        if not self.ranges:
            return outside
        for i, o, n in self.ranges:
            if o <= outside < o + n:
                return i + outside - o
        return OVERFLOW_ID

    def to_outside(self, inside: int) -> int:
        """The id to store for ``inside``; EINVAL when no range maps it."""
        if not self.ranges or inside == -1 or inside == MAX_ID:
            return inside
        k = bisect_right(self.ranges, (inside, MAX_ID + 1, 0)) - 1
        if k >= 0:
            i, o, n = self.ranges[k]
            if i <= inside < i + n:
                return o + inside - i
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def spec(self) -> list[str]:
        return [f"{i}:{o}:{n}" for i, o, n in self.ranges]
