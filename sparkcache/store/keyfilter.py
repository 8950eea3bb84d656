"""Which keys the index surely has no row for, known without asking SQLite.

A cold miss asked the index first, in its SQLite thread: a round trip of two
thread wake-ups (0.2-0.4 ms) before its upstream request could go. A Bloom
filter of every key with a row (``KeyFilter``) answers "surely none" for
almost every key never stored, in the reactor, in a few microseconds; "maybe"
(a row, or one of the ~0.3 % false positives at the filter's design size)
still asks the index. Keys are added when their row is written and never
removed (a purged key costs one lookup more until the next rebuild), so the
filter only ever errs towards asking.

Only the index's sole user keeps one in memory: with worker processes, or a
bucket's shared index behind, other writers add rows this process never
hears of. Worker processes share one instead (``SharedKeyFilter``): the
same bits in ``<data_dir>/index.keys``, mapped into every worker, made new
by the supervisor at each start (``prepare_shared``, sized from the rows
then), filled by the primary worker from the index while the others already
add the keys they write, and trusted once that is done. A writer sets a
key's bits in its SQLite thread before the row's transaction, under the
file's ``flock`` (a read-modify-write of shared bytes); a reader reads them
with no lock and no system call. A filter that outgrows twice its size stops
being trusted (its false positives would climb); the next start sizes the
next one from the rows then. (A bucket's shared index is never filtered.)
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from typing import Iterable

from twisted.logger import Logger

from sparkcache.store.changes import _NATIVE, allocate, flocked

log = Logger()

# Bits per key at the design size, and bit positions per key: ~0.24 % false
# positives when full, ~0.02 % at half.
BITS_PER_KEY = 16
PROBES = 4
MIN_KEYS = 1 << 16  # (128 KiB of bits)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # (Linux)


def _positions(key: str, mask: int) -> tuple[int, ...]:
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest(), "little")
    h1, h2 = h & 0xFFFFFFFFFFFFFFFF, (h >> 64) | 1
    return tuple((h1 + i * h2) & mask for i in range(PROBES))


def _holds(bits: bytearray | memoryview, mask: int, key: str) -> bool:
    for p in _positions(key, mask):
        if not bits[p >> 3] & (1 << (p & 7)):
            return False
    return True


def _bits_for(keys: int) -> int:
    """Bits (a power of two: positions by mask) for ``keys`` keys."""
    bits = max(keys, MIN_KEYS) * BITS_PER_KEY
    return 1 << (bits - 1).bit_length()


class KeyFilter:
    """A Bloom filter over index keys, sized for ``capacity`` keys (more are
    taken, with more false positives: ``full`` says when to rebuild)."""

    def __init__(self, capacity: int) -> None:
        self.size = _bits_for(capacity)
        self._mask = self.size - 1
        self._bits = bytearray(self.size >> 3)
        self.capacity = self.size // BITS_PER_KEY
        self.count = 0  # keys added (with repeats)

    @classmethod
    def of(cls, keys: Iterable[str], capacity: int) -> "KeyFilter":
        f = cls(capacity)
        for key in keys:
            f.add(key)
        return f

    usable = True  # (SharedKeyFilter's may not be yet)

    def add(self, key: str) -> None:
        bits = self._bits
        for p in _positions(key, self._mask):
            bits[p >> 3] |= 1 << (p & 7)
        self.count += 1

    def may_hold(self, key: str) -> bool:
        """False: ``key`` was surely never added."""
        return _holds(self._bits, self._mask, key)

    @property
    def full(self) -> bool:
        return self.count > self.capacity


# -- shared by worker processes ---------------------------------------------------------

SHARED_SUFFIX = ".keys"  # next to the index: index.keys
_MAGIC = b"sparkcache-keys-1"
# The header: the magic, then little-endian words: state, bits, keys added.
_HEAD = struct.Struct("<32sQQQ")
_STATE_AT = 32
_COUNT_AT = 48
_BITS_AT = 4096  # (the bits start on a page of their own)
BUILDING, READY, OVERFULL = 0, 1, 2
# Keys the next filter is sized for, per row at start: room to grow between starts.
GROWTH = 4
MIN_SHARED_KEYS = 1 << 20  # (2 MiB of bits)


def prepare_shared(path: str, rows: int) -> None:
    """Blocking (the supervisor, before any worker starts): a new, empty
    filter at ``path`` for ``rows`` rows and growth, to be filled (BUILDING)."""
    bits = _bits_for(max(GROWTH * rows, MIN_SHARED_KEYS))
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        size = _BITS_AT + bits // 8
        os.ftruncate(fd, size)
        allocate(fd, size)  # (see there: no SIGBUS on a full disk later)
        os.pwrite(fd, _HEAD.pack(_MAGIC, BUILDING, bits, 0), 0)
    finally:
        os.close(fd)
    # A new file each start: a worker of the last run still stopping keeps its own.
    os.replace(tmp, path)


def remove_shared(path: str) -> None:
    """Blocking: no filter (a single process keeps its own in memory)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SharedKeyFilter:
    """The key filter of ``prepare_shared``, mapped (a worker process)."""

    def __init__(self, path: str) -> None:
        """Blocking (start-up). ValueError: not a filter file."""
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(self._fd).st_size
            head = os.pread(self._fd, _HEAD.size, 0)
            if len(head) < _HEAD.size:
                raise ValueError(f"{path}: not a key filter")
            magic, _, bits, _ = _HEAD.unpack(head)
            if magic.rstrip(b"\0") != _MAGIC or bits & (bits - 1) or size < _BITS_AT + bits // 8:
                raise ValueError(f"{path}: not a key filter")
            # Populated now: a fresh file's pages are holes, and a cold miss's
            # first read of each on the reactor was a page fault (~20-60 us on
            # this VM, four pages per key) in a restarted worker's first misses.
            self._map = mmap.mmap(self._fd, _BITS_AT + bits // 8, mmap.MAP_SHARED | _POPULATE,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self.size = bits
        self._mask = bits - 1
        self.capacity = bits // BITS_PER_KEY
        self._view = memoryview(self._map)
        self._words = self._view[:_BITS_AT].cast("Q") if _NATIVE else None
        self._bits = self._view[_BITS_AT:]

    def _word(self, at: int) -> int:
        if self._words is not None:
            return int(self._words[at // 8])
        return int(struct.unpack_from("<Q", self._map, at)[0])

    def _set_word(self, at: int, value: int) -> None:
        struct.pack_into("<Q", self._map, at, value)

    @property
    def usable(self) -> bool:
        """Filled from every row, and not overfull: "surely absent" holds."""
        return self._word(_STATE_AT) == READY

    @property
    def building(self) -> bool:
        return self._word(_STATE_AT) == BUILDING

    def may_hold(self, key: str) -> bool:
        """False: ``key`` was surely never added. (Memory reads only.)"""
        return _holds(self._bits, self._mask, key)

    def add(self, keys: Iterable[str]) -> None:
        """Blocking (the SQLite thread, before the rows' transaction): ``keys``
        may have rows from now on."""
        bits, mask = self._bits, self._mask
        n = 0
        with flocked(self._fd):
            for key in keys:
                for p in _positions(key, mask):
                    bits[p >> 3] |= 1 << (p & 7)
                n += 1
            count = self._word(_COUNT_AT) + n
            self._set_word(_COUNT_AT, count)
            if count > 2 * self.capacity and self._word(_STATE_AT) != OVERFULL:
                self._set_word(_STATE_AT, OVERFULL)
                log.warn("the shared key filter {path} holds {n} keys, twice what it was sized for: cold misses "
                         "ask the index until the next start sizes a larger one", path=self.path, n=count)

    def built(self) -> None:
        """Blocking: every row's key was added (the primary's build): trusted from now on."""
        with flocked(self._fd):
            if self._word(_STATE_AT) == BUILDING:
                self._set_word(_STATE_AT, READY)

    def close(self) -> None:
        if self._words is not None:
            self._words.release()
            self._words = None
        self._bits.release()
        self._view.release()  # (a mapping with a view exported cannot close)
        self._map.close()
        os.close(self._fd)
