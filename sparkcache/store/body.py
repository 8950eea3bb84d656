"""An open range of a stored body: what serving reads through.

Serving never sees a store path: it gets a :class:`BodyRange` from
``Store.open_range`` and reads it (``read_all`` for a small body, ``read``
chunk by chunk for a producer, ``fileno`` for ``os.sendfile``), then closes
it. Opening is one ``open()`` on the calling thread, as cheap as the
``stat`` a HEAD check costs; reads are ``pread`` from the page cache.
"""

from __future__ import annotations

import os
from typing import Callable


class BodyRange:
    """Bytes [start, end) of a stored body, readable until :meth:`close`.

    Whoever ends up holding it closes it, on the reactor thread (closing
    tells the store the body is no longer being sent). A body removed while
    open stays readable through the descriptor.
    """

    __slots__ = ("start", "end", "_fd", "_digest", "_closed")

    def __init__(self, fd: int, start: int, end: int, digest: str, closed: Callable[[str], None]) -> None:
        """``closed(digest)`` is called once, when the range is closed."""
        self.start = start
        self.end = end
        self._fd: int | None = fd
        self._digest = digest
        self._closed = closed

    def __len__(self) -> int:
        return self.end - self.start

    def __enter__(self) -> "BodyRange":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The descriptor, for ``os.sendfile`` (offsets are absolute in the body)."""
        assert self._fd is not None, "body range closed"
        return self._fd

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at absolute ``offset``, never past ``end``; b"" at
        the end or when the file is shorter than its entry says."""
        assert self._fd is not None, "body range closed"
        n = min(n, self.end - offset)
        return os.pread(self._fd, n, offset) if n > 0 else b""

    def read_all(self) -> bytes:
        """The whole range in one ``pread``: for small ranges only (a hit that
        fits in a few pages costs less read here than a thread hop)."""
        assert self._fd is not None, "body range closed"
        n = self.end - self.start
        return os.pread(self._fd, n, self.start) if n > 0 else b""

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            self._closed(self._digest)
