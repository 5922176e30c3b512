"""unionmount's FUSE daemon: a union of layers with overlayfs semantics, in userspace."""

__version__ = "0.1.0"
