"""Content-addressed bodies.

Bodies are named by their sha256, so identical bodies under different cache
keys are stored once and a path can never be steered by a request string.
Everything here blocks on the filesystem: call it from the I/O thread pool.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any, Iterator

from zope.interface import Attribute, Interface, implementer

_HEX64 = re.compile(r"[0-9a-f]{64}")


class IContentStore(Interface):
    """Where complete, verified bodies live.

    A shared S3-compatible bucket for several daemons is meant to be another
    implementation of this interface, not a rewrite of the cache.
    """

    def local_path(digest: str) -> str:
        """A local file path from which the body can be read and sent."""

    def open(digest: str) -> int:
        """A file descriptor open for reading the body (the caller closes it);
        FileNotFoundError when it is absent. Cheap enough to call on the
        reactor: a tier that must download first does so before, not here."""

    def contains(digest: str) -> bool:
        """Whether the body is present."""

    def commit(spool_path: str, digest: str) -> bool:
        """Move a complete, fsynced spool file into place.

        Returns False when the body already existed (the spool is removed)."""

    def remove(digest: str) -> int:
        """Delete a body; returns the bytes freed (0 if absent)."""

    def iter_digests() -> Iterator[tuple[str, int]]:
        """Every stored (digest, size)."""


class IBackedContentStore(IContentStore):
    """Bodies kept elsewhere (an S3 bucket shared by several hosts), with a
    local tier that the IContentStore methods work on: what ``open`` and
    ``local_path`` give is the tier's copy. ``Store`` uploads before a commit,
    fills the tier before a hit (``ensure``), and checks no rows against the
    tier at start-up (a row without a tier copy is normal)."""

    writable = Attribute("Whether new bodies can be stored now (the backing store answers)")
    shared_index = Attribute("Index entries shared with other hosts (s3/published.py SharedIndex), or None")

    def start() -> Any:
        """A Deferred: ready to serve (the tier scanned)."""

    def stop() -> Any:
        """A Deferred: connections closed."""

    def upload(spool_path: str, digest: str, size: int) -> Any:
        """A Deferred: the complete, fsynced body is in the backing store."""

    def ensure(digest: str, size: int) -> Any:
        """A Deferred firing True once the tier holds the body, False when the
        backing store does not have it (a miss)."""


@implementer(IContentStore)
class LocalContentStore:
    """``<root>/sha256/ab/abcdef…`` on the local filesystem."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.base = os.path.join(self.root, "sha256")
        os.makedirs(self.base, exist_ok=True)

    def local_path(self, digest: str) -> str:
        # Once per hit: a format string costs a fraction of os.path.join.
        if not _HEX64.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return f"{self.base}/{digest[:2]}/{digest}"

    def open(self, digest: str) -> int:
        return os.open(self.local_path(digest), os.O_RDONLY)

    def contains(self, digest: str) -> bool:
        return os.path.exists(self.local_path(digest))

    def commit(self, spool_path: str, digest: str) -> bool:
        dest = self.local_path(digest)
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(dest):
            os.unlink(spool_path)
            return False
        os.replace(spool_path, dest)
        # The rename is only durable once the directory entry is on disk.
        fsync_dir(parent)
        return True

    def remove(self, digest: str) -> int:
        return remove_file(self.local_path(digest))

    def iter_digests(self) -> Iterator[tuple[str, int]]:
        for sub in sorted(os.listdir(self.base)):
            d = os.path.join(self.base, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                p = os.path.join(d, name)
                if _HEX64.fullmatch(name) and name[:2] == sub:
                    try:
                        yield name, os.stat(p).st_size
                    except FileNotFoundError:
                        continue
                else:
                    # Stray file (an interrupted tool, a human): not ours to serve.
                    try:
                        os.unlink(p)
                    except OSError:
                        pass


def remove_file(path: str) -> int:
    """Delete a file; returns the bytes freed (0 if absent)."""
    try:
        size = os.stat(path).st_size
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return size


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:  # pragma: no cover - platforms without O_DIRECTORY
        if e.errno in (errno.EINVAL, errno.ENOTDIR):
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
