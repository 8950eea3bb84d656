"""prometheus_client's multiprocess files with real blocks (docs/workers.rst, Metrics).

Each worker writes its samples into ``<data_dir>/metrics/<type>_<pid>.db``,
which prometheus_client's ``MmapedDict`` creates and grows with ``truncate``
and writes through a mapping: a sparse file. On a full disk (or tmpfs) the
first write into a page without a block is a SIGBUS, and the worker dies.
``install()`` (each worker, before any metric exists) makes prometheus_client
use ``AllocatedDict`` instead: a new file is allocated whole under a temporary
name and renamed into place (the collector never reads one half made), and
growing one allocates the new size first (``posix_fallocate``), so a write
through the mapping never needs a block. When the disk has no room for a new
file or a larger one, the samples of the series that did not fit stay in the
process (missing from ``/metrics`` meanwhile, and said once in the log) and
are all written into the file by the next write to it that finds room (one
attempt every ``RETRY`` seconds at most).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import time
from typing import Any

from prometheus_client.mmap_dict import _INITIAL_MMAP_SIZE, MmapedDict
from twisted.logger import Logger

from sparkcache.store.changes import allocate

log = Logger()

# Seconds between two attempts to find room for samples kept in memory.
RETRY = 10.0
_FULL = (errno.ENOSPC, errno.EDQUOT)
_DOUBLES = struct.Struct("dd")


def _entry_size(key: str) -> int:
    """Bytes ``MmapedDict._init_value`` appends for ``key`` (its layout)."""
    n = len(key.encode("utf-8"))
    return 4 + n + (8 - (n + 4) % 8) + 16


def _prepare(filename: str) -> None:
    """The file exists with at least its initial size in real blocks."""
    try:
        fd = os.open(filename, os.O_RDWR)
    except FileNotFoundError:
        # Not *.db: a reader globbing the directory never sees it before it is whole.
        tmp = f"{filename}.{os.getpid()}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            allocate(fd, _INITIAL_MMAP_SIZE)
            os.rename(tmp, filename)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return
    try:
        allocate(fd, max(os.fstat(fd).st_size, _INITIAL_MMAP_SIZE))
    finally:
        os.close(fd)


class AllocatedDict(MmapedDict):
    """``MmapedDict`` whose file never has a hole a write could fault on."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if read_mode:
            super().__init__(filename, read_mode=True)
            return
        self._fname = filename
        self._f: Any = None
        self._m: Any = None
        self._positions: dict[str, int] = {}
        self._capacity = 0
        self._used = 0
        self._memory: dict[str, tuple[float, float]] = {}  # series with no room in the file yet
        self._retry_at = 0.0
        self._full = False
        self._room([])

    def _open(self) -> None:
        _prepare(self._fname)
        MmapedDict.__init__(self, self._fname)

    def _init_value(self, key: str) -> None:
        capacity = self._capacity
        while self._used + _entry_size(key) > capacity:
            capacity *= 2
        if capacity > self._capacity:
            # The blocks first (ENOSPC here leaves the file and its mapping as
            # they were), then the mapping; MmapedDict then has no growing to do.
            allocate(self._f.fileno(), capacity)
            self._capacity = capacity
            self._m = mmap.mmap(self._f.fileno(), capacity)
        super()._init_value(key)

    def _room(self, keys: list[str]) -> bool:
        """Slots in the file for ``keys`` and for every series held in memory
        (opening the file first if need be); False when the disk has no room
        (tried again after ``RETRY`` seconds)."""
        now = time.monotonic()
        if now < self._retry_at:
            return False
        try:
            if self._m is None:
                self._open()
            for key in [*self._memory, *keys]:
                if key not in self._positions:
                    self._init_value(key)
                held = self._memory.pop(key, None)
                if held is not None:
                    pos = self._positions[key]
                    self._m[pos:pos + 16] = _DOUBLES.pack(*held)
        except OSError as e:
            if e.errno not in _FULL:
                raise
            self._retry_at = now + RETRY
            if not self._full:
                self._full = True
                log.warn("metrics: no room for {file} ({e}): samples of new series stay in this worker "
                         "(missing from /metrics) until there is", file=os.path.basename(self._fname), e=e.strerror)
            return False
        if self._full:
            self._full = False
            log.info("metrics: {file} has room again", file=os.path.basename(self._fname))
        return True

    def read_value(self, key: str) -> tuple[float, float]:
        if key not in self._positions and not self._room([key]):
            return self._memory.setdefault(key, (0.0, 0.0))
        value: tuple[float, float] = super().read_value(key)
        return value

    def write_value(self, key: str, value: float, timestamp: float) -> None:
        pos = self._positions.get(key)  # every inc/set: as cheap as MmapedDict's own
        if pos is None or self._memory:
            # A new series, or some held in memory: each write tries (at most every RETRY s) to place them.
            if not self._room([key]) and pos is None:
                self._memory[key] = (value, timestamp)
                return
            pos = self._positions[key]
        self._m[pos:pos + 16] = _DOUBLES.pack(value, timestamp)

    def close(self) -> None:
        if self._f is not None:
            super().close()


def install() -> None:
    """prometheus_client's multiprocess values use ``AllocatedDict`` from now on
    (its value class looks the name up each time it opens a file)."""
    from prometheus_client import values

    values.MmapedDict = AllocatedDict  # type: ignore[misc]
