"""Our own FUSE session: reads the kernel's requests from the device, runs their handlers, writes the replies.

This is the daemon's request loop in place of libfuse and pyfuse3 (``pyfuse3.main`` stays
as the fallback, :mod:`unionfs.fuse.operations`). It speaks the wire format of
:mod:`unionfs.fuse.wire` directly, which gives the union what libfuse 3.14 cannot:
kernel passthrough of file I/O (``FUSE_PASSTHROUGH``), ``FUSE_HANDLE_KILLPRIV_V2`` with the
request flags that go with it, ``FOPEN_CACHE_DIR``, and the inode a READDIR is about.

Concurrency is trio's, in one thread: a worker reads a request, runs its handler and
replies. A handler that waits (a copy-up in a worker thread, a contended lock) has
yielded to trio at its first step; the worker then makes sure another worker is reading
the device (up to :data:`MAX_WORKERS`) before it awaits the rest. A worker that finds
the device empty while another is already waiting on it ends. A worker yields to trio
at least every :data:`FAIRNESS` requests, so that signals and finished threads are seen
under a steady stream. Before sleeping on an empty device the loop polls it for up to
:data:`SPIN_NS` while requests come that close together (perf/README.md, "Polling the
device before sleeping").

Where it is built (``unionfs/fuse/_pump.c``, compiled at install time), the device is read
by :class:`Pump`, which also answers the requests whose answer the union keeps on a fixed
node (GETATTR, LISTXATTR, GETXATTR of an absent name; see :class:`unionfs.union.inodes.Node`)
without entering Python, and polls with the GIL released. Without it (or with
``-o pump=0``) the same loop reads in Python.

Guarantees: every request but FORGET, BATCH_FORGET and INTERRUPT gets exactly one reply;
a reply to a request the kernel has meanwhile interrupted is dropped (ENOENT from the
device), as libfuse does. The loop ends when the connection ends (unmount, or
:meth:`Session.terminate`).
"""

from __future__ import annotations

import errno
import logging
import os
import types
from collections.abc import Callable, Coroutine, Generator
from time import perf_counter_ns
from typing import Any

import trio

from . import wire

try:
    from ._pump import Pump
except ImportError as e:  # not built: no compiler or no Python headers at install time
    Pump = None  # type: ignore[assignment,misc]
    PUMP_MISSING = str(e)
else:
    PUMP_MISSING = ""

log = logging.getLogger(__name__)

MAX_WORKERS = 99  # as pyfuse3.main
SPIN_NS = 50_000  # how long the device is polled before sleeping, while requests come that close together
FAIRNESS = 64  # requests a worker may serve in a row without yielding to trio
MAX_WRITE = 1 << 20  # bytes in one WRITE (and READ) request, as libfuse's default
BUFSIZE = MAX_WRITE + 4096  # a request's header and arguments fit beside the largest write


class Request:
    """One request: its header's fields and its arguments (a view of the worker's buffer, valid until the reply)."""

    __slots__ = ("opcode", "unique", "nodeid", "uid", "gid", "pid", "args", "umask")

    def __init__(self, opcode: int, unique: int, nodeid: int, uid: int, gid: int, pid: int, args: memoryview) -> None:
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.args = args
        self.umask = 0  # set by the handlers of requests that create an entry


#: a handler returns the reply's body (bytes, or a list of buffers), or a coroutine that returns it;
#: it raises OSError to answer with an errno
Reply = bytes | list[Any] | None
Handler = Callable[[Request], Reply | Coroutine[Any, Any, Reply]]


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], trap: Any) -> Generator[Any, Any, Any]:
    """Go on running ``coro`` in the awaiting task from the trap its first step yielded; returns its value."""
    while True:
        try:
            value = yield trap
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # noqa: BLE001 - trio delivers cancellation this way
            try:
                trap = coro.throw(e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                trap = coro.send(value)
            except StopIteration as stop:
                return stop.value


class Session:
    """A mounted FUSE connection and the loop that serves it."""

    def __init__(self, fd: int, handlers: dict[int, Handler], on_error: Callable[[int, BaseException], int]) -> None:
        self.fd = fd
        self.handlers = handlers
        self._on_error = on_error  # (opcode, exception) -> errno, for anything but OSError
        self.nodeid = 0  # the inode of the request being started
        #: run (and emptied) once the request being served has been answered, before the next is read
        self.after_reply: list[Callable[[], None]] = []
        self._workers = 0
        self._waiting = False
        self._spin = 0
        self.spin_ns = SPIN_NS
        self._nursery: trio.Nursery | None = None
        self._ended = False
        self.pump: Pump | None = None

    def use_pump(self, nodes: dict[int, Any]) -> None:
        """Read the device with the compiled hot path, answering from ``nodes`` (the union's inode table)."""
        assert Pump is not None
        self.pump = Pump(self.fd, nodes)

    def pump_counts(self) -> dict[str, tuple[int, int, int]]:
        """The requests the compiled hot path answered: {operation: (requests, nanoseconds, errors)}."""
        return self.pump.counts() if self.pump is not None else {}

    # -- replies ---------------------------------------------------------------------------
    def reply(self, unique: int, body: Reply) -> None:
        try:
            if body is None:
                os.write(self.fd, wire.OUT_HEADER.pack(16, 0, unique))
            elif type(body) is bytes:
                header = wire.OUT_HEADER.pack(16 + len(body), 0, unique)
                if len(body) <= 4096:
                    os.write(self.fd, header + body)
                else:  # (a READ's data: not copied again)
                    os.writev(self.fd, [header, body])
            else:
                assert isinstance(body, list)
                n = 16 + sum(len(b) for b in body)
                os.writev(
                    self.fd,
                    [wire.OUT_HEADER.pack(n, 0, unique), *body]
                    if len(body) < 512
                    else [wire.OUT_HEADER.pack(n, 0, unique) + b"".join(body)],
                )
        except FileNotFoundError:
            pass  # the request was interrupted meanwhile: the kernel no longer waits for it

    def error(self, unique: int, err: int) -> None:
        try:
            os.write(self.fd, wire.OUT_HEADER.pack(16, -err, unique))
        except FileNotFoundError:
            pass

    def notify(self, code: int, body: bytes) -> None:
        """Send a notification (``unique`` 0, the code in the error field); OSError if the kernel refuses it."""
        os.write(self.fd, wire.OUT_HEADER.pack(16 + len(body), code, 0) + body)

    def invalidate_inode(self, ino: int) -> None:
        """Drop the kernel's cached attributes and pages of ``ino``."""
        self.notify(wire.NOTIFY_INVAL_INODE, wire.NOTIFY_INVAL_INODE_OUT.pack(ino, 0, 0))

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve requests until the connection ends."""
        os.set_blocking(self.fd, False)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._start_worker()
        self._nursery = None

    def terminate(self) -> None:
        """End the loop (the caller unmounts)."""
        self._ended = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _start_worker(self) -> None:
        assert self._nursery is not None
        self._workers += 1
        self._nursery.start_soon(self._worker)

    def _read(self, buf: bytearray) -> int:
        """One request into ``buf``: its length, -1 if none is waiting, 0 when the connection has ended."""
        while True:
            try:
                return os.readv(self.fd, [buf])
            except BlockingIOError:
                return -1
            except (InterruptedError, FileNotFoundError):
                continue  # (ENOENT: the request was interrupted before we read it)
            except OSError as e:
                if e.errno == errno.ENODEV:  # unmounted
                    return 0
                raise

    def _next(self, buf: bytearray, spin_ns: int) -> int:
        """:meth:`Pump.next` in Python, without its answers: one request into ``buf``, the device polled for
        up to ``spin_ns`` if none is waiting; its length, -1 if none came, 0 when the connection has ended."""
        n = self._read(buf)
        if n < 0 and spin_ns:
            deadline = perf_counter_ns() + spin_ns
            while n < 0 and perf_counter_ns() < deadline:
                n = self._read(buf)
        return n

    async def _worker(self) -> None:
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        unpack = wire.IN_HEADER.unpack_from
        handlers = self.handlers
        served = 0
        read = self.pump.next if self.pump is not None else self._next
        try:
            while not self._ended:
                spin = self._spin > 0 and not self._waiting
                n = read(buf, self.spin_ns if spin else 0)
                if n == -2:  # a burst of requests answered in C: let trio run
                    served = 0
                    await trio.lowlevel.checkpoint()
                    continue
                if spin:  # twice in vain in a row: not again until a wait is short
                    self._spin = 2 if n >= 0 else self._spin - 1
                if n < 0:
                    if self._waiting:  # another worker is already listening: this one is spare
                        return
                    self._waiting = True
                    slept = perf_counter_ns()
                    try:
                        await trio.lowlevel.wait_readable(self.fd)
                    except trio.ClosedResourceError:
                        return
                    finally:
                        self._waiting = False
                    if perf_counter_ns() - slept < self.spin_ns:
                        self._spin = 2
                    served = 0
                    continue
                if n == 0:
                    self._ended = True
                    return
                length, opcode, unique, nodeid, uid, gid, pid, _, _ = unpack(buf)
                self.nodeid = nodeid
                req = Request(opcode, unique, nodeid, uid, gid, pid, view[wire.IN_HEADER.size : length])
                handler = handlers.get(opcode)
                if handler is None:
                    if opcode not in wire.NO_REPLY:
                        self.error(unique, errno.ENOSYS)
                else:
                    try:
                        result = handler(req)
                    except OSError as e:
                        self.error(unique, e.errno or errno.EIO)
                        result = None
                    except Exception as e:  # noqa: BLE001 - a handler's bug must not end the mount
                        self.error(unique, self._on_error(opcode, e))
                        result = None
                    else:
                        if type(result) is types.CoroutineType:
                            await self._finish(req, result)
                            served = -1  # (counted below) it may have yielded: the streak starts again
                        elif opcode not in wire.NO_REPLY:
                            self.reply(unique, result)  # type: ignore[arg-type]
                if self.after_reply:
                    calls = self.after_reply[:]
                    self.after_reply.clear()
                    for call in calls:
                        call()
                served += 1
                if served >= FAIRNESS:
                    served = 0
                    await trio.lowlevel.checkpoint()
        finally:
            self._workers -= 1
            if self._ended and self._workers:
                trio.lowlevel.notify_closing(self.fd)  # wake the worker still waiting on the device

    async def _finish(self, req: Request, coro: Coroutine[Any, Any, Reply]) -> None:
        """Run an asynchronous handler: its first step here, the rest (if it waits) with another worker reading."""
        try:
            try:
                trap = coro.send(None)
            except StopIteration as stop:
                body = stop.value
            else:
                if not self._waiting and self._workers < MAX_WORKERS:
                    self._start_worker()
                body = await _resume(coro, trap)
        except OSError as e:
            self.error(req.unique, e.errno or errno.EIO)
            return
        except trio.Cancelled:
            raise
        except Exception as e:  # noqa: BLE001
            self.error(req.unique, self._on_error(req.opcode, e))
            return
        if req.opcode not in wire.NO_REPLY:
            self.reply(req.unique, body)
