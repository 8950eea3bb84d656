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
from twisted.web.resource import IResource

from sparkcache.auth import Authorizer
from sparkcache.config import Config
from sparkcache.context import Context
from sparkcache.fetch import Cache, UpstreamClient
from sparkcache.metrics import Metrics
from sparkcache.pools import PoolService
from sparkcache.protocols import PROTOCOLS, check_segments, remote_types
from sparkcache.protocols.base import ProtocolSpec, SetupEndpoint
from sparkcache.store import Store
from sparkcache.timers import Periodic
from sparkcache.web.admin import AdminApp
from sparkcache.web.bodies import BodyGate
from sparkcache.web.root import Root
from sparkcache.web.sendfile import SendfilePool
from sparkcache.web.setup import SetupApp
from sparkcache.web.site import SparkSite

log = Logger()
SENDFILE_THREADS = 64


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
                           sqlite_pool=sqlite_pool.pool, min_free=config.storage.min_free,
                           min_free_percent=config.storage.min_free_percent)
        types = remote_types(protocols)
        self.store.index.legacy_pinned_remotes = frozenset(n for n, r in config.remotes.items() if types[r.type].pinned)
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
        gates: dict[bytes, BodyGate] = {}
        setup: dict[str, SetupEndpoint] = {}
        check_segments(protocols)
        for spec in protocols:
            built = spec.build(self.ctx)
            for segment in spec.segments:
                resource = built.mounts.get(segment, built.resource)
                if resource is not None:
                    apps[segment] = resource
                    gate = built.gates.get(segment, built.gate)
                    if gate is not None:
                        gates[segment] = gate
            for svc in built.services:
                svc.setServiceParent(self.runtime)
            self.drains.extend(built.drains)
            setup.update(built.setup)
        apps[b"setup"] = SetupApp(self.ctx, setup).resource()
        admin = AdminApp(self.ctx).resource()
        self.root = Root(apps, admin, gates)
        self.site = SparkSite(self.root, access_log=config.server.access_log, max_body_size=config.server.max_body_size,
                              reactor=reactor)
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
