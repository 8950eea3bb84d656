"""Which keys the index surely has no row for, known without asking SQLite.

A cold miss asked the index first, in its SQLite thread: a round trip of two
thread wake-ups (0.2-0.4 ms) before its upstream request could go. A Bloom
filter of every key with a row (``KeyFilter``) answers "surely none" for
almost every key never stored, in the reactor, in a few microseconds; "maybe"
(a row, or one of the ~0.3 % false positives at the filter's design size)
still asks the index. Keys are added when their row is written and never
removed (a purged key costs one lookup more until the next rebuild), so the
filter only ever errs towards asking.

Only the index's sole user keeps one: with worker processes, or a bucket's
shared index behind, other writers add rows this process never hears of.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

# Bits per key at the design size, and bit positions per key: ~0.24 % false
# positives when full, ~0.02 % at half.
BITS_PER_KEY = 16
PROBES = 4
MIN_KEYS = 1 << 16  # (128 KiB of bits)


class KeyFilter:
    """A Bloom filter over index keys, sized for ``capacity`` keys (more are
    taken, with more false positives: ``full`` says when to rebuild)."""

    def __init__(self, capacity: int) -> None:
        bits = max(capacity, MIN_KEYS) * BITS_PER_KEY
        self.size = 1 << (bits - 1).bit_length()  # a power of two: positions by mask
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

    def _positions(self, key: str) -> tuple[int, ...]:
        h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest(), "little")
        h1, h2 = h & 0xFFFFFFFFFFFFFFFF, (h >> 64) | 1
        mask = self._mask
        return tuple((h1 + i * h2) & mask for i in range(PROBES))

    def add(self, key: str) -> None:
        bits = self._bits
        for p in self._positions(key):
            bits[p >> 3] |= 1 << (p & 7)
        self.count += 1

    def may_hold(self, key: str) -> bool:
        """False: ``key`` was surely never added."""
        bits = self._bits
        for p in self._positions(key):
            if not bits[p >> 3] & (1 << (p & 7)):
                return False
        return True

    @property
    def full(self) -> bool:
        return self.count > self.capacity
