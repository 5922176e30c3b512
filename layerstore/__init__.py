"""The content-addressed layer store: images, layers, containers, volumes.

Images come in from OCI layouts, ``docker save`` archives and registries
(:mod:`layerstore.oci`, :mod:`layerstore.registry`); their files are kept once per
content (:mod:`layerstore.blobs`) and their trees in lmdb (:mod:`layerstore.schema`).
The union daemon in :mod:`unionfs` reads them as lower layers.
"""
