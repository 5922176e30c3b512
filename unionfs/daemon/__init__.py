"""The daemon's wiring: a mount's configuration (``-o``, ``-v``, ``--mount``), the
grafts resolved against the store, private views of layers, and the mount's life from
the first request to the last lease released (:func:`unionfs.daemon.mount.mount`).
"""
