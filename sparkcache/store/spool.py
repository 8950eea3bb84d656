"""Spool files: in-progress downloads and uploads, hashed as they are written.

Writes go straight to the file descriptor (the page cache absorbs them, as
twisted.web.static's reads do on the reactor thread); the fsync that makes
the body durable runs in the I/O pool at commit time. Whoever reads a spool
(a request handler parsing an upload, a git job reading its scratch file)
does so through :meth:`SpoolFile.reader`, never by opening its path.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from typing import Any

COPY_CHUNK = 1 << 20


class SpoolFile:
    def __init__(self, spool_dir: str, prefix: str = "dl-", hashed: bool = True) -> None:
        """``hashed=False`` for scratch files that never become entries: no
        sha256 is computed over their bytes."""
        fd, self.path = tempfile.mkstemp(dir=spool_dir, prefix=prefix, suffix=".part")
        self.fd: int | None = fd
        self.size = 0
        self._sha256: Any = hashlib.sha256() if hashed else None
        # Further digests a production must check (npm's sha512 integrity).
        self._also: dict[str, Any] = {}
        self._hash_later = False

    def write(self, data: bytes) -> None:
        assert self.fd is not None, "spool already closed"
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)
        if self._hash_later:
            return
        if self._sha256 is not None:
            self._sha256.update(data)
        for h in self._also.values():
            h.update(data)

    def write_all(self, chunks: list[bytes]) -> int:
        """Write and hash several chunks in order, without joining them first."""
        n = 0
        for chunk in chunks:
            self.write(chunk)
            n += len(chunk)
        return n

    def defer_hashing(self) -> None:
        """From now on ``write`` only writes; the writer hands the very same
        chunks, in order, to ``hash_chunks`` (in another thread: the two
        overlap) before a digest is read. ``write`` touches the descriptor and
        ``size``, ``hash_chunks`` the hash objects: one thread may run each."""
        self._hash_later = True

    def hash_chunks(self, chunks: list[bytes]) -> int:
        """Blocking (hashlib lets go of the GIL on large buffers): add chunks
        written with hashing deferred to every digest; returns their length."""
        hashes = ([self._sha256] if self._sha256 is not None else []) + list(self._also.values())
        n = 0
        for chunk in chunks:
            for h in hashes:
                h.update(chunk)
            n += len(chunk)
        return n

    def append_from(self, other: "SpoolFile") -> int:
        """Blocking (call from the I/O pool): append all of ``other``'s bytes,
        hashed as they are written; returns how many."""
        with other.reader() as src:
            n = 0
            while True:
                chunk = src.read(COPY_CHUNK)
                if not chunk:
                    return n
                self.write(chunk)
                n += len(chunk)

    def reader(self) -> "SpoolReader":
        """A read-only file object over the bytes written so far, with a
        descriptor of its own (the caller closes it); it stays readable after
        the spool is discarded."""
        return SpoolReader(self.path)

    def also_hash(self, algorithm: str) -> None:
        """Compute ``algorithm`` (a hashlib name) over the bytes too; call
        before the first write."""
        assert self.size == 0, "also_hash after bytes were written"
        if algorithm != "sha256" and algorithm not in self._also:
            self._also[algorithm] = hashlib.new(algorithm)

    def hexdigest_of(self, algorithm: str) -> str:
        """The hex digest in ``algorithm`` (sha256, or one asked for with also_hash)."""
        if algorithm == "sha256":
            return self.hexdigest()
        return str(self._also[algorithm].hexdigest())

    def hashes(self, algorithm: str) -> bool:
        """Whether ``algorithm`` is computed as bytes are written."""
        return algorithm == "sha256" or algorithm in self._also

    def rehash(self, algorithm: str) -> str:
        """Blocking (call from the I/O pool): the hex digest in ``algorithm`` of
        the bytes written so far, read back from the file."""
        h = hashlib.new(algorithm)
        with self.reader() as src:
            while True:
                chunk = src.read(COPY_CHUNK)
                if not chunk:
                    return h.hexdigest()
                h.update(chunk)

    def hexdigest(self) -> str:
        assert self._sha256 is not None, "a scratch spool has no digest"
        return str(self._sha256.hexdigest())

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


class SpoolReader:
    """A seekable, read-only file object over a spool file (``read``, ``readline``,
    ``seek``, ``tell``, ``pread``), as tarfile, json and git's bundle parsing want.

    Reads use ``pread`` on a descriptor of its own, so the writer's position
    is never disturbed. A thread may read while the reactor closes it: close
    waits for the read in progress, so the descriptor is never reused under it.
    """

    def __init__(self, path: str) -> None:
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self._pos = 0
        self._lock = threading.Lock()

    def __enter__(self) -> "SpoolReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._fd is None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset``; the position does not move."""
        with self._lock:
            if self._fd is None:
                raise ValueError("spool reader closed")
            return os.pread(self._fd, n, offset) if n > 0 else b""

    def size(self) -> int:
        with self._lock:
            if self._fd is None:
                raise ValueError("spool reader closed")
            return os.fstat(self._fd).st_size

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            chunks: list[bytes] = []
            while True:
                chunk = self.read(COPY_CHUNK)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        data = self.pread(n, self._pos)
        self._pos += len(data)
        return data

    def readline(self, limit: int | None = -1) -> bytes:
        out = bytearray()
        while limit is None or limit < 0 or len(out) < limit:
            want = 4096 if limit is None or limit < 0 else min(4096, limit - len(out))
            chunk = self.pread(want, self._pos)
            if not chunk:
                break
            end = chunk.find(b"\n")
            if end >= 0:
                chunk = chunk[:end + 1]
            out += chunk
            self._pos += len(chunk)
            if end >= 0:
                break
        return bytes(out)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self.size() + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)


def clear_spool(spool_dir: str) -> int:
    """Remove leftovers of downloads that never finished; returns how many
    had bytes (the empty files a process keeps made for its next misses,
    ``Store.spool``, are no download)."""
    os.makedirs(spool_dir, exist_ok=True)
    n = 0
    for name in os.listdir(spool_dir):
        path = os.path.join(spool_dir, name)
        try:
            started = os.lstat(path).st_size > 0
            os.unlink(path)
            n += started
        except IsADirectoryError:
            pass
        except FileNotFoundError:
            pass
    return n
