"""Free space on the data dir's filesystem: the floor, write errors, the reserve.

Everything here that touches the filesystem blocks: call it from the I/O pool.

- The floor (``storage.min_free``): below it the store evicts, least recently
  used first, and counts as short of space (``Store.low_space``, ``/ready``).
- Write errors: a spool write, fsync, rename or index commit that fails with
  ENOSPC, EDQUOT, EIO, EROFS or SQLite's "database or disk is full" ends the
  fetch, and the store counts as unwritable for a while, so the misses in
  between are passed through instead of failing one by one.
- The reserve: a small file of real blocks kept in the data dir. SQLite needs
  room for its write-ahead log even to delete rows, so on a disk filled by
  something else an index deletion (a purge, an eviction) would fail; the
  store then releases the reserve, retries, and makes it again once there is
  room.
"""

from __future__ import annotations

import errno
import mmap
import os
import sqlite3
import struct
from dataclasses import dataclass
from typing import Any

from sparkcache.store.cas import remove_file
from sparkcache.store.changes import allocate, flocked

GiB = 1 << 30
MiB = 1 << 20
# The floor when ``storage.min_free`` is not set: the smaller of these.
DEFAULT_FLOOR_BYTES = 1 * GiB
DEFAULT_FLOOR_PERCENT = 5.0
RESERVE_NAME = "reserve.bin"
RESERVE_MIN = 256 << 10
RESERVE_MAX = 16 * MiB

# What a write error looks like when the disk, not the body, is at fault.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})
SQLITE_FULL = 13
# With worker processes: the state above, shared (SharedSpace).
SHARED_NAME = "space.state"


@dataclass(frozen=True)
class Space:
    free: int  # bytes an unprivileged writer may still use
    total: int  # the filesystem's size


def measure(path: str) -> Space:
    st = os.statvfs(path)
    return Space(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)


def floor_of(total: int, min_free: int | None, min_free_percent: float | None) -> int:
    """The free-space floor in bytes for a filesystem of ``total`` bytes."""
    if min_free is not None:
        return min_free
    if min_free_percent is not None:
        return int(total * min_free_percent / 100)
    return min(DEFAULT_FLOOR_BYTES, int(total * DEFAULT_FLOOR_PERCENT / 100))


def reserve_size(total: int) -> int:
    return max(RESERVE_MIN, min(RESERVE_MAX, total // 256))


def is_write_error(e: BaseException) -> bool:
    """Whether ``e`` says the disk could not take a write (not that the body was bad)."""
    if isinstance(e, OSError):
        return e.errno in WRITE_ERRNOS
    if isinstance(e, sqlite3.OperationalError):
        return is_sqlite_full(e)
    cause = e.__cause__ or e.__context__
    return cause is not None and cause is not e and is_write_error(cause)


def is_sqlite_full(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and (
        getattr(e, "sqlite_errorcode", None) == SQLITE_FULL or "full" in str(e))


def make_reserve(path: str, size: int) -> bool:
    """Create the reserve file with ``size`` bytes of real blocks; False when
    there is no room (a partial file is removed)."""
    if os.path.exists(path):
        return True
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.write(fd, b"\0" * size)  # a filesystem without fallocate
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        return False


def release_reserve(path: str) -> int:
    """Delete the reserve file; returns the bytes freed."""
    return remove_file(path)


def reset_shared(data_dir: str) -> None:
    """Blocking: forget a previous run's shared state (the supervisor, before any worker starts)."""
    try:
        os.unlink(os.path.join(data_dir, SHARED_NAME))
    except FileNotFoundError:
        pass


class SharedSpace:
    """The free-space state every worker process sees (``server.workers > 1``).

    ``<data_dir>/space.state``, mapped into each worker (as
    :mod:`sparkcache.store.changes`): whether the store is below its floor,
    the bytes free and the floor at the last check, when the last write error
    happened (wall-clock seconds, as the reactor's clock; 0: never) and its
    text; the store's size and entry count (each commit adds to them,
    each eviction or purge counts them anew); and the room a worker that does
    not evict wanted (``want_room``), for the primary to make. A write error or a low disk seen
    by one worker makes every worker pass misses through, and every worker's
    /health, /ready and status page say the same.
    Reads are memory reads (the miss path asks ``low_space`` and
    ``write_failed_at``); writes are rare, and the error text is written and
    read under ``flock`` so nobody sees it half written."""

    _LOW, _FREE, _FLOOR, _FAILED_AT, _ERROR_LEN, _SIZE, _ENTRIES, _WANTED = 0, 8, 16, 24, 32, 40, 48, 56
    _ERROR = 64
    ERROR_MAX = 448
    SIZE = _ERROR + ERROR_MAX

    def __init__(self, path: str) -> None:
        """Blocking (start-up): opens or creates the file and maps it."""
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < self.SIZE:
            os.ftruncate(self._fd, self.SIZE)  # zeros: not low, never failed
        allocate(self._fd, self.SIZE)
        self._map = mmap.mmap(self._fd, self.SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _get(self, fmt: str, offset: int) -> Any:
        return struct.unpack_from(fmt, self._map, offset)[0]

    def _put(self, fmt: str, offset: int, value: Any) -> None:
        struct.pack_into(fmt, self._map, offset, value)

    @property
    def low_space(self) -> bool:
        return bool(self._get("<Q", self._LOW))

    @low_space.setter
    def low_space(self, value: bool) -> None:
        self._put("<Q", self._LOW, 1 if value else 0)

    @property
    def free(self) -> int | None:
        value = self._get("<q", self._FREE)
        return None if value < 0 else int(value)

    @free.setter
    def free(self, value: int | None) -> None:
        self._put("<q", self._FREE, -1 if value is None else value)

    @property
    def floor(self) -> int:
        return int(self._get("<Q", self._FLOOR))

    @floor.setter
    def floor(self, value: int) -> None:
        self._put("<Q", self._FLOOR, value)

    @property
    def size(self) -> int:
        return int(self._get("<Q", self._SIZE))

    @size.setter
    def size(self, value: int) -> None:
        self._put("<Q", self._SIZE, max(0, value))

    @property
    def entries(self) -> int:
        return int(self._get("<Q", self._ENTRIES))

    @entries.setter
    def entries(self, value: int) -> None:
        self._put("<Q", self._ENTRIES, max(0, value))

    def want_room(self, need: int) -> None:
        """A worker that does not evict found too little room for ``need`` bytes:
        the primary evicts for the largest such need within a second."""
        with flocked(self._fd):
            self._put("<Q", self._WANTED, max(self._get("<Q", self._WANTED), need + 1))

    def take_wanted(self) -> int | None:
        """The room wanted since the last call (None: none); a memory read when there is none."""
        if not self._get("<Q", self._WANTED):
            return None
        with flocked(self._fd):
            wanted = int(self._get("<Q", self._WANTED))
            self._put("<Q", self._WANTED, 0)
        return wanted - 1 if wanted else None

    @property
    def write_failed_at(self) -> float | None:
        value = self._get("<d", self._FAILED_AT)
        return None if value == 0.0 else float(value)

    @write_failed_at.setter
    def write_failed_at(self, value: float | None) -> None:
        self._put("<d", self._FAILED_AT, 0.0 if value is None else value)

    @property
    def write_error(self) -> str | None:
        with flocked(self._fd):
            n = self._get("<Q", self._ERROR_LEN)
            raw = bytes(self._map[self._ERROR:self._ERROR + min(n, self.ERROR_MAX)])
        return raw.decode("utf-8", "replace") if n else None

    @write_error.setter
    def write_error(self, value: str | None) -> None:
        raw = (value or "").encode("utf-8")[:self.ERROR_MAX]
        with flocked(self._fd):
            self._map[self._ERROR:self._ERROR + len(raw)] = raw
            self._put("<Q", self._ERROR_LEN, len(raw) if value is not None else 0)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
