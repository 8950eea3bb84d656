"""Crate names, versions and where the sparse index keeps them.

Cargo's "Registry index" docs fix the layout: the index file of a crate sits
at a path computed from its lower-cased name (``1/a``, ``2/ab``, ``3/a/abc``,
``ab/cd/abcd...``), and a download URL template may name the same split
(``{prefix}``, ``{lowerprefix}``). A request whose index path is not the one
its name computes to is refused: there is exactly one store key per crate.
"""

from __future__ import annotations

import re

from sparkcache.web.errors import HTTPError

# cargo's own rule (restricted_names.rs) narrowed to ASCII, as crates.io and
# the index docs require: a letter or ``_`` first, then letters, digits, ``-``
# and ``_``; crates.io's limit of 64 characters.
MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,%d}\Z" % (MAX_NAME - 1))
# Every version in an index is semver (cargo refuses anything else).
_VERSION = re.compile(
    r"(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?\Z"
)
MAX_VERSION = 128
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def valid_name(name: str) -> bool:
    return _NAME.match(name) is not None


def valid_version(version: str) -> bool:
    return len(version) <= MAX_VERSION and _VERSION.match(version) is not None


def valid_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.match(value) is not None


def check_name(name: str) -> str:
    """``name`` when it is a crate name the index can hold; a 400 otherwise."""
    if not valid_name(name):
        raise HTTPError(400, f"invalid crate name {name[:80]!r}: ASCII letters, digits, '-' and '_', "
                             f"starting with a letter or '_', at most {MAX_NAME} characters")
    return name


def check_version(version: str) -> str:
    if not valid_version(version):
        raise HTTPError(400, f"invalid crate version {version[:80]!r}: not a semver version")
    return version


def prefix(name: str) -> str:
    """The directory part of a crate's index path, in the name's own case
    (``{prefix}`` of a ``dl`` template): ``1``, ``2``, ``3/a``, ``ab/cd``."""
    if len(name) <= 2:
        return str(len(name))
    if len(name) == 3:
        return f"3/{name[0]}"
    return f"{name[0:2]}/{name[2:4]}"


def index_path(name: str) -> str:
    """Where the index keeps ``name``'s file, relative to the index root (lower case)."""
    lower = name.lower()
    return f"{prefix(lower)}/{lower}"


def name_of_index_path(segments: list[str]) -> str:
    """The crate name whose index file ``segments`` (relative to the index root)
    is; a 400 for a bad name or a path that is not the one its name computes to."""
    if not segments or any(s == "" for s in segments):
        raise HTTPError(404, "no index file named; cargo asks for index/config.json and index/<prefix>/<name>")
    name = check_name(segments[-1])
    if name != name.lower():
        raise HTTPError(400, f"index paths are lower case: {'/'.join(segments)!r} names {name.lower()!r}")
    if "/".join(segments) != index_path(name):
        raise HTTPError(400, f"wrong index path {'/'.join(segments)[:200]!r} for crate {name!r}: "
                             f"its file is at {index_path(name)!r}")
    return name
