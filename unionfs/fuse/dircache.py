"""Let the kernel cache a directory's listing (``FOPEN_CACHE_DIR``) through pyfuse3 3.5.

libfuse has the flag (``fuse_file_info.cache_readdir``) and the kernel honours it: a
listing read once is served from the directory's page cache until the directory
changes (the kernel drops it itself on every create, unlink or rename through the
mount, and when the directory's mtime changes). pyfuse3 3.5's ``opendir`` can only
return a file handle, so a warm ``find`` or ``ls -R`` sends every READDIR to Python
again.

:class:`DirCache` sets the two bits on the ``fuse_file_info`` that pyfuse3 is about
to send back: while the ``opendir`` handler runs, pyfuse3's module-level
``py_retval`` holds the coroutine that will call ``fuse_reply_open(req, &c.fi)``
when the handler returns, and that coroutine's closure holds ``c``. The bit
positions are those of the libfuse headers pyfuse3 was built with, taken to be the
library's own version.

Guarantees: it is enabled only when every fact it relies on is checked first, once,
against the loaded objects (see :mod:`unionfs.fuse.pyfuse3_abi`): pyfuse3's version, its static
``py_retval``, the size of its ``_Container``, and on each call the inode number at
its known offset (``c.ino``) equal to the directory being opened. If any check
fails the mount works as before, without the kernel's listing cache, and
:meth:`DirCache.mark` returns False; it never raises.
"""

from __future__ import annotations

import ctypes
import gc
import logging

from . import pyfuse3_abi

log = logging.getLogger(__name__)

# cdef class _Container (handlers.pxi): PyObject_HEAD, dev_t rdev, fuse_file_info fi,
# fuse_ino_t ino, ... uint64_t fh. fi's second 32-bit word holds its bit fields.
_CONTAINER_SIZE = 264
_FI_BITS = 24 + 4
_INO = 64
# fuse_file_info's bit fields, in libfuse 3.14 and 3.17: writepage, direct_io,
# keep_cache, flush, nonseekable, flock_release, cache_readdir, noflush; 3.15 and 3.16
# put parallel_direct_writes after keep_cache.
_KEEP_CACHE = 1 << 2
_CACHE_READDIR = {(3, 14): 1 << 6, (3, 15): 1 << 7, (3, 16): 1 << 7, (3, 17): 1 << 6}


class DirCache:
    """Marks the reply of the running ``opendir`` as cacheable by the kernel."""

    def __init__(self) -> None:
        self._slot = 0  # address of pyfuse3's py_retval, 0 when disabled
        self._bits = 0
        try:
            self._setup()
        except Exception as e:  # noqa: BLE001 - any surprise means: no listing cache
            log.info("kernel directory cache unavailable: %s", e)
            self._slot = 0

    @property
    def enabled(self) -> bool:
        return self._slot != 0

    def _setup(self) -> None:
        slot = pyfuse3_abi.statics(pyfuse3_abi.RETVAL)[pyfuse3_abi.RETVAL]
        self._bits = _KEEP_CACHE | _CACHE_READDIR[pyfuse3_abi.libfuse_version()]
        self._pointer = ctypes.c_void_p.from_address(slot)  # views of the slot, made once: read per call
        self._object = ctypes.py_object.from_address(slot)
        self._slot = slot

    def mark(self, ino: int) -> bool:
        """Set ``keep_cache`` and ``cache_readdir`` on the pending reply to opening ``ino``.

        Call it synchronously from the ``opendir`` handler (before any ``await``).
        """
        if not self._slot:
            return False
        try:
            container = self._container()
            if container is None or ctypes.c_uint64.from_address(id(container) + _INO).value != ino:
                raise RuntimeError("pending opendir reply not found where expected")
        except Exception as e:  # noqa: BLE001
            log.warning("kernel directory cache disabled: %s", e)
            self._slot = 0
            return False
        word = ctypes.c_uint32.from_address(id(container) + _FI_BITS)
        word.value |= self._bits
        return True

    def _container(self) -> object | None:
        if self._pointer.value is None:
            return None
        coro = self._object.value
        if getattr(coro, "__name__", None) != "fuse_opendir_async":
            return None
        for scope in gc.get_referents(coro):
            for obj in gc.get_referents(scope):
                t = type(obj)
                if t.__name__ == "_Container" and t.__basicsize__ == _CONTAINER_SIZE:
                    found: object = obj
                    return found
        return None
