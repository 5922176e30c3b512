"""The union's rules, as overlayfs states them: layers, lookup, whiteouts and opaque
directories, copy-up, merged listings, the container layer and the inode numbers.

Nothing here knows FUSE or the command line: operations take inode numbers and names
and return plain records (or raise :class:`OSError` with the errno to answer); the FUSE
layer (:mod:`unionfs.fuse`) turns them into replies.
"""
