"""Uncached pass-through: one request forwarded to a remote's upstream, its
answer streamed back as it arrives (registry search, npm audit).

Nothing is stored. The upstream body flows to the client with backpressure:
the upstream connection is paused while the client's is full, and stopped
when the client goes away. A body cut off upstream aborts the client's
connection rather than end it as if complete.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from sparkcache.config import RemoteConfig
from sparkcache.fetch.upstream import UpstreamClient, UpstreamError
from sparkcache.metrics import Metrics
from sparkcache.web.serve import error_body

log = Logger()

# Request headers passed on to the upstream; anything else (cookies, this
# cache's own Authorization) stays here.
FORWARD_REQUEST = (b"accept", b"content-type", b"npm-command", b"npm-session", b"user-agent")
# Response headers passed back to the client.
FORWARD_RESPONSE = (b"content-type", b"content-encoding", b"cache-control", b"etag", b"last-modified", b"retry-after")


@implementer(IPushProducer)
class _Relay(Protocol):
    """Writes an upstream body to a client request, pausing the upstream when the client is behind."""

    def __init__(self, request: Any, done: Deferred[bool], count: Any) -> None:
        self.request = request
        self.done = done
        self.count = count
        self.gone = False

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.gone:
            self.request.write(data)
            self.count(len(data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        complete = reason is not None and reason.check(ResponseDone, PotentialDataLoss) is not None
        if not self.gone:
            self.request.unregisterProducer()
        if not self.done.called:  # not cancelled with the handler of a client that left
            self.done.callback(complete)

    # IPushProducer, driven by the client's transport
    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


async def pass_through(
    upstream: UpstreamClient, metrics: Metrics, remote: RemoteConfig, request: Any, urls: Sequence[str],
    body: bytes | None = None,
) -> bytes | None:
    """Forward ``request`` (its method, a few of its headers, ``body``) to the
    first of ``urls`` that answers (the next on unreachable, 5xx or 429) and
    stream the answer back; returns a body for Klein (an error), or None once streamed."""
    headers = {}
    for name in FORWARD_REQUEST:
        v = request.getHeader(name)
        if v is not None:
            headers[name] = v if isinstance(v, bytes) else v.encode("latin-1")
    response = None
    problem = "no upstream"
    for n, url in enumerate(urls):
        last = n == len(urls) - 1
        try:
            response, _final = await upstream.request(remote, request.method, url, headers, body)
        except UpstreamError as e:
            metrics.upstream(remote.name, e.kind)
            problem = str(e)
            response = None
            continue
        metrics.upstream(remote.name, str(response.code))
        if (response.code >= 500 or response.code == 429) and not last:
            response.deliverBody(Protocol())  # drop it; the connection closes
            continue
        break
    if response is None:
        metrics.response(remote.name, "error")
        return error_body(request, 502, problem)
    metrics.response(remote.name, "pass")
    request.setResponseCode(response.code)
    for name in FORWARD_RESPONSE:
        values = response.headers.getRawHeaders(name)
        if values:
            request.responseHeaders.setRawHeaders(name, values)
    request.setHeader(b"X-Cache", b"PASS")
    if request.method == b"HEAD":
        response.deliverBody(Protocol())
        return b""
    if response.length is not None and isinstance(response.length, int):
        request.setHeader(b"Content-Length", str(response.length).encode())
    done: Deferred[bool] = Deferred()
    relay = _Relay(request, done, metrics.bytes_counter(remote.name, "upstream"))
    finished = request.notifyFinish()
    finished.addErrback(lambda _f: relay.stopProducing())
    response.deliverBody(relay)
    complete = await done
    if not complete and not relay.gone:
        log.warn("{remote}: the upstream answer was cut off; aborting the client", remote=remote.name)
        transport = getattr(getattr(request, "channel", None), "transport", None)
        if transport is not None:
            transport.abortConnection()
    return None
