"""Names users give things: containers, volumes, image references. Docker's grammar and limits, checked once.

Every name is checked before anything is written under it (an lmdb key, a directory
in the store), so a name that passes here can always be stored, listed, looked up
and removed: it fits an lmdb key (511 bytes) and a file name (255 bytes). A name
that fails gets one line saying what the grammar is.
"""

from __future__ import annotations

import re

#: containers and volumes: Docker's ``[a-zA-Z0-9][a-zA-Z0-9_.-]`` (podman's: one character is enough)
_OBJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: at most this many characters (Docker has no limit but the file system's; ours leaves room in every key and path)
OBJECT_MAX = 128
#: an image reference's repository (host and path), as Docker's reference package limits it
REPOSITORY_MAX = 255
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class InvalidName(Exception):
    """A name outside the grammar (the message is one line for the user)."""


def _object(kind: str, name: str) -> str:
    if not name:
        raise InvalidName(f"a {kind} name cannot be empty")
    if len(name) > OBJECT_MAX:
        raise InvalidName(f"{kind} name '{name[:24]}...' is {len(name)} characters long (at most {OBJECT_MAX})")
    if not _OBJECT_RE.fullmatch(name):
        raise InvalidName(f"invalid {kind} name '{name}' (letters, digits, '_', '.', '-'; the first a letter or digit)")
    return name


def container(name: str) -> str:
    """``name`` if it is a valid container name."""
    return _object("container", name)


def volume(name: str) -> str:
    """``name`` if it is a valid volume name."""
    return _object("volume", name)


def is_container(name: str) -> bool:
    return bool(name) and len(name) <= OBJECT_MAX and _OBJECT_RE.fullmatch(name) is not None


is_volume = is_container


def tag(text: str) -> str:
    """``text`` if it is a valid tag (Docker: word characters, '.', '-', at most 128)."""
    if not TAG_RE.fullmatch(text):
        raise InvalidName(f"invalid tag '{text}' (letters, digits, '_', '.', '-'; at most 128; not first '.' or '-')")
    return text


def repository_length(name: str) -> None:
    """Docker's limit on a reference's repository part (``HOST/PATH`` before ``:TAG`` or ``@DIGEST``)."""
    repo = name.split("@", 1)[0]
    last = repo.rsplit("/", 1)
    if ":" in last[-1]:
        repo = repo[: len(repo) - len(last[-1]) + last[-1].index(":")]
    if len(repo) > REPOSITORY_MAX:
        raise InvalidName(f"image name '{name[:24]}...' is longer than {REPOSITORY_MAX} characters")
