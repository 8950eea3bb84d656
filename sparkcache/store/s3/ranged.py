"""A Range request for a body that is in the bucket but not in the tier:
answered with a ranged GET from the bucket, streamed to the client.

An app that serves hits through ``respond``/``serve_hit`` looks its entry up
inside ``store.ranges.serving_range(request, key)``; for a GET with a Range
header the first TieredIndex lookup of that key then hands the entry out without
waiting for the whole body to come into the tier: it checks that the object
is there with the entry's size (a HEAD; gone: a miss, as for a fill) and
starts the full fill in the background, so the next request is a verified
tier hit. ``serve_hit`` finds no tier copy to open and calls
``serve_from_bucket``, which GETs ``bytes=start-(end-1)`` and streams it with
backpressure (the client's connection pauses the bucket's).

What is checked: a range cannot be checked against the body's sha256, so the
answer must be a 206 whose ``Content-Range`` is exactly the range asked of an
object of the entry's size, and whose length is the range's; a broken-off
body resumes with a Range from where it stopped. A whole body (a body
evicted between the lookup and the open) is hashed as it goes: one that does
not match its name is cut off, never ended cleanly. These bytes never go
into the tier (only the verified fill does).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from sparkcache.store.s3.bodies import _SinkProtocol
from sparkcache.store.s3.client import Mismatch, S3Error

log = Logger()


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class ClientGone(Exception):
    """The client went away: the bucket's answer is dropped, not resumed."""


class ToClient:
    """Where ``S3Client.get_to`` sends bytes [start, end) of a body of ``size``
    bytes: the client's response (the FileSink interface: ``written``, ``receive``)."""

    def __init__(self, request: Any, start: int, end: int, size: int, reactor: Any, idle_timeout: float,
                 on_bytes: Callable[[int], None]) -> None:
        self.request = request
        self.start = start
        self.end = end
        self.size = size
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.on_bytes = on_bytes
        self.written = 0
        self.gone = False
        # A whole body is checked against its name as it goes.
        self.sha256 = hashlib.sha256() if (start, end) == (0, size) else None

    def receive(self, response: IResponse) -> Deferred[None]:
        proto = _Relay(self)
        try:
            self._check(response)
        except Mismatch as e:
            proto.error = e  # the body is dropped (connectionMade stops it)
        response.deliverBody(proto)
        return proto.done

    def _check(self, response: IResponse) -> None:
        at, last = self.start + self.written, self.end - 1
        length = response.length
        if response.code == 206:
            got = response.headers.getRawHeaders(b"content-range") or [b""]
            m = _CONTENT_RANGE.fullmatch(got[0].decode("latin-1").strip())
            if m is None or (int(m[1]), int(m[2]), int(m[3])) != (at, last, self.size):
                raise Mismatch("GET", 206, message=f"Content-Range {got[0]!r}, asked bytes {at}-{last}/{self.size}")
            if length is not UNKNOWN_LENGTH and length != last - at + 1:
                raise Mismatch("GET", 206, message=f"{length} bytes for a range of {last - at + 1}")
        elif at != 0 or self.end != self.size or (length is not UNKNOWN_LENGTH and length != self.size):
            # The whole object where a part was asked (or another length): not what we serve.
            raise Mismatch("GET", response.code, message=f"{length} bytes where bytes {at}-{last} were asked")


@implementer(IPushProducer)
class _Relay(_SinkProtocol):
    """The bucket's body to the client: written as it arrives, the bucket's
    connection paused while the client's is behind (and its idle timeout with it)."""

    def __init__(self, out: ToClient) -> None:
        super().__init__(out)  # type: ignore[arg-type]  # the FileSink attributes it reads: reactor, idle_timeout
        self.out = out
        self._paused = False

    def connectionMade(self) -> None:
        request = self.out.request
        if self.error is None and (self.out.gone or getattr(request, "_disconnected", False)):
            self.error = ClientGone("the client went away")
        if self.error is not None:
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        request.registerProducer(self, True)
        self._arm()

    def _arm(self) -> None:
        if not self._paused:
            super()._arm()

    def _disarm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()

    def dataReceived(self, data: bytes) -> None:
        out = self.out
        if self.error is not None:
            return
        if out.start + out.written + len(data) > out.end:
            self._stop(Mismatch("GET", None, message="the bucket sent more than the range"))
            return
        if out.sha256 is not None:
            out.sha256.update(data)
        out.written += len(data)
        out.on_bytes(len(data))
        out.request.write(data)
        self._arm()

    # IPushProducer, for the client's connection
    def pauseProducing(self) -> None:
        self._paused = True
        self._disarm()
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._paused = False
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self._arm()

    def stopProducing(self) -> None:
        self.out.gone = True
        self._stop(ClientGone("the client went away"))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if getattr(self.out.request, "producer", None) is self:
            try:
                self.out.request.unregisterProducer()
            except Exception:
                pass
        super().connectionLost(reason)


def serve_from_bucket(request: Any, store: Any, entry: Any, start: int, end: int,
                      on_bytes: Callable[[int], None]) -> Deferred[None]:
    """Answer bytes [start, end) of ``entry``'s body from the bucket (its
    headers, status 206 and Content-Range already set by ``serve_hit``)."""
    return Deferred.fromCoroutine(_serve(request, store, entry, start, end, on_bytes))


async def _serve(request: Any, store: Any, entry: Any, start: int, end: int, on_bytes: Callable[[int], None]) -> None:
    from sparkcache.web.serve import error_body, finish_safely

    content = store.cas
    client = content.client
    digest = entry.digest
    out = ToClient(request, start, end, entry.size, client.reactor, client.settings.timeout, on_bytes)
    request.notifyFinish().addErrback(lambda _: setattr(out, "gone", True))
    content.ranged += 1
    try:
        # No Range for the whole body: any server answers that with a plain 200.
        await client.get_to(content.object_name(digest), out, start, None if (start, end) == (0, entry.size) else end)
        if out.written != end - start:
            raise Mismatch("GET", None, message=f"{out.written} bytes of a range of {end - start}")
        if out.sha256 is not None and out.sha256.hexdigest() != digest:
            raise Mismatch("GET", None, message=f"the body read back is sha256:{out.sha256.hexdigest()}")
    except Exception as e:
        if out.gone or isinstance(e, ClientGone):
            return
        if isinstance(e, S3Error) and e.status == 404:
            # Gone from the bucket (swept, deleted): the row goes, the next request is a miss.
            Deferred.fromCoroutine(store.purge_key(entry.key)).addErrback(
                lambda f: log.failure("dropping the entry of a body gone from the bucket", f))
        log.warn("sha256:{digest} bytes {start}-{last} from the bucket: {e}", digest=digest, start=start,
                 last=end - 1, e=e)
        if not getattr(request, "startedWriting", True):
            for name in (b"content-length", b"content-range", b"etag", b"last-modified", b"content-disposition"):
                request.responseHeaders.removeHeader(name)
            request.setResponseCode(200)
            request.write(error_body(request, 503, "the body could not be read from the bucket; retry"))
            finish_safely(request)
        else:  # never end an incomplete or unverified body cleanly
            transport = getattr(getattr(request, "channel", None), "transport", None)
            if transport is not None:
                transport.abortConnection()
        return
    finish_safely(request)
