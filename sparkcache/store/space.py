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
import os
import sqlite3
from dataclasses import dataclass

from sparkcache.store.cas import remove_file

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
