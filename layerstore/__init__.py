"""The content-addressed layer store (images, layers, containers, volumes).

Not built yet: the union daemon in :mod:`unionfs` currently stacks plain
directories. The store will provide another kind of lower layer with the same
surface as :class:`unionfs.layers.DirLayer` (stat, list, open, readlink, xattrs).
"""
