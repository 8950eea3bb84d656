"""Spool files: in-progress downloads, hashed as they are written.

Writes go straight to the file descriptor (the page cache absorbs them, as
twisted.web.static's reads do on the reactor thread); the fsync that makes
the body durable runs in the I/O pool at commit time.
"""

from __future__ import annotations

import hashlib
import os
import tempfile


class SpoolFile:
    def __init__(self, spool_dir: str, prefix: str = "dl-") -> None:
        fd, self.path = tempfile.mkstemp(dir=spool_dir, prefix=prefix, suffix=".part")
        self.fd: int | None = fd
        self.size = 0
        self._sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        assert self.fd is not None, "spool already closed"
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self._sha256.update(data)
        self.size += len(data)

    def write_all(self, chunks: list[bytes]) -> int:
        """Write and hash several chunks in order, without joining them first."""
        n = 0
        for chunk in chunks:
            self.write(chunk)
            n += len(chunk)
        return n

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()

    def sync_and_close(self) -> None:
        """Blocking: call from the I/O pool."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def clear_spool(spool_dir: str) -> int:
    """Remove leftovers of downloads that never finished; returns how many."""
    os.makedirs(spool_dir, exist_ok=True)
    n = 0
    for name in os.listdir(spool_dir):
        try:
            os.unlink(os.path.join(spool_dir, name))
            n += 1
        except IsADirectoryError:
            pass
        except FileNotFoundError:
            pass
    return n

