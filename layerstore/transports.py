"""Image sources by skopeo's transport names: ``oci:DIR[:REF]``, ``oci-archive:FILE[:REF]``,
``docker-archive:FILE[:REF]`` (:mod:`layerstore.oci`) and ``docker://REFERENCE`` (a registry,
:mod:`layerstore.registry`). The one place that knows every transport.
"""

from __future__ import annotations

import json

from . import oci
from .oci import ImageSource, SourceError, SourceOptions


def parse(spec: str, opts: SourceOptions | None = None) -> ImageSource:
    """Open ``oci:DIR[:REF]``, ``oci-archive:FILE[:REF]``, ``docker-archive:FILE[:REF]`` or ``docker://REFERENCE``."""
    opts = opts or SourceOptions()
    transport, _, rest = spec.partition(":")
    if not rest:
        raise SourceError(
            f"'{spec}' is not TRANSPORT:PATH (oci:DIR[:REF], oci-archive:FILE[:REF], docker-archive:FILE[:REF], "
            "docker://REF)"
        )
    if transport == "docker":
        from .registry import open_registry

        src = open_registry(rest, opts)
    elif transport in ("oci", "oci-archive", "docker-archive"):
        path, ref = oci.split_ref(rest)
        if transport == "docker-archive":
            src = oci.docker_archive(path, ref)
        else:
            src = (oci.layout if transport == "oci" else oci.oci_archive)(path, ref, opts)
    else:
        raise SourceError(f"unknown transport '{transport}' (use oci:, oci-archive:, docker-archive: or docker://)")
    if opts.platform is not None:
        try:
            _check_platform(src.config, opts.platform)
        except BaseException:
            src.close()
            raise
    return src


def _check_platform(config: bytes, want: str) -> None:
    """Refuse an image whose config names another platform than ``want`` (as ``docker pull --platform``)."""
    try:
        cfg = json.loads(config)
        have = [cfg.get("os"), cfg.get("architecture"), cfg.get("variant")]
    except (ValueError, AttributeError):
        raise SourceError("the image config is not a JSON object") from None
    wanted = (want.split("/") + [None])[:3]
    if any(h and w and h != w for h, w in zip(have, wanted, strict=True)):
        raise SourceError(f"the image is for {'/'.join(filter(None, have))}, not {want}")
