"""A tar archive of stored entries, made as it is sent.

The archive is a header per member (Python's :mod:`tarfile` computes it,
POSIX pax format so long and non-ASCII names survive), the stored body read
from the store, zero padding to the next 512-byte block, and the end-of-archive
blocks padded to a whole record, as ``tarfile`` writes it. Every part's length
is known before the first byte, so the response has a Content-Length, and the
bodies are read chunk by chunk when the client is ready for them: one member's
body is open at a time and nothing is held in memory but headers.
"""

from __future__ import annotations

import tarfile
from typing import Sequence, Union

from sparkcache.store import BodyRange, Entry, Store

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE

# A part of the archive: bytes made here, or a stored entry's body.
Part = Union[bytes, Entry]


def member_header(name: str, entry: Entry) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = entry.size
    info.mtime = int(entry.fetched)
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def archive_parts(members: Sequence[tuple[str, Entry]]) -> list[Part]:
    """The parts of an archive of ``members`` (name in the archive, entry), in order."""
    parts: list[Part] = []
    total = 0
    for name, entry in members:
        header = member_header(name, entry)
        parts += [header, entry]
        total += len(header) + entry.size
        pad = -entry.size % BLOCK
        if pad:
            parts.append(bytes(pad))
            total += pad
    end = 2 * BLOCK
    end += -(total + end) % RECORD
    parts.append(bytes(end))
    return parts


def part_size(part: Part) -> int:
    return len(part) if isinstance(part, bytes) else part.size


class TarStream:
    """``read(offset, n)`` over the parts, called in order of offset (the shape
    :func:`sparkcache.web.serve.send_generated` pulls from). A body that is gone
    or shorter than its entry says reads as b"", which aborts the response:
    the client sees a broken transfer, never a corrupt archive."""

    def __init__(self, store: Store, parts: list[Part]) -> None:
        self.store = store
        self.parts = parts
        self.size = sum(part_size(p) for p in parts)
        self._index = 0
        self._start = 0  # offset of parts[_index] in the archive
        self._body: BodyRange | None = None

    def read(self, offset: int, n: int) -> bytes:
        parts = self.parts
        while self._index < len(parts) and offset >= self._start + part_size(parts[self._index]):
            self._start += part_size(parts[self._index])
            self._index += 1
            self.close()
        if self._index >= len(parts):
            return b""
        part, at = parts[self._index], offset - self._start
        if isinstance(part, bytes):
            return part[at:at + n]
        if self._body is None:
            try:
                self._body = self.store.open_range(part)
            except (FileNotFoundError, ValueError):
                return b""
        return self._body.read(at, min(n, part.size - at))

    def close(self) -> None:
        if self._body is not None:
            body, self._body = self._body, None
            body.close()
