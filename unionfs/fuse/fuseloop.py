"""The daemon's request loop: pyfuse3's handlers, without a scheduler round trip per request.

``pyfuse3.main()`` hands the FUSE device from worker to worker through a ``trio.Lock``
and waits for it to become readable before every request, so each request costs a
lock hand-off and a trip through trio's scheduler and epoll (measured in perf/README.md,
"Our own request loop").

:class:`RequestLoop` reads the device without blocking and hands each request to
libfuse's ``fuse_session_process_buf``, which calls pyfuse3's own handler; the handler
leaves the coroutine that will run our operation and reply in pyfuse3's ``py_retval``
(see :mod:`unionfs.fuse.pyfuse3_abi`). The loop takes it from there and runs it in the same
task. It waits for the device only when there is nothing to read.

Concurrency is pyfuse3's: a request whose handler blocks (a copy-up awaiting a worker
thread, a contended lock) must not stall the others, so when a handler first yields to
trio the loop makes sure another worker is reading the device, starting one if none
is (up to :data:`MAX_WORKERS`). A worker that finds the device empty while another is
already waiting on it ends. A worker yields to trio at least every :data:`FAIRNESS`
requests, so that signals and finished threads are seen under a steady stream.

Before sleeping on an empty device the loop polls it for up to :data:`SPIN_NS`, as long
as requests have been coming that close together (a process calling ``stat`` in a loop):
waking a sleeping daemon costs more than the request (perf/README.md, "Polling the
device before sleeping"). Two polls in a row that find
nothing turn it off until a wait is short again, so a quiet or slow client costs two
polls per burst.

The loop also keeps the inode each request is about (:attr:`RequestLoop.nodeid`, from the
request's header), which pyfuse3 does not pass to ``readdir``: with it the union can list
directories the kernel did not open (:meth:`unionfs.union.fs.UnionFS.list_without_open`).

A GETATTR whose answer the union keeps ready (a lower-only entry, whose attributes cannot
change) is answered by the loop itself (:attr:`RequestLoop.answer_getattr`): the reply is
written to the device without libfuse, pyfuse3 or a coroutine.

INIT flags that libfuse 3.14 cannot offer (:meth:`RequestLoop.offer`) are added to its INIT
reply on the way to the kernel: libfuse writes the reply into a pipe put in the device's
place for that one request, and the loop forwards it with the flags added. The one offered
today is ``FUSE_HANDLE_KILLPRIV_V2``: the file system, not the kernel, drops setuid and
setgid on write, truncate and ``open(O_TRUNC)``, which lets the kernel stop asking for
``security.capability`` before every ``write()`` (it asks once per inode). The request flags
that say when to drop them, which pyfuse3 does not pass on, are read from the request
(:attr:`RequestLoop.kill_caller`).

Guarantees: :meth:`RequestLoop.create` returns None (and the daemon runs
``pyfuse3.main()``) unless every fact it relies on is checked (see
:mod:`unionfs.fuse.pyfuse3_abi`). Every coroutine a handler leaves is run to its end, exactly
once, and ``py_retval`` holds it while its first step runs (as under ``pyfuse3.main``)
and None again before any other request is processed, with the references counted as
pyfuse3 counts them. The loop ends when the session ends: unmount, or
``pyfuse3.terminate()``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
import types
from collections.abc import Callable, Coroutine, Generator
from time import perf_counter_ns
from typing import Any, NamedTuple, cast

import pyfuse3
import trio

from . import pyfuse3_abi

log = logging.getLogger(__name__)

MAX_WORKERS = 99  # as pyfuse3.main
SPIN_NS = 50_000  # how long the device is polled before sleeping, while requests come that close together
FAIRNESS = 64  # requests a worker may serve in a row without yielding to trio
_DONE = object()  # the handler's first step was its last
# struct fuse_in_header: u32 len, u32 opcode, u64 unique, u64 nodeid, u32 uid, gid, pid, ...
_OPCODE, _UNIQUE, _NODEID, _UID, _ARGS = 4, 8, 16, 24, 40
_GETATTR, _SETATTR, _WRITE, _OPEN, _INIT = 3, 4, 16, 14, 26  # opcodes
_OUT_HEADER = struct.Struct("=IiQ")  # struct fuse_out_header: u32 len, s32 error, u64 unique
_SETATTR_VALID = _ARGS  # fuse_setattr_in.valid
_OPEN_FLAGS = _ARGS + 4  # fuse_open_in.open_flags
_WRITE_FLAGS = _ARGS + 20  # fuse_write_in.write_flags
_INIT_FLAGS = _ARGS + 12  # fuse_init_in.flags (after major, minor, max_readahead)
FATTR_KILL_SUIDGID = 1 << 11
FUSE_OPEN_KILL_SUIDGID = 1 << 0
FUSE_WRITE_KILL_SUIDGID = 1 << 2
HANDLE_KILLPRIV_V2 = 1 << 28  # an INIT flag


class Caller(NamedTuple):
    """Who sent a request (``fuse_in_header``), for requests pyfuse3 gives no context."""

    uid: int
    gid: int
    pid: int


class _FuseBuf(ctypes.Structure):
    """libfuse's ``struct fuse_buf`` (3.17 appended ``mem_size``; 3.14 ignores it)."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
        ("mem_size", ctypes.c_size_t),
    ]


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], trap: Any) -> Generator[Any, Any, None]:
    """Go on running ``coro`` in the awaiting task, from the trap its first step yielded."""
    while True:
        try:
            value = yield trap
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # noqa: BLE001 - trio delivers cancellation this way
            try:
                trap = coro.throw(e)
            except StopIteration:
                return
        else:
            try:
                trap = coro.send(value)
            except StopIteration:
                return


class RequestLoop:
    """Serves the mounted pyfuse3 session until it ends."""

    def __init__(self) -> None:
        addr = pyfuse3_abi.statics(pyfuse3_abi.SESSION, pyfuse3_abi.RETVAL)
        session = ctypes.c_void_p.from_address(addr[pyfuse3_abi.SESSION]).value
        if not session:
            raise pyfuse3_abi.Unsupported("pyfuse3 has no session (init() not called)")
        self._session = session
        self._slot = ctypes.c_void_p.from_address(addr[pyfuse3_abi.RETVAL])
        self._held = ctypes.py_object.from_address(addr[pyfuse3_abi.RETVAL])
        lib = pyfuse3_abi.libfuse()
        self._receive = lib.fuse_session_receive_buf
        self._receive.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._receive.restype = ctypes.c_int
        self._process = lib.fuse_session_process_buf
        self._process.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._process.restype = None
        self._exited = lib.fuse_session_exited
        self._exited.argtypes = [ctypes.c_void_p]
        self._exited.restype = ctypes.c_int
        fd_of = lib.fuse_session_fd
        fd_of.argtypes = [ctypes.c_void_p]
        fd_of.restype = ctypes.c_int
        self._fd = fd_of(session)
        self._incref = ctypes.pythonapi.Py_IncRef
        self._incref.argtypes = [ctypes.py_object]
        self._decref = ctypes.pythonapi.Py_DecRef
        self._decref.argtypes = [ctypes.py_object]
        self._free = ctypes.CDLL(None).free
        self._free.argtypes = [ctypes.c_void_p]
        self.nodeid = 0  # the inode the request being started is about (fuse_in_header.nodeid)
        #: INIT flags granted on top of libfuse's (see :meth:`offer`); read once INIT is answered
        self.granted = 0
        #: the caller of the request being started, when the kernel asks the file system to
        #: drop setuid/setgid with it (only once ``HANDLE_KILLPRIV_V2`` is granted); else None
        self.kill_caller: Caller | None = None
        self._offer = 0
        #: answers GETATTR for an inode with a reply body (``struct fuse_attr_out``) without
        #: libfuse and pyfuse3, or returns None to let them answer; see :meth:`_answer`
        self.answer_getattr: Callable[[int], bytes | None] | None = None
        #: run (and emptied) once the request being served has been answered, before the next is read
        self.after_reply: list[Callable[[], None]] = []
        self._workers = 0
        self._waiting = False  # a worker is waiting for the device to become readable
        self._spin = 0  # > 0: requests came close together lately: poll before sleeping
        self.spin_ns = SPIN_NS  # 0: never poll (``-o spin=0``)
        self._nursery: trio.Nursery | None = None

    @property
    def killpriv(self) -> bool:
        """Whether the kernel left dropping setuid/setgid to the file system (see :attr:`kill_caller`)."""
        return bool(self.granted & HANDLE_KILLPRIV_V2)

    def offer(self, flags: int) -> None:
        """Ask for INIT ``flags`` (where the kernel offers them) in addition to libfuse's.

        Call before :meth:`run`. What the kernel agreed to is :attr:`granted` after INIT.
        """
        self._offer |= flags

    @classmethod
    def create(cls) -> RequestLoop | None:
        """The loop for pyfuse3's mounted session, or None where its insides are not the checked ones."""
        try:
            return cls()
        except Exception as e:  # noqa: BLE001 - any surprise means: pyfuse3's own loop
            log.info("own request loop unavailable, using pyfuse3's: %s", e)
            return None

    async def run(self) -> None:
        """Serve requests until the session ends (what ``pyfuse3.main()`` does)."""
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        pyfuse3.trio_token = trio.lowlevel.current_trio_token()  # as pyfuse3.main sets it
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._start_worker()
        finally:
            self._nursery = None
            pyfuse3.trio_token = None

    def _start_worker(self) -> None:
        assert self._nursery is not None
        self._workers += 1
        self._nursery.start_soon(self._worker)

    def _clear(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Put None back in ``py_retval`` (which held ``coro``), counting references as Cython does."""
        self._incref(None)  # the slot's reference to None
        self._slot.value = id(None)
        self._decref(coro)  # the slot's reference to the coroutine; the caller keeps its own

    def _run_after_reply(self) -> None:
        calls = self.after_reply[:]
        self.after_reply.clear()  # the same list: callers may hold its append
        for call in calls:
            call()

    def _init(self, ref: Any, mem: int) -> None:
        """Serve INIT through libfuse, adding the offered flags the kernel supports to the reply.

        libfuse writes its reply to the session's fd; for this one request that fd number is
        a pipe's, and the reply goes on to the device from there. If the kernel refuses the
        amended reply, libfuse's own is sent instead.
        """
        want = self._offer & ctypes.c_uint32.from_address(mem + _INIT_FLAGS).value
        self._offer = 0
        if not want:
            self._process(self._session, ref)
            return
        fd = self._fd
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        saved = os.dup(fd)
        try:
            os.dup2(w, fd, inheritable=False)
            try:
                self._process(self._session, ref)
            finally:
                os.dup2(saved, fd, inheritable=False)
            try:
                reply = os.read(r, 1 << 16)
            except BlockingIOError:
                return  # libfuse sent nothing (it cannot happen for INIT; then neither do we)
        finally:
            for x in (saved, r, w):
                os.close(x)
        # fuse_out_header (u32 len, s32 error, u64 unique), fuse_init_out (u32 major, minor, max_readahead, flags, ...)
        if len(reply) >= 32 and struct.unpack_from("=IiQI", reply)[1::2] == (0, 7):  # no error, major 7
            amended = bytearray(reply)
            struct.pack_into("=I", amended, 28, struct.unpack_from("=I", reply, 28)[0] | want)
            try:
                os.write(fd, amended)
                self.granted = want
                return
            except OSError as e:
                log.info("the kernel refused INIT flags %#x (%s); going on without them", want, e)
        os.write(fd, reply)

    def _answer(self, unique: int) -> bool:
        """Answer the GETATTR being started ourselves if :attr:`answer_getattr` can; True if answered.

        libfuse never sees such a request, which it does not need to: a reply carries the
        request's ``unique`` and nothing else of libfuse's state.
        """
        assert self.answer_getattr is not None
        body = self.answer_getattr(self.nodeid)
        if body is None:
            return False
        try:
            os.write(self._fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(body), 0, unique) + body)
        except FileNotFoundError:
            pass  # the request was interrupted meanwhile: as libfuse, drop the reply
        return True

    async def _worker(self) -> None:
        buf = _FuseBuf()
        ref = ctypes.byref(buf)
        session, receive, process, fd = self._session, self._receive, self._process, self._fd
        slot, held, none = self._slot, self._held, id(None)
        nodeid: Any = None  # views of the request in this worker's buffer (ctypes integers)
        opcode = unique = valid = open_flags = write_flags = nodeid
        served = 0
        try:
            while True:
                res = receive(session, ref)  # 0 once the session has ended (unmount, terminate)
                if res == -errno.EAGAIN and self._spin > 0 and not self._waiting:
                    deadline = perf_counter_ns() + self.spin_ns
                    while res == -errno.EAGAIN and perf_counter_ns() < deadline:
                        res = receive(session, ref)
                    # twice in vain in a row: not again until a wait is short
                    self._spin = 2 if res != -errno.EAGAIN else self._spin - 1
                if res == -errno.EAGAIN:
                    if self._waiting:  # another worker is already listening: this one is spare
                        return
                    self._waiting = True
                    slept = perf_counter_ns()
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:  # pyfuse3.terminate()
                        return
                    finally:
                        self._waiting = False
                    if perf_counter_ns() - slept < self.spin_ns:
                        self._spin = 2
                    served = 0
                    continue
                if res == -errno.EINTR:
                    continue
                if res < 0:
                    raise OSError(-res, f"fuse_session_receive_buf failed: {os.strerror(-res)}")
                if res == 0:
                    return
                if nodeid is None:  # libfuse allocated the buffer at the first read; it stays
                    nodeid = ctypes.c_uint64.from_address(buf.mem + _NODEID)
                    unique = ctypes.c_uint64.from_address(buf.mem + _UNIQUE)
                    opcode = ctypes.c_uint32.from_address(buf.mem + _OPCODE)
                    valid = ctypes.c_uint32.from_address(buf.mem + _SETATTR_VALID)
                    open_flags = ctypes.c_uint32.from_address(buf.mem + _OPEN_FLAGS)
                    write_flags = ctypes.c_uint32.from_address(buf.mem + _WRITE_FLAGS)
                self.nodeid = nodeid.value
                op = opcode.value
                if op == _GETATTR and self.answer_getattr is not None and self._answer(unique.value):
                    pass  # answered without libfuse and pyfuse3
                else:
                    if self.granted & HANDLE_KILLPRIV_V2:
                        if (
                            (op == _WRITE and write_flags.value & FUSE_WRITE_KILL_SUIDGID)
                            or (op == _SETATTR and valid.value & FATTR_KILL_SUIDGID)
                            or (op == _OPEN and open_flags.value & FUSE_OPEN_KILL_SUIDGID)
                        ):
                            self.kill_caller = Caller(*struct.unpack_from("=III", ctypes.string_at(buf.mem + _UID, 12)))
                        else:
                            self.kill_caller = None
                    if self._offer and op == _INIT:
                        self._init(ref, buf.mem)
                    else:
                        process(session, ref)  # pyfuse3's handler leaves its coroutine in py_retval
                    if slot.value != none:  # else answered inside libfuse (INIT, FORGET, ...)
                        coro = cast(Coroutine[Any, Any, Any], held.value)
                        try:
                            trap = coro.send(None)  # the first step, with the coroutine still in py_retval
                        except StopIteration:
                            trap = _DONE
                        finally:
                            self._clear(coro)
                        if trap is not _DONE:
                            # The handler waits (a thread, a lock): keep someone reading the device meanwhile.
                            if not self._waiting and self._workers < MAX_WORKERS:
                                self._start_worker()
                            await _resume(coro, trap)
                            served = -1  # (counted below) it yielded: the streak starts again
                if self.after_reply:
                    self._run_after_reply()
                served += 1
                if served >= FAIRNESS:
                    served = 0
                    await trio.lowlevel.checkpoint()
        finally:
            self._workers -= 1
            if buf.mem:
                self._free(buf.mem)
            if self._exited(session) and self._workers:
                trio.lowlevel.notify_closing(fd)  # wake the worker still waiting on the device
