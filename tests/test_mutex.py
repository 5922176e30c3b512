"""The mutation lock (:mod:`unionfs.union.mutex`): exclusion, FIFO hand-over, cancellation."""

from __future__ import annotations

import trio
import trio.testing

from unionfs.union.mutex import Mutex


async def test_one_holder_and_arrival_order() -> None:
    m = Mutex()
    inside: list[int] = []
    order: list[int] = []

    async def worker(i: int) -> None:
        async with m:
            inside.append(i)
            assert len(inside) == 1
            order.append(i)
            await trio.sleep(0.01)  # hold it across a real wait, as a copy-up in a thread does
            inside.remove(i)

    async with trio.open_nursery() as n:
        for i in range(5):
            n.start_soon(worker, i)
            await trio.testing.wait_all_tasks_blocked()  # each one queued before the next arrives
    assert order == [0, 1, 2, 3, 4]


async def test_cancelled_waiter_never_holds_it() -> None:
    m = Mutex()
    got: list[str] = []
    cancelled = trio.CancelScope()

    async def waiter(name: str, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            async with m:
                got.append(name)

    async with trio.open_nursery() as n:
        async with m:
            n.start_soon(waiter, "cancelled", cancelled)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(waiter, "kept")
            await trio.testing.wait_all_tasks_blocked()
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()
    assert got == ["kept"]
    async with m:  # and free again afterwards
        pass
