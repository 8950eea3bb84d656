"""The upstream HTTP client: one pooled Agent, credentials, timeouts, redirects.

A bare Agent rather than treq: stored bytes must be exactly upstream's, so no
content decoding and no buffering. Redirects are followed here, server-side,
so that clients never see (and the cache never stores) signed object-storage
URLs, and so that Authorization is dropped when a redirect changes host.
"""

from __future__ import annotations

import base64
import encodings.idna  # noqa: F401  (see below)
import io
from functools import partial
from typing import Any, Awaitable, Callable, Concatenate, Hashable, ParamSpec
from urllib.parse import urljoin, urlsplit

from twisted.internet import tcp
from twisted.internet.abstract import isIPAddress
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (URI, Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool,
                                ResponseNeverReceived, _HTTP11ClientFactory, _StandardEndpointFactory)
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from sparkcache.config import Credentials, RemoteConfig
from sparkcache.fetch.siphon import kept_wide

# ``encodings.idna`` is imported above, at start-up, because host names are
# IDNA-encoded on every request (ours by werkzeug's routing, upstream ones by
# Twisted's endpoints): imported lazily, by a worker's first request, it took
# about a millisecond of that request (a worker's first cold miss, with workers).
REDIRECTS = (301, 302, 303, 307, 308)
# Further attempts of a GET/HEAD that got no response at all (see request()).
STALE_CONNECTION_RETRIES = 2
USER_AGENT = b"sparkcache"


# glibc's heap, tuned once per process for bodies read in large buffers (see tune_malloc).
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 16 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_tuned = False


def tune_malloc() -> bool:
    """Keep the buffers of a body in transit on glibc's heap.

    A miss receives its body in reads of up to 512 KiB (flight.READ_SIZE),
    each a new bytes object, freed once on disk and hashed. With glibc's
    defaults such a buffer is often ``mmap``ed and unmapped again, and the
    heap top is given back (``brk``) as soon as 1 MiB is free and taken again
    the next moment: every read then faults fresh zeroed pages in. Fixed
    thresholds (an ``mmap`` only past 1 MiB, a trim only past 16 MiB free)
    took a 256 MiB cold miss from 55,000 minor page faults (nearly one per
    4 KiB received) to 700 here, and its CPU from about 3 to 2-2.5 seconds
    per GB; the heap keeps at most 16 MiB more than it needs. A no-op where the C library
    is not glibc. Returns whether it applied."""
    global _tuned
    if _tuned:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned


class UpstreamError(Exception):
    """The upstream could not be asked: ``kind`` is 'unreachable' or 'timeout'."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"upstream {kind}: {detail}")
        self.kind = kind
        self.detail = detail


# The origins of the URLs seen, by the URL's part before its path: every
# request asks for its URL's origin several times (credentials, redirects,
# the observer), and urlsplit is most of what that costs.
_ORIGINS: dict[str, tuple[str, str, int]] = {}
ORIGINS_MAX = 1024


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, lower-cased host, port) of ``url``."""
    start = url.find("://")
    if start < 0:
        return _origin(url)
    end = len(url)
    for c in "/?#":
        i = url.find(c, start + 3)
        if 0 <= i < end:
            end = i
    prefix = url[:end]
    got = _ORIGINS.get(prefix)
    if got is None:
        got = _origin(prefix)
        if len(_ORIGINS) >= ORIGINS_MAX:
            _ORIGINS.clear()
        _ORIGINS[prefix] = got
    return got


def _origin(url: str) -> tuple[str, str, int]:
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return (p.scheme, (p.hostname or "").lower(), port)


def origin_name(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, the port only when not the scheme's default."""
    scheme, host, port = origin(url)
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port == (443 if scheme == "https" else 80) else f"{scheme}://{host}:{port}"


def auth_header(creds: Credentials | None) -> bytes | None:
    if creds is None:
        return None
    if creds.token:
        return b"Bearer " + creds.token.encode()
    if creds.username is not None or creds.password is not None:
        raw = f"{creds.username or ''}:{creds.password or ''}".encode()
        return b"Basic " + base64.b64encode(raw)
    return None


class _Discard(Protocol):
    """Drain a small body (a redirect's) so the connection can be reused."""

    def __init__(self, done: Deferred[None], limit: int = 65536) -> None:
        self.done = done
        self.left = limit

    def dataReceived(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0 and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(None)


def discard_body(response: IResponse) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    response.deliverBody(_Discard(d))
    return d


# A read at least this large that holds a whole response head is split there.
HEAD_SPLIT_MIN = 4096
# The size of a response's first read, and of the reads after it (Twisted's).
HEAD_READ = 8192
BODY_READ = tcp.Connection.bufferSize


class _HeadFirstProtocol(HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client, quicker to a response's head: the request
    goes out as it is written, the response's first read is small, and the
    parser is fed the head apart from the body bytes that came with it.

    Its parser is a LineReceiver, which takes each header line off the front
    of everything received so far with ``split(delimiter, 1)``: a 64 KiB first
    read (a head and the start of a large body) was copied once per header
    line, a tenth of a millisecond on a miss's way to its first byte. Split
    here, the head's lines are taken from a few hundred bytes and the body's
    bytes go to the body decoder in one piece. The parser sees the same bytes
    in the same order, as if TCP had delivered them in two reads."""

    def request(self, request: Any) -> Any:
        # The first read of a response is small: it holds the head, which is
        # all our client's headers wait for; the body follows in full-size
        # reads (or a Siphon's), not 64 KiB of it copied first.
        t = self.transport
        if type(t) is not tcp.Client:
            return super().request(request)
        t.bufferSize = HEAD_READ
        d = super().request(request)
        # Sent now, not at the reactor's next turn: the rest of this one (the
        # callbacks up the caller's chain) then overlaps upstream's answer.
        if t.connected and not t.disconnecting and (t.dataBuffer or t._tempDataBuffer):
            t.doWrite()
        return d

    def dataReceived(self, bytes: bytes) -> None:  # (Twisted's argument name)
        if type(self.transport) is tcp.Client:
            self.transport.bufferSize = BODY_READ
        parser = self._parser
        if parser is not None and len(bytes) >= HEAD_SPLIT_MIN and parser.line_mode and not parser._buffer:
            end = bytes.find(b"\r\n\r\n")
            if end >= 0:
                end += 4
                super().dataReceived(bytes[:end])
                if end == len(bytes):
                    return
                bytes = bytes[end:]
        super().dataReceived(bytes)


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # one "Starting factory" log line per upstream connection is noise

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _HeadFirstProtocol(self._quiescentCallback)


class _QuietPool(HTTPConnectionPool):
    """Twisted's persistent pool, plus connections opened ahead of a request.

    ``open_ahead`` starts a connection for ``key`` when none is idle and none
    is being opened; the next request for ``key`` takes it as soon as it is
    made (or at once, if it is already), and when none comes it waits idle in
    the pool like any other. So at most one extra connection per origin is
    ever opened ahead, and a miss's upstream connect overlaps the index lookup
    instead of following it.

    A connection whose receive window a siphon widened is closed when its
    body ends, not kept (``siphon.kept_wide``): with a window of megabytes
    open, a nearby upstream sends that much at once when the next response
    starts, and that response's head comes later (on loopback it put ~1 ms
    on a miss's first byte, and more at p75). A new connection to the same
    origin is opened ahead in its place, so the next miss still finds one."""

    _factory = _QuietFactory
    MAX_ORIGINS = 1000  # endpoints remembered for replacing a closed wide connection

    def __init__(self, reactor: Any, persistent: bool = True) -> None:
        super().__init__(reactor, persistent)
        self._opening: dict[Hashable, Deferred[Any]] = {}
        self._endpoints: dict[Hashable, IStreamClientEndpoint] = {}
        self._closed = False

    def _newConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        if key not in self._endpoints and len(self._endpoints) >= self.MAX_ORIGINS:
            self._endpoints.clear()
        self._endpoints[key] = endpoint
        return super()._newConnection(key, endpoint)  # type: ignore[no-any-return]

    def open_ahead(self, key: Hashable, endpoint: IStreamClientEndpoint) -> None:
        if self._closed or self._connections.get(key) or key in self._opening:
            return
        d = self._newConnection(key, endpoint)
        self._opening[key] = d

        def opened(connection: Any) -> Any:
            if self._opening.get(key) is d:  # no request took it: idle in the pool
                del self._opening[key]
                self._putConnection(key, connection)
            return connection

        def failed(f: Failure) -> Failure | None:
            if self._opening.get(key) is d:  # nobody waits: the next request connects itself
                del self._opening[key]
                return None
            return f

        d.addCallbacks(opened, failed)

    def _putConnection(self, key: Hashable, connection: Any) -> None:
        if kept_wide(connection.transport):
            connection.transport.loseConnection()
            endpoint = self._endpoints.get(key)
            if endpoint is not None:
                self.open_ahead(key, endpoint)
            return
        super()._putConnection(key, connection)

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        opening = self._opening.pop(key, None)
        if opening is not None:
            return opening
        return super().getConnection(key, endpoint)  # type: ignore[no-any-return]

    def closeCachedConnections(self) -> Deferred[None]:
        self._closed = True  # (a body ending from now on opens no replacement)
        opening, self._opening = list(self._opening.values()), {}
        for d in opening:
            d.addErrback(lambda f: None)
            d.cancel()
        return super().closeCachedConnections()  # type: ignore[no-any-return]


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Twisted's endpoints for an Agent, except that an IPv4 literal is
    connected to directly. HostnameEndpoint resolves even ``127.0.0.1``
    through getaddrinfo in the reactor's thread pool: a thread round trip
    (0.3-1 ms on a busy host) before every new upstream connection, on the
    way to a miss's first byte."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self.reactor = reactor
        self.timeout = connect_timeout
        self.policy = BrowserLikePolicyForHTTPS()  # (Agent's default)
        self.standard = _StandardEndpointFactory(reactor, self.policy, connect_timeout, None)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii", "replace")
        if uri.scheme not in (b"http", b"https") or not isIPAddress(host):
            return self.standard.endpointForURI(uri)  # type: ignore[no-any-return]
        endpoint = TCP4ClientEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


P = ParamSpec("P")
Send = Callable[Concatenate["UpstreamClient", RemoteConfig, bytes, str, P], Awaitable[tuple[IResponse, str]]]


def _observed(send: Send[P]) -> Send[P]:
    """Tell the client's ``observer`` how the origin a request started at answered."""

    async def request(self: "UpstreamClient", remote: RemoteConfig, method: bytes, url: str,
                      *args: P.args, **kwargs: P.kwargs) -> tuple[IResponse, str]:
        observer = self.observer
        if observer is None:
            return await send(self, remote, method, url, *args, **kwargs)
        where = origin_name(url)
        report: Any = kwargs.get("report") or _now
        try:
            response, final = await send(self, remote, method, url, *args, **kwargs)
        except UpstreamError as e:
            report(partial(observer, remote.name, where, None, str(e)))
            raise
        report(partial(observer, remote.name, where, response.code, None))
        return response, final

    return request


class UpstreamClient:
    """Requests to configured upstreams.

    ``reactor`` times every request out and, unless ``agent`` is given,
    connects it through one persistent pool (an Agent per connect timeout).
    Tests give an in-memory ``agent`` (treq's RequestTraversalAgent, or
    tests/support/memory.py's) and a task.Clock as ``reactor``: redirects,
    credentials and timeouts then run exactly as in production, without a
    socket. A given agent owns its connections, so ``connect_timeout`` and
    ``close()`` leave them alone.
    """

    def __init__(self, reactor: Any, max_redirects: int = 10, agent: IAgent | None = None) -> None:
        self.reactor = reactor
        self.max_redirects = max_redirects
        self._given = agent
        self.pool: HTTPConnectionPool | None = None
        if agent is None:
            tune_malloc()  # (a real network client: bodies come in large reads)
            self.pool = _QuietPool(reactor, persistent=True)
            self.pool.maxPersistentPerHost = 16
            self.pool.cachedConnectionTimeout = 60
            self.pool.retryAutomatically = True
        self._agents: dict[float, IAgent] = {}
        self._endpoints: dict[float, _Endpoints] = {}
        # (connect timeout, scheme://host:port) -> the pool's key and endpoint for open_ahead.
        self._ahead: dict[tuple[float, str], tuple[Hashable, IStreamClientEndpoint] | None] = {}
        # Told of every request's outcome: (remote, origin, status or None, error or None).
        self.observer: Callable[[str, str, int | None, str | None], None] | None = None

    def agent(self, connect_timeout: float) -> IAgent:
        if self._given is not None:
            return self._given
        a = self._agents.get(connect_timeout)
        if a is None:
            endpoints = self._endpoints[connect_timeout] = _Endpoints(self.reactor, connect_timeout)
            a = self._agents[connect_timeout] = Agent.usingEndpointFactory(self.reactor, endpoints, pool=self.pool)
        return a

    def open_ahead(self, remote: RemoteConfig, url: str) -> None:
        """Open a connection to ``url``'s origin now unless one is idle or
        opening: a request there soon (a miss, once the index said so) then
        finds it made. Never fails; a no-op with a given agent."""
        if not isinstance(self.pool, _QuietPool):
            return
        where = (remote.connect_timeout, "/".join(url.split("/", 3)[:3]))
        if where in self._ahead:
            ahead = self._ahead[where]
        else:
            self.agent(remote.connect_timeout)
            try:
                uri = URI.fromBytes(url.encode("ascii"))
                endpoint = self._endpoints[remote.connect_timeout].endpointForURI(uri)
                # The key Agent.request files the connection under.
                ahead = ((uri.scheme, uri.host, uri.port), endpoint)
            except Exception:
                ahead = None  # (the request itself reports a URL it cannot use)
            if len(self._ahead) > 1000:
                self._ahead.clear()
            self._ahead[where] = ahead
        if ahead is not None:
            self.pool.open_ahead(*ahead)

    def close(self) -> Deferred[None]:
        if self.pool is None:
            return succeed(None)
        return self.pool.closeCachedConnections()

    @_observed
    async def request(
        self,
        remote: RemoteConfig,
        method: bytes,
        url: str,
        headers: dict[bytes, bytes] | None = None,
        body: bytes | None = None,
        report: Callable[[Callable[[], None]], None] | None = None,
    ) -> tuple[IResponse, str]:
        """Send a request to ``remote``'s upstream; returns (response, final URL).
        ``body``: a small request body (a proxied POST); such a request is not
        redirected. ``report``: where the ``observer``'s call goes instead of
        running at once (a miss runs it once its client has the headers).

        Raises UpstreamError when nothing usable came back (refused, reset,
        DNS failure, no headers within ``remote.read_timeout``).
        """
        homes = {origin(u) for u in (remote.upstreams or (url,))}
        first = origin(url)
        auth = auth_header(remote.credentials)
        # An Authorization the caller supplies (a registry's bearer token)
        # replaces the configured credentials, for the first origin only.
        given = {k.lower(): v for k, v in (headers or {}).items()}.get(b"authorization")
        agent = self.agent(remote.connect_timeout)
        hops = 0
        # A pooled keep-alive connection the server closed as the request went
        # out fails with nothing received; twisted retries that once, but a CDN
        # that closed several idle connections at once can fail the retry too.
        # Nothing was answered, so an idempotent request is safe to send again.
        stale_retries = STALE_CONNECTION_RETRIES
        while hops <= self.max_redirects:
            h = Headers({b"User-Agent": [USER_AGENT]})
            for k, v in (headers or {}).items():
                if k.lower() != b"authorization":
                    h.setRawHeaders(k, [v])
            # Credentials belong to the configured upstream only: a redirect
            # to object storage or another host must not carry them.
            if given is not None:
                if origin(url) == first:
                    h.setRawHeaders(b"Authorization", [given])
            elif auth is not None and origin(url) in homes:
                h.setRawHeaders(b"Authorization", [auth])
            producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
            d = agent.request(method, url.encode("ascii"), h, producer)
            timed_out: list[bool] = []

            def on_timeout(d: Deferred[IResponse] = d, flag: list[bool] = timed_out) -> None:
                flag.append(True)
                d.cancel()

            timer = self.reactor.callLater(remote.read_timeout, on_timeout)
            try:
                response: IResponse = await d
            except Exception as e:
                if timed_out:
                    raise UpstreamError("timeout", f"no response from {_safe(url)} within {remote.read_timeout:g}s") from None
                if isinstance(e, CancelledError):
                    raise
                if isinstance(e, ResponseNeverReceived) and method in (b"GET", b"HEAD") and body is None \
                        and stale_retries > 0:
                    stale_retries -= 1
                    continue
                raise UpstreamError("unreachable", f"{_safe(url)}: {_describe(e)}") from None
            finally:
                if timer.active():
                    timer.cancel()
            if response.code in REDIRECTS and method in (b"GET", b"HEAD") and body is None:
                location = response.headers.getRawHeaders(b"location", [None])[0]
                if location:
                    await discard_body(response)
                    target = urljoin(url, location.decode("latin-1"))
                    if urlsplit(target).scheme not in ("http", "https"):
                        raise UpstreamError("unreachable", f"redirect to unsupported URL {_safe(target)}")
                    url = target
                    hops += 1
                    continue
            return response, url
        raise UpstreamError("unreachable", f"more than {self.max_redirects} redirects from {_safe(url)}")


def _now(fn: Callable[[], None]) -> None:
    fn()


def _safe(url: str) -> str:
    """A URL fit for logs: no userinfo, no query string (signatures live there)."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return f"{p.scheme}://{host}{p.path}"


def _describe(e: BaseException) -> str:
    if isinstance(e, ResponseNeverReceived) and e.reasons:
        return "; ".join(type(r.value).__name__ for r in e.reasons)
    return type(e).__name__
