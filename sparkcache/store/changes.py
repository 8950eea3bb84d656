"""Change stamps shared by worker processes: when may an in-memory index row be trusted?

With ``server.workers > 1`` each worker keeps its own in-memory rows
(``Index._mem``), and another worker may purge or replace the entry behind
one. Asking SQLite on every hit (``PRAGMA data_version``) costs a thread hop
the hit path must not pay. Instead ``<data_dir>/index.changes`` holds
counters, mapped into every worker's memory: one global (bumped by purges of
a remote or of everything) and ``SLOTS`` per-key slots (a key hashes to one;
bumped when that key's row is replaced or deleted). A worker notes the
stamp (global, slot) when it caches a row and trusts the row while the stamp
is unchanged: checking is two memory reads, no system call.

Writers bump in the SQLite thread right after their transaction committed
and before any body is unlinked, so a worker that reads the old stamp can
only serve a body that still exists; once the purge is answered, every
worker sees the new stamp. A bump is a read-modify-write under ``flock``
(several workers may bump at once); a crash between commit and bump leaves
at most a cached row whose body was not unlinked yet (the unlink comes after
the bump). ``Index.watch_changes()`` turns this on (a worker process).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import struct
import sys
from typing import Iterator

SLOTS = 4096
_WORD = struct.Struct("<Q")
_GLOBAL = 0
# The file's words are little-endian (``_WORD``); a native view of them reads the same values only here.
_NATIVE = sys.byteorder == "little" and struct.calcsize("Q") == _WORD.size


def allocate(fd: int, size: int) -> None:
    """Give a mapped file its blocks now. A page of a sparse file is allocated
    at its first write through the mapping, and on a full disk (a full tmpfs)
    that write kills the process with SIGBUS instead of failing: with real
    blocks from the start, later writes never allocate."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        # A filesystem without fallocate stays sparse (writing zeros could
        # overwrite what another worker wrote meanwhile); a full one fails here, at start.
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


@contextlib.contextmanager
def flocked(fd: int) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``fd`` (a mapped file's read-modify-write
    against the other workers'): brief, so the reactor may take it."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=16384)  # every hit of a worker checks its key's slot
def slot_of(key: str) -> int:
    return 1 + int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") % SLOTS


class ChangeCounters:
    def __init__(self, path: str, slots: int = SLOTS) -> None:
        """Blocking (start-up): opens or creates the counter file and maps it."""
        self.path = path
        size = _WORD.size * (2 + slots)
        self._purges = 1 + slots  # the last word: the purge epoch (Store.epoch)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)  # zeros; idempotent when two workers race here
        allocate(self._fd, size)
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The words as native integers: a read is one index (an aligned 8-byte
        # load), where struct.unpack_from builds a tuple: ``valid`` runs on
        # every hit of a worker (a quarter of the microseconds).
        self._words: memoryview | None = memoryview(self._map).cast("Q") if _NATIVE else None

    def _read(self, index: int) -> int:
        words = self._words
        if words is not None:
            return int(words[index])
        return int(_WORD.unpack_from(self._map, index * _WORD.size)[0])

    def stamp(self, key: str) -> tuple[int, int]:
        """Note this with a row cached now; the row is current while ``valid``."""
        return self._read(_GLOBAL), self._read(slot_of(key))

    def valid(self, key: str, stamp: tuple[int, int]) -> bool:
        """Whether ``key``'s row cached with ``stamp`` is still current: two memory reads."""
        words = self._words
        if words is not None:
            return bool(words[_GLOBAL] == stamp[0] and words[slot_of(key)] == stamp[1])
        return self.stamp(key) == stamp

    def bump(self, key: str | None) -> int:
        """Blocking (the SQLite thread): ``key``'s row was replaced or deleted;
        None: any number of rows were (a purge of a remote or of everything).
        Returns the counter's new value."""
        return self._bump(_GLOBAL if key is None else slot_of(key))

    def purge_epoch(self) -> int:
        """How many purges (of a key, a remote, everything) any worker began."""
        return self._read(self._purges)

    def bump_purge(self) -> int:
        """A purge begins (before its rows go); returns its epoch. (A read-
        modify-write under flock: microseconds, so the reactor may call it.)"""
        return self._bump(self._purges)

    def _bump(self, index: int) -> int:
        with flocked(self._fd):
            value = self._read(index) + 1
            _WORD.pack_into(self._map, index * _WORD.size, value)
        return value

    def close(self) -> None:
        if self._words is not None:
            self._words.release()  # a mapping with a view exported cannot close
            self._words = None
        self._map.close()
        os.close(self._fd)
