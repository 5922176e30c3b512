"""The filesystem's mutation lock: a FIFO mutex that costs nothing when nobody holds it.

``trio.Lock`` yields to the scheduler on every acquire, contended or not (a
checkpoint), and registers the owner for broken-lock detection: about 10 us per
request that changes the tree, paid by every create, setattr and copy-up. Here an
uncontended acquire is a flag; a contended one parks in FIFO order and the lock
is handed straight to the next waiter on release.

Guarantees: at most one holder; waiters get the lock in arrival order; a waiter
cancelled while parked never becomes the holder.
"""

from __future__ import annotations

from types import TracebackType

import trio


class Mutex:
    """``async with mutex:``; not re-entrant."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        if self._held:
            await self._lot.park()  # woken by __aexit__, which leaves the lock held for us
        else:
            self._held = True

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lot:
            self._lot.unpark()
        else:
            self._held = False
