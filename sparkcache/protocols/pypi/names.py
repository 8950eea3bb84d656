"""Project names and file names of a PyPI index.

A project name is normalized as PEP 503 says (lower case, each run of ``-``,
``_`` and ``.`` one ``-``) in every URL and store key; a name that is not a
valid PEP 508 distribution name never reaches the store or an upstream. File
names become the last segment of store paths and cache URLs, so only the
characters real distributions use are allowed.
"""

from __future__ import annotations

import re

# PEP 508: letters, digits, and ._- inside, starting and ending with a letter or digit.
_VALID_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_RUNS = re.compile(r"[-_.]+")
# Wheels, sdists, eggs: what a distribution's file name is made of. No slash,
# no leading dot, nothing that needs quoting beyond '+' and '!' (local versions, epochs).
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+!~-]*")
MAX_NAME = 200
MAX_FILENAME = 255
METADATA_SUFFIX = ".metadata"


class BadName(ValueError):
    """A project or file name that cannot be one."""


def is_valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME and _VALID_NAME.fullmatch(name) is not None


def normalize(name: str) -> str:
    """The PEP 503 normalized form of ``name``."""
    return _RUNS.sub("-", name).lower()


def project(name: str) -> str:
    """``name`` normalized; BadName when it is not a valid distribution name."""
    if not is_valid_name(name):
        raise BadName(f"{name[:100]!r} is not a valid project name (PEP 508)")
    return normalize(name)


def is_valid_filename(filename: str) -> bool:
    """Whether ``filename`` may name a distribution file here (``.metadata`` is
    the PEP 658 sidecar's suffix, so no distribution file may end with it)."""
    return (len(filename) <= MAX_FILENAME and _FILENAME.fullmatch(filename) is not None
            and not filename.endswith(METADATA_SUFFIX) and ".." not in filename)


def filename_project(filename: str) -> str | None:
    """The normalized project a wheel or sdist file name belongs to, as far as
    the name says: a wheel's first component; for an sdist
    (``name-version.tar.gz``), everything before the last ``-``."""
    if filename.endswith(".whl"):
        return normalize(filename.split("-", 1)[0])
    for ext in (".tar.gz", ".zip", ".tar.bz2", ".tar.xz", ".tgz", ".tar"):
        if filename.endswith(ext):
            stem = filename[: -len(ext)]
            name, sep, _version = stem.rpartition("-")
            return normalize(name) if sep and name else None
    return None


def belongs_to(filename: str, name: str) -> bool:
    """Whether ``filename`` is a file of the (normalized) project ``name``."""
    return filename_project(filename) == name


def version_of(filename: str, name: str) -> str | None:
    """The version a distribution file name carries (for JSON ``versions``)."""
    if filename.endswith(".whl"):
        parts = filename.split("-")
        return parts[1] if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip", ".tar.bz2", ".tar.xz", ".tgz", ".tar"):
        if filename.endswith(ext):
            stem = filename[: -len(ext)]
            head, sep, version = stem.rpartition("-")
            return version if sep and normalize(head) == name and version else None
    return None
