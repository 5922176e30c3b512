"""What unionmount reads of pyfuse3's and libfuse's insides, and the checks that guard it.

pyfuse3 3.5 keeps two things module-private that the daemon needs: the libfuse session
(for :mod:`unionfs.fuse.fuseloop`) and ``py_retval``, the slot in which each request's
handler leaves the coroutine that will answer it (for both :mod:`unionfs.fuse.fuseloop` and
:mod:`unionfs.fuse.dircache`). Both are Cython module statics: their addresses come from
pyfuse3's ELF symbol table (read with pyelftools), relative to the exported
``PyInit_pyfuse3``.

Guarantees: :func:`statics` raises :class:`Unsupported` unless pyfuse3 is a release
whose source was read for this (:data:`VERSIONS`), its symbol table has every name
asked for, and libfuse is a version whose ``fuse_file_info`` and ``fuse_buf`` layouts
were read (:data:`LIBFUSE`). It reads files and memory only; it changes nothing.
"""

from __future__ import annotations

import ctypes
import functools

import pyfuse3
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

#: pyfuse3 releases whose handlers, ``_Container`` and session loop were read from source.
VERSIONS = ("3.5.0",)
#: libfuse (major, minor) versions whose headers were read: 3.14 to 3.17.
LIBFUSE = ((3, 14), (3, 15), (3, 16), (3, 17))

SESSION = "__pyx_v_7pyfuse3_session"
RETVAL = "__pyx_v_7pyfuse3_py_retval"
_ANCHOR = "PyInit_pyfuse3"  # exported: gives the module's load address


class Unsupported(RuntimeError):
    """pyfuse3 or libfuse is not a build whose insides were checked."""


@functools.cache
def libfuse() -> ctypes.PyDLL:
    """libfuse, as pyfuse3 loaded it; calls through it keep the GIL (they call back into pyfuse3)."""
    return ctypes.PyDLL("libfuse3.so.3")


def libfuse_version() -> tuple[int, int]:
    """(major, minor) of the libfuse pyfuse3 runs on."""
    fn = libfuse().fuse_version
    fn.restype = ctypes.c_int
    return divmod(int(fn()), 100)


def _symbols(path: str, names: tuple[str, ...]) -> dict[str, int]:
    found: dict[str, int] = {}
    with open(path, "rb") as f:
        for section in ELFFile(f).iter_sections():
            if not isinstance(section, SymbolTableSection) or section.name != ".symtab":
                continue
            for name in names:
                for sym in section.get_symbol_by_name(name) or ():
                    found[name] = int(sym["st_value"])
    return found


def statics(*names: str) -> dict[str, int]:
    """The run-time addresses of pyfuse3's module statics ``names`` (of :data:`SESSION`, :data:`RETVAL`),
    after every check above. The symbol table is read once for all of them."""
    found = _statics()
    return {n: found[n] for n in names}


@functools.cache
def _statics() -> dict[str, int]:
    names = (SESSION, RETVAL)
    if pyfuse3.__version__ not in VERSIONS:
        raise Unsupported(f"pyfuse3 {pyfuse3.__version__} is not a version this was checked against")
    version = libfuse_version()
    if version not in LIBFUSE:
        raise Unsupported(f"libfuse {version[0]}.{version[1]} is not a version this was checked against")
    path = pyfuse3.__file__
    syms = _symbols(path, (*names, _ANCHOR))
    missing = [n for n in names if n not in syms]
    if missing or _ANCHOR not in syms:
        raise Unsupported("pyfuse3's symbol table lacks its statics (a stripped build)")
    anchor = ctypes.cast(getattr(ctypes.CDLL(path), _ANCHOR), ctypes.c_void_p).value
    assert anchor is not None
    base = anchor - syms[_ANCHOR]
    return {n: base + syms[n] for n in names}
