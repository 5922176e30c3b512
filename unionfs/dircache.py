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
against the loaded objects: pyfuse3's version, the static symbol in pyfuse3's
symbol table, the size of its ``_Container``, and on each call the inode number at
its known offset (``c.ino``) equal to the directory being opened. If any check
fails the mount works as before, without the kernel's listing cache, and
:meth:`DirCache.mark` returns False; it never raises.
"""

from __future__ import annotations

import ctypes
import gc
import logging

import pyfuse3
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

log = logging.getLogger(__name__)

#: pyfuse3 releases whose ``_Container`` layout below was read from their source.
_VERSIONS = ("3.5.0",)
_RETVAL_SYMBOL = "__pyx_v_7pyfuse3_py_retval"
_ANCHOR_SYMBOL = "PyInit_pyfuse3"  # exported: gives the module's load address
# cdef class _Container (handlers.pxi): PyObject_HEAD, dev_t rdev, fuse_file_info fi,
# fuse_ino_t ino, ... uint64_t fh. fi's second 32-bit word holds its bit fields.
_CONTAINER_SIZE = 264
_FI_BITS = 24 + 4
_INO = 64
# fuse_file_info's bit fields, in libfuse 3.14 and 3.17: writepage, direct_io,
# keep_cache, flush, nonseekable, flock_release, cache_readdir, noflush; 3.15 and 3.16
# put parallel_direct_writes after keep_cache. Other versions are not trusted.
_KEEP_CACHE = 1 << 2
_CACHE_READDIR = {(3, 14): 1 << 6, (3, 15): 1 << 7, (3, 16): 1 << 7, (3, 17): 1 << 6}


def libfuse_version() -> int:
    """libfuse's ``FUSE_VERSION`` (major * 100 + minor) of the library pyfuse3 runs on."""
    lib = ctypes.CDLL(pyfuse3.__file__)
    try:
        fn = lib.fuse_version
    except AttributeError:
        fn = ctypes.CDLL("libfuse3.so.3").fuse_version
    fn.restype = ctypes.c_int
    return int(fn())


def _symbols(path: str, names: tuple[str, ...]) -> dict[str, int]:
    found: dict[str, int] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for section in elf.iter_sections():
            if not isinstance(section, SymbolTableSection) or section.name != ".symtab":
                continue
            for name in names:
                for sym in section.get_symbol_by_name(name) or ():
                    found[name] = int(sym["st_value"])
    return found


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
        if pyfuse3.__version__ not in _VERSIONS:
            raise RuntimeError(f"pyfuse3 {pyfuse3.__version__} is not a version this was checked against")
        path = pyfuse3.__file__
        syms = _symbols(path, (_RETVAL_SYMBOL, _ANCHOR_SYMBOL))
        if len(syms) != 2:
            raise RuntimeError("pyfuse3's symbol table lacks py_retval (a stripped build)")
        anchor = ctypes.cast(getattr(ctypes.CDLL(path), _ANCHOR_SYMBOL), ctypes.c_void_p).value
        assert anchor is not None
        libfuse = divmod(libfuse_version(), 100)
        if libfuse not in _CACHE_READDIR:
            raise RuntimeError(f"libfuse {libfuse[0]}.{libfuse[1]} is not a version this was checked against")
        self._bits = _KEEP_CACHE | _CACHE_READDIR[libfuse]
        self._slot = anchor - syms[_ANCHOR_SYMBOL] + syms[_RETVAL_SYMBOL]
        self._pointer = ctypes.c_void_p.from_address(self._slot)  # views of the slot, made once: read per call
        self._object = ctypes.py_object.from_address(self._slot)

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
                    return obj
        return None
