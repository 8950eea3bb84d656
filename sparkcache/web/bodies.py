"""Request bodies: where one goes is decided from its headers, before any byte is stored.

Once a request's headers are in, the site asks the protocol mounted at its
first path segment (its *body gate*, see ``Built.gate``) what becomes of the
body. The gate runs the same checks its handler makes first (route, method,
``ctx.auth`` scope, limits), so a request is answered the same either way,
only sooner, and decides:

- :class:`Refuse`: answer now with this error, in the protocol's format (a 401
  with its challenge, a 405, a 413); no byte of the body is stored, no
  ``100 Continue`` is sent, and the connection closes;
- :class:`ToSpool`: write the body straight into a store spool file, hashed as
  it arrives, so the handler commits that very file (:func:`take_spool`);
- :class:`InMemory`: keep a small body the handler parses in memory, up to a cap;
- None: twisted.web's default (memory, or a temporary file when large).

``server.max_body_size`` caps every body on top of that.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Callable, Union

from sparkcache.fetch.produce import shield
from sparkcache.store import SpoolFile, SpoolReader, Store
from sparkcache.web.errors import ErrorFormat, ErrorReply


@dataclass(frozen=True)
class Refuse:
    """Answer now with ``reply`` in ``fmt``, before the body."""

    fmt: ErrorFormat
    reply: ErrorReply


@dataclass(frozen=True)
class ToSpool:
    """Write the body into a spool file of ``store``; past ``limit`` bytes
    nothing more is kept and the request is answered ``too_large``."""

    store: Store
    limit: int | None = None
    too_large: Refuse | None = None


@dataclass(frozen=True)
class InMemory:
    """Keep the body in memory, at most ``limit`` bytes (else ``too_large``)."""

    limit: int
    too_large: Refuse


BodyDecision = Union[Refuse, ToSpool, InMemory, None]
# Called with the request once its headers are in (method, uri, path and args
# set; no body yet). Raising is a bug: the site logs it and keeps the default.
BodyGate = Callable[[Any], BodyDecision]


def refusal(fmt: ErrorFormat, error: Exception, request: Any) -> Refuse:
    """The answer ``fmt`` gives ``error`` (what the handler's error handlers would send)."""
    reply = fmt.reply(error, request)
    if reply is None:
        raise error
    return Refuse(fmt, reply)


def checked(fmt: ErrorFormat, check: BodyGate) -> BodyGate:
    """A gate that runs ``check``, the checks a handler makes before it reads
    the body: the decision it returns, or, when it raises one of the errors
    ``fmt`` answers, a refusal with that very answer."""

    def gate(request: Any) -> BodyDecision:
        try:
            return check(request)
        except Exception as e:
            if fmt.reply(e, request) is None:
                raise
            return refusal(fmt, e, request)

    return gate


def announced_length(request: Any) -> int | None:
    """The Content-Length the client announced, if any."""
    v = request.getHeader(b"content-length")
    if isinstance(v, bytes):
        v = v.decode("latin-1")
    return int(v) if v and v.strip().isdigit() else None


class BodyGone(Exception):
    """The request's spooled body is no longer there (refused, or its client left)."""


class SpoolBody:
    """``request.content`` for a body written straight into a store spool.

    The channel writes arriving bytes here on the reactor (as it would to
    twisted.web's temporary file); the handler reads them back like a file
    (``read``/``seek``/``tell``) or takes the spool itself with
    :func:`take_spool` to commit it. A spool nobody took is discarded when
    the request ends, fails or its client disconnects.
    """

    def __init__(self, store: Store, limit: int | None) -> None:
        self.store = store
        self.limit = limit
        self.spool: SpoolFile | None = store.new_spool("up-")
        self.overflow = False
        self.error: OSError | None = None
        self._reader: SpoolReader | None = None
        self._taken = False
        self._pos = 0

    @property
    def size(self) -> int:
        return self.spool.size if self.spool is not None else 0

    # -- written by the channel ------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.spool is None or self.overflow or self.error is not None:
            return
        if self.limit is not None and self.spool.size + len(data) > self.limit:
            # Past the limit nothing more is kept: the request is answered 413.
            self.overflow = True
            self._drop()
            return
        try:
            self.spool.write(data)
        except OSError as e:  # disk full: answered 507 once the body is in
            self.error = e
            self._drop()
            return
        self._pos = self.spool.size  # as a file open for writing: at its end

    # -- read by the handler ---------------------------------------------------

    def _view(self) -> SpoolReader:
        if self._reader is None:
            if self.spool is None:
                raise BodyGone("the request body is gone")
            self._reader = self.spool.reader()
        return self._reader

    def read(self, n: int | None = -1) -> bytes:
        return self._read(lambda view: view.read(n))

    def readline(self, limit: int | None = -1) -> bytes:
        return self._read(lambda view: view.readline(limit))

    def _read(self, op: Callable[[SpoolReader], bytes]) -> bytes:
        view = self._view()
        view.seek(self._pos)
        data = op(view)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def take(self) -> SpoolFile:
        """The spool, now the caller's to commit or discard."""
        if self.spool is None or self._taken:
            raise BodyGone("the request body is gone")
        self._taken = True
        spool, self.spool = self.spool, None
        self._close_reader()
        return spool

    # -- ended by twisted.web ----------------------------------------------------

    def close(self) -> None:
        """The request ended (answered, failed, or its client left)."""
        self._close_reader()
        self._drop()

    def _drop(self) -> None:
        if self.spool is not None:
            spool, self.spool = self.spool, None
            self.store.discard(spool)

    def _close_reader(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.close()


class CappedBody:
    """A body file that stops storing bytes past a limit (the rest is read and dropped)."""

    def __init__(self, inner: Any, limit: int) -> None:
        self.inner, self.limit, self.size, self.overflow = inner, limit, 0, False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.overflow = True
            return
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def take_spool(request: Any) -> SpoolFile | None:
    """The spool the request's body was written to, now the caller's to commit
    or discard; None when the body went elsewhere (no gate asked for a spool:
    an empty body, or an app served without the daemon's site)."""
    content = getattr(request, "content", None)
    return content.take() if isinstance(content, SpoolBody) else None


async def request_spool(request: Any, store: Store) -> SpoolFile:
    """The request's body as a spool the caller commits or discards: the very
    file it was written to, or (when it went elsewhere) a copy made in the I/O pool."""
    spool = take_spool(request)
    if spool is not None:
        return spool
    spool = store.new_spool("up-")
    content = getattr(request, "content", None)

    def copy() -> None:
        if content is None:
            return
        content.seek(0)
        for chunk in iter(lambda: content.read(1 << 20), b""):
            spool.write(chunk)

    d = store.in_io(copy)
    try:
        await shield(d)
    except BaseException:
        # Not while the copying thread may still write to it (a client that
        # left cancels the handler, not the thread).
        d.addBoth(lambda _: store.discard(spool))
        raise
    return spool


def body_size(request: Any) -> int:
    """How many bytes the request's body has (without reading it)."""
    content = getattr(request, "content", None)
    if content is None:
        return 0
    if isinstance(content, SpoolBody):
        return content.size
    pos = content.tell()
    content.seek(0, io.SEEK_END)
    size = int(content.tell())
    content.seek(pos)
    return size
