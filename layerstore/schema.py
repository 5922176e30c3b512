"""THE description of the store's on-disk layout: every lmdb sub-database, key and value.

Directory layout under the store root (``--root``, ``$UNIONMOUNT_ROOT``,
``/var/lib/unionmount`` for root, ``$XDG_DATA_HOME/unionmount`` otherwise)::

    meta/                     the lmdb environment (sub-databases below)
    blobs/XX/HEX              file contents, named by XXH3-128 (32 hex digits,
                              XX = first two), immutable, mode 0444
    tmp/                      ingest temporaries; emptied when the store opens
    containers/NAME/upper     a container's writable layer (unionfs upper format)
    containers/NAME/work      its work directory
    containers/NAME/lock      flock()ed by the daemon that mounts it
    containers/NAME/mountpoint where that daemon mounted it
    volumes/NAME/_data        a volume's contents (as Docker lays them out)

Values are msgpack. Paths are bytes, layer-relative, without a leading slash;
the root directory is ``b""``.

Sub-databases
-------------
``blobs``    key: 16-byte XXH3-128 digest → ``[size, refs]``
             ``refs`` counts the layer entries (one per layer, per path) that
             use the blob. Invariant: every blob file on disk has a row, and a
             row with ``refs == 0`` is garbage for ``store gc``.
``layers``   key: diff_id (``b"sha256:<hex>"`` of the uncompressed tar), or for a layer taken by its
             table of contents ``b"toc:<hex>"`` (zstd:chunked, :mod:`layerstore.chunked`) or
             ``b"sgz:<hex>"`` (eStargz, :mod:`layerstore.estargz`), the TOC's sha256: its tar
             is never read, so no diff_id is verified
             → ``{"size": bytes of the layer's file contents, "entries": n,
             "created": unix seconds}``. A row exists only once all
             of the layer's entries and blobs are in the store (one transaction).
``entries``  key: layer key (as ``layers``) + ``b"\\0"`` + path → an entry record (below), the
             layer's own content as its tar said it (whiteouts and opaque marks
             included), for flattening new images and for diffs.
``sha256``   key: 32-byte sha256 of a file's contents → the 16-byte XXH3-128 digest of the blob
             holding them: what zstd:chunked and eStargz TOCs name files by, learned at every import.
             A hint: a row whose blob is gone counts for nothing (``store gc`` drops it).
``pending``  key: a file's 32-byte sha256 + layer key → ``[start, end, size]``: a file of a lazily
             pulled layer (zstd:chunked or eStargz) not fetched yet, and its range in the layer's blob
             (the layer's row has ``"origin": [registry host, repository, insecure, blob
             digest]``). Fetching it stores the blob, adds one reference to it for each
             layer whose row goes, and records it in ``sha256``, in one transaction.
``images``   key: ``b"name:tag"`` → image id (``b"sha256:<hex>"`` of the config; of the config's
             digest and the TOC keys, one per line, when a layer is kept by its TOC)
``configs``  key: image id → ``{"config": raw config JSON, "manifest": manifest
             digest, "layers": [layer key, ...] bottom first, "created": unix seconds,
             "repo_digests": ["REPO@sha256:...", ...]}`` (the last: registry digests it
             was pulled by, Docker's RepoDigests; absent in stores made before it)
``merged``   key: 32-byte raw image id + parent path + ``b"\\0"`` + name → an
             entry record of the image's flattened tree (no whiteouts),
             with ``ino`` and ``nlink`` filled. The children of one directory are
             contiguous (prefix scan). The root is the key with empty parent and
             empty name. Written once, when an image is imported.
``containers`` key: container name → ``{"image": image id, "created": unix seconds,
             "mounts": [{"Type", "Name", "Source", "Destination", "RW"}, ...]}``
             (``mounts``: the grafts of its last mount, for ``--volumes-from``
             and for telling which volumes are in use)
``volumes``  key: volume name → ``{"driver": "local", "options": {type, o, device},
             "labels": {...}, "created": unix seconds, "anonymous": bool,
             "populated": bool}`` (see :mod:`layerstore.volumes`)

ENTRY record: a msgpack array, in this order (see :class:`layerstore.entry.Entry`):
``[mode, uid, gid, mtime_ns, size, rdev, target, xattrs, blob, link, kind, ino, nlink(, sha256)]``
where ``target`` is a symlink target (bytes) or None, ``xattrs`` a map
bytes→bytes or None, ``blob`` a 16-byte digest or None (empty files point to the
empty blob), ``link`` the path of a hard-link target within the layer stack or
None, ``kind`` 0 = entry, 1 = whiteout, 2 = opaque directory marker, and
``ino``/``nlink`` are 0 outside ``merged``; ``sha256`` (32 bytes, only then present) marks a
regular file of a lazy pull whose contents are not fetched yet: ``blob`` is None, and the
``sha256`` table names its blob once it is there (``pending`` says where to fetch it).
"""

from __future__ import annotations

DB_NAMES = (
    b"blobs", b"layers", b"entries", b"images", b"configs", b"merged", b"containers", b"volumes", b"sha256", b"pending"
)  # fmt: skip
MAP_SIZE = 1 << 36  # 64 GiB of address space; the file grows only as needed
SEP = b"\0"

KIND_ENTRY = 0
KIND_WHITEOUT = 1
KIND_OPAQUE = 2
