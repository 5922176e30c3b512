"""The FUSE layer: the request loop, the handlers that turn FUSE requests into calls on
the union (:mod:`unionfs.union`) and its records into replies, and the control channel a
mounted daemon answers on its root (:mod:`unionfs.fuse.control`).

This is the only package that speaks pyfuse3 or the kernel's wire format.
"""
