"""The service tree: store, listeners, timers and graceful stop."""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Request, Site

from twisted.web.resource import IResource

from sparkcache.auth import Authorizer
from sparkcache.config import Config
from sparkcache.context import Context
from sparkcache.fetch import Cache, UpstreamClient
from sparkcache.metrics import Metrics
from sparkcache.pools import PoolService
from sparkcache.protocols import PROTOCOLS, remote_types
from sparkcache.protocols.base import ProtocolSpec, SetupEndpoint
from sparkcache.store import Store
from sparkcache.timers import Periodic
from sparkcache.web.admin import AdminApp
from sparkcache.web.root import Root
from sparkcache.web.sendfile import SendfilePool
from sparkcache.web.setup import SetupApp

log = Logger()
SENDFILE_THREADS = 64


class _CappedBody:
    """A request body file that stops storing bytes past a limit.

    twisted.web spools every body before routing; without a cap one client
    could fill the temp disk. Past the limit the rest is read and dropped,
    and the request is answered 413 instead of being routed.
    """

    def __init__(self, inner: Any, cap: int) -> None:
        self.inner, self.cap, self.size, self.overflow = inner, cap, 0, False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.cap:
            self.overflow = True
            return
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TrackedRequest(Request):
    """A request that the site counts while it is in flight (for graceful stop)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        # Never parse form bodies on the reactor: `curl --data-binary` sends
        # application/x-www-form-urlencoded by default, and twisted.web would
        # decode a multi-GB upload in memory. Apps read request.content.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kw)

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        cap = getattr(getattr(self.channel, "site", None), "max_body_size", None)
        if cap is not None:
            self.content = _CappedBody(self.content, cap)  # type: ignore[assignment]
            if length is not None and length > cap:
                self.content.overflow = True

    def process(self) -> None:
        site: SparkSite = self.channel.site  # type: ignore[attr-defined]
        site.active.add(self)
        self.notifyFinish().addBoth(lambda _: site.active.discard(self))
        if isinstance(self.content, _CappedBody) and self.content.overflow:
            from sparkcache.web.serve import error_body

            self.setHeader(b"Connection", b"close")
            body = error_body(self, 413, f"request body larger than server.max_body_size ({site.max_body_size} bytes)")
            self.write(body)
            self.finish()
            return
        super().process()


class JsonErrorChannel(HTTPChannel):
    """Requests twisted.web rejects before routing (header lines over 16 KiB,
    too many headers, malformed request lines) get a JSON error too."""

    _first_bytes_seen = False

    def dataReceived(self, data: bytes) -> None:
        # A TLS ClientHello on a plain-HTTP listener: skopeo, podman and
        # docker try https first against an insecure registry. Closing at
        # once makes them fall back to http now, not after their 10 s
        # handshake timeout (twisted.web would wait for a request line).
        if not self._first_bytes_seen and data:
            self._first_bytes_seen = True
            if data[:1] == b"\x16" and self.transport is not None:
                self.transport.loseConnection()
                return
        super().dataReceived(data)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._reject(400, b"Bad Request", b"malformed or oversized request")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._reject(431, b"Request Header Fields Too Large", b"request line or header longer than 16 KiB")

    def _reject(self, status: int, reason: bytes, message: bytes) -> None:
        body = b'{"error": "%s", "status": %d}\n' % (message, status)
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.loseConnection()


def _channel(factory: Any) -> _GenericHTTPChannelProtocol:
    return _GenericHTTPChannelProtocol(JsonErrorChannel())


class SparkSite(Site):
    requestFactory = TrackedRequest
    protocol = _channel  # type: ignore[assignment]
    noisy = False

    def __init__(self, resource: Any, access_log: bool = False, max_body_size: int | None = None, **kw: Any) -> None:
        super().__init__(resource, **kw)
        self.active: set[TrackedRequest] = set()
        self.access_log = access_log
        self.max_body_size = max_body_size

    def log(self, request: Any) -> None:
        # Off by default: at CI-fleet request rates a line per hit costs a
        # fifth of the hit path and floods the journal; /metrics counts them.
        if not self.access_log:
            return
        # twisted.web's access log would print Authorization-free lines, but
        # URLs can carry signed query strings: log method, path and status only.
        path = request.uri.split(b"?", 1)[0].decode("latin-1", "replace")
        log.info("{method} {path} {code} {size}", method=request.method.decode("latin-1"), path=path,
                 code=request.code, size=request.sentLength)


class SparkcacheService(MultiService):
    """The whole daemon, built here in one place (as magic-wormhole's tap builds
    its server): thread pools, store, cache, each protocol's resource and
    services, timers and listeners. Pools start first and stop last; timers,
    protocol services and listeners start once the store is open. Tests pass
    an ``upstream`` client over an in-memory agent (tests/support/harness.py)."""

    def __init__(self, config: Config, reactor: Any = None, clock: Any = None,
                 protocols: Sequence[ProtocolSpec] = PROTOCOLS, upstream: UpstreamClient | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        self.metrics = Metrics()
        stop_timeout = config.server.shutdown_timeout
        self.pools = MultiService()
        self.pools.setName("pools")
        self.pools.setServiceParent(self)
        sqlite_pool = PoolService("sparkcache-sqlite", 1, reactor, stop_timeout, min_threads=1)
        io_pool = PoolService("sparkcache-io", 4, reactor, stop_timeout, min_threads=1)
        for pool in (sqlite_pool, io_pool):
            pool.setServiceParent(self.pools)
        self.sendfile: SendfilePool | None = None
        if config.server.sendfile:
            sendfile_pool = PoolService("sparkcache-sendfile", SENDFILE_THREADS, reactor, stop_timeout)
            sendfile_pool.setServiceParent(self.pools)
            self.sendfile = SendfilePool(reactor, SENDFILE_THREADS, pool=sendfile_pool.pool)
        self.store = Store(config.storage.data_dir, reactor, config.storage.max_size, io_pool=io_pool.pool,
                           sqlite_pool=sqlite_pool.pool)
        types = remote_types(protocols)
        self.store.index.keep_remotes = frozenset(n for n, r in config.remotes.items() if types[r.type].pinned)
        self.upstream = upstream or UpstreamClient(reactor)
        self.cache = Cache(self.store, self.upstream, self.clock, self.metrics)
        self.ctx = Context(config, self.store, self.cache, self.upstream, self.metrics, Authorizer(config.auth), self.clock,
                           self.sendfile, reactor=reactor, remote_types=types)
        # Started once the store is open, stopped before it closes.
        self.runtime = MultiService()
        self.runtime.setName("runtime")
        # Work a graceful stop waits for, besides responses and fetches.
        self.drains: list[Callable[[], list[Deferred[Any]]]] = []
        apps: dict[bytes, IResource] = {}
        setup: dict[str, SetupEndpoint] = {}
        for spec in protocols:
            built = spec.build(self.ctx)
            for segment in spec.segments:
                resource = built.mounts.get(segment, built.resource)
                if resource is not None:
                    apps[segment] = resource
            for svc in built.services:
                svc.setServiceParent(self.runtime)
            self.drains.extend(built.drains)
            setup.update(built.setup)
        apps[b"setup"] = SetupApp(self.ctx, setup).resource()
        admin = AdminApp(self.ctx).resource()
        self.root = Root(apps, admin)
        self.site = SparkSite(self.root, access_log=config.server.access_log, max_body_size=config.server.max_body_size)
        self.site.displayTracebacks = False
        st = config.storage
        for name, interval, fn in (
            ("eviction", st.eviction_interval, self._evict),
            ("expiry", st.expiry_interval, self._expire),
            ("access-flush", 30.0, self.store.index.flush_access),
        ):
            Periodic(name, interval, fn, self.clock).setServiceParent(self.runtime)
        self.listeners: list[StreamServerEndpointService] = []
        for spec_ in config.server.listen:
            svc = StreamServerEndpointService(serverFromString(reactor, spec_), self.site)
            svc._raiseSynchronously = True
            svc.setServiceParent(self.runtime)
            self.listeners.append(svc)
        self.ready: Deferred[None] = Deferred()

    async def _evict(self) -> None:
        n = await self.store.evict()
        if n:
            self.metrics.evicted.inc(n)

    async def _expire(self) -> None:
        await self.store.expire(self.clock.seconds(), self.config.storage.stale_retention)

    def startService(self) -> None:
        # Pools first; timers and listeners only once the store has been checked,
        # so neither a request nor a timer ever sees a half-opened index.
        super().startService()
        d = ensureDeferred(self.store.start())

        def listen(_: object) -> None:
            self.runtime.setServiceParent(self)
            log.info("sparkcache listening on {listen}; data in {data}", listen=", ".join(self.config.server.listen),
                     data=self.store.data_dir)
            self.ready.callback(None)

        def failed(f: Any) -> None:
            log.critical("sparkcache could not start: {why}", why=f.getErrorMessage())
            self.ready.errback(f)
            # A daemon that cannot listen must not linger looking healthy to
            # its supervisor: stop, and exit non-zero once the reactor is down.
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            if self.reactor.running:
                self.reactor.stop()
            else:
                self.reactor.callWhenRunning(self.reactor.stop)

        d.addCallback(listen).addErrback(failed)

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # 1. stop accepting connections
        stops = [svc.stopService() for svc in self.listeners if svc.running]
        await DeferredList([d for d in stops if isinstance(d, Deferred)], consumeErrors=True)
        # 2. let in-flight responses and upstream fetches finish, within the deadline
        pending = [r.notifyFinish() for r in list(self.site.active) if not r.finished]
        pending += self.cache.running()
        for drain in self.drains:
            pending += drain()
        if pending:
            log.info("waiting up to {t}s for {n} response(s) and fetch(es)", t=self.config.server.shutdown_timeout, n=len(pending))
            all_done: Deferred[Any] = DeferredList(pending, consumeErrors=True)
            all_done.addTimeout(self.config.server.shutdown_timeout, self.reactor)
            try:
                await all_done
            except Exception:
                log.warn("shutdown deadline passed; dropping {n} response(s)", n=len(self.site.active))
                for r in list(self.site.active):
                    if r.channel and r.channel.transport:
                        r.channel.transport.abortConnection()  # type: ignore[attr-defined]
        # 3. timers and protocol services, fetches, spool files, index; the pools last
        if self.runtime.parent is self:
            await self.runtime.disownServiceParent()
        await self.cache.stop()
        await self.upstream.close()
        await self.store.stop()
        await MultiService.stopService(self)
        # A graceful stop is a success: exit 0 rather than have twistd re-raise
        # the SIGTERM that started it (status 143 looks like a crash to
        # supervisors other than systemd).
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None
