"""The service tree: store, listeners, timers and graceful stop."""

from __future__ import annotations

import os
import signal
from dataclasses import fields, replace
from typing import Any, Callable, Mapping, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from sparkcache.auth import Authorizer
from sparkcache.config import Config
from sparkcache.context import Context
from sparkcache.fetch import Cache, UpstreamClient
from sparkcache.fetch.xlock import KeyLocks
from sparkcache.limits import raise_nofile
from sparkcache.metrics import Metrics
from sparkcache.pools import PoolService
from sparkcache.protocols import PROTOCOLS, check_segments, remote_types
from sparkcache.protocols.base import Built, ProtocolSpec
from sparkcache.reload import LiveConfig, Spread
from sparkcache.store import ROOM_POLL, Store
from sparkcache.store.settings import AppliedGenerations
from sparkcache.timers import Periodic
from sparkcache.web import admin_bundle
from sparkcache.web.admin import AdminApp
from sparkcache.web.root import Root
from sparkcache.web.sendfile import SendfilePool
from sparkcache.web.setup import SetupApp
from sparkcache.web.site import SparkSite
from sparkcache.web.status import Status

log = Logger()
SENDFILE_THREADS = 64
# With worker processes, how often each publishes its connection counts for the others' /metrics.
CONNECTIONS_INTERVAL = 1.0


def per_worker(max_connections: int | None, workers: int) -> int | None:
    """``server.max_connections`` is the daemon's: each of ``workers`` processes
    takes its share (rounded up). Unset: each process's own default (three
    quarters of its open-file limit, which is per process anyway)."""
    if max_connections is None or workers <= 1:
        return max_connections
    return -(-max_connections // workers)


def start_failed(f: Any, reactor: Any, ready: Deferred[None]) -> None:
    """A daemon that cannot start (listen, open its store) must not linger
    looking healthy to its supervisor: stop, and exit non-zero once the
    reactor is down."""
    log.critical("sparkcache could not start: {why}", why=f.getErrorMessage())
    ready.errback(f)
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


class SparkcacheService(MultiService):
    """The whole daemon, built here in one place (as magic-wormhole's tap builds
    its server): thread pools, store, cache, each protocol's resource and
    services, timers and listeners. Pools start first and stop last; timers,
    protocol services and listeners start once the store is open. Tests pass
    an ``upstream`` client over an in-memory agent (tests/support/harness.py)."""

    def __init__(self, config: Config, reactor: Any = None, clock: Any = None,
                 protocols: Sequence[ProtocolSpec] = PROTOCOLS, upstream: UpstreamClient | None = None,
                 config_path: str | None = None, environ: Mapping[str, str] | None = None, *,
                 endpoints: Sequence[IStreamServerEndpoint] | None = None, primary: bool = True,
                 check_store: bool = True, spool_subdir: str | None = None, worker: int | None = None) -> None:
        """``config_path`` (and the ``environ`` it was read with): the file SIGHUP
        re-reads and the API's remotes are validated with; None for a fixed Config.
        ``endpoints`` (a worker process: its adopted sockets) replace
        server.listen; ``primary`` says whether the store-wide timers run in
        this process; ``check_store`` whether the start-up spool sweep and
        index check run (with workers: once, in the parent; docs/workers.rst);
        ``spool_subdir``: this process's own directory in the spool (a worker's,
        emptied by the parent before it restarts that worker); ``worker``: this
        process's index among ``server.workers`` (None: the only process)."""
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        # Before anything sizes itself from it (server.max_connections's default).
        raise_nofile(quiet=endpoints is not None)
        self.live = LiveConfig(config_path, environ, config.storage.data_dir, self.reconfigure, protocols=protocols)
        if worker is not None and config.server.workers > 1:
            # A remotes change through the API in any worker reaches this one (reload.Spread).
            applied = AppliedGenerations(config.storage.data_dir, worker, config.server.workers)
            self.live.spread = Spread(applied, clock or reactor)
        config = self.live.start(config)
        if self.live.spread is not None:
            self.live.spread.applied.mark(self.live.generation)
        self.config = config
        self.protocols = tuple(protocols)
        self.reactor = reactor
        self.clock = clock or reactor
        self.primary = primary
        self.check_store = check_store
        self.metrics = Metrics(self.clock)
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
        content = None
        if config.storage.backend == "s3":
            from sparkcache.store.s3 import content_store

            # A worker process shares the tier with the others: one LRU per host, the primary evicts.
            content = content_store(config.storage, reactor, io_pool.pool, clock=self.clock,
                                    shared=spool_subdir is not None, evicts=primary)
        self.store = Store(config.storage.data_dir, reactor, config.storage.max_size, io_pool=io_pool.pool,
                           sqlite_pool=sqlite_pool.pool, min_free=config.storage.min_free,
                           min_free_percent=config.storage.min_free_percent, content=content)
        self.live.run = self.store.in_io
        if spool_subdir is not None:
            self.store.spool_dir = os.path.join(self.store.spool_dir, spool_subdir)
            os.makedirs(self.store.spool_dir, exist_ok=True)
        types = remote_types(protocols)
        self.store.index.legacy_pinned_remotes = frozenset(n for n, r in config.remotes.items() if types[r.type].pinned)
        self.upstream = upstream or UpstreamClient(reactor)
        self.upstream.observer = self.metrics.upstream_outcome
        # A worker process (its own spool_subdir) shares the store with the
        # others: one production per key across them. (Not config.server.workers:
        # a service built in a single process, as tests do, owns its store.)
        locks = KeyLocks(config.storage.data_dir, self.store.in_io) if spool_subdir is not None else None
        # ... and only a store's sole user knows every key its index has: a cold
        # miss's lookup can then often be skipped (store/keyfilter.py).
        self.filters_keys = spool_subdir is None and not self.store.backed
        self.cache = Cache(self.store, self.upstream, self.clock, self.metrics, locks)
        self.ctx = Context(config, self.store, self.cache, self.upstream, self.metrics, Authorizer(config.auth), self.clock,
                           self.sendfile, reactor=reactor, remote_types=types, live=self.live, primary=primary)
        # Started once the store is open, stopped before it closes.
        self.runtime = MultiService()
        self.runtime.setName("runtime")
        # Work a graceful stop waits for, besides responses and fetches.
        self.drains: list[Callable[[], list[Deferred[Any]]]] = []
        self.setup = SetupApp(self.ctx, {})
        # The status page and /ready; its timer keeps the last hour for the charts.
        self.status = Status(self.ctx, self.runtime)
        self.status.timer().setServiceParent(self.runtime)
        share_errors = self.status.share_errors_timer()
        if share_errors is not None:  # worker processes: the last upstream errors, for the others
            share_errors.setServiceParent(self.runtime)
        self.root = Root({b"setup": self.setup.resource()}, AdminApp(self.ctx, self.status).resource(),
                         gates={b"admin": admin_bundle.body_gate(self.ctx)})  # an import's body: straight to a spool
        if self.store.leases is not None and self.store.leases.peer_url:  # the other hosts stream our flights
            from sparkcache.web.peer import PeerFlights

            self.root.apps[b"_peer"] = PeerFlights(self.ctx)
        # What each protocol's build() gave, for reconfigure().
        self.built: dict[str, Built] = {}
        check_segments(protocols)
        for spec in protocols:
            self._install(spec, spec.build(self.ctx))
        srv = config.server
        self.site = SparkSite(self.root, access_log=srv.access_log, max_body_size=srv.max_body_size,
                              idle_timeout=srv.idle_timeout, header_timeout=srv.header_timeout,
                              max_connections=per_worker(srv.max_connections, srv.workers), reactor=reactor)
        self.site.displayTracebacks = False
        self.metrics.site = self.site
        st = config.storage
        timers: list[tuple[str, float, Callable[[], Any]]] = [("access-flush", 30.0, self.store.index.flush_access)]
        if primary:  # store-wide work: one process only
            timers += [("eviction", st.eviction_interval, self._evict), ("expiry", st.expiry_interval, self._expire)]
            if st.backend == "s3":  # the bucket's sweeper (elected among the hosts) and its hints
                from sparkcache.store.s3.sweep import timers as s3_timers

                timers += s3_timers(self.store.cas, st)
        if config.server.workers > 1:  # the other workers' /metrics read this process's counts from its file
            timers.append(("connections", CONNECTIONS_INTERVAL, self.metrics.publish))
            if primary:  # the room for space another worker found missing (it never evicts itself)
                timers.append(("room", ROOM_POLL, self.store.make_wanted_room))
        for name, interval, fn in timers:
            Periodic(name, interval, fn, self.clock).setServiceParent(self.runtime)
        self.listeners: list[StreamServerEndpointService] = []
        # Each ssl: listener's TLS, re-read from its files on SIGHUP (web/tls.py).
        self.tls: list[Any] = []
        if endpoints is None:
            endpoints = [self._endpoint(reactor, spec_) for spec_ in config.server.listen]
        else:  # a worker's adopted sockets: an ssl: one carries its TLS
            self.tls = [tls for tls in (getattr(e, "tls", None) for e in endpoints) if tls is not None]
        for endpoint in endpoints:
            svc = StreamServerEndpointService(endpoint, self.site)
            svc._raiseSynchronously = True
            svc.setServiceParent(self.runtime)
            self.listeners.append(svc)
        self.ready: Deferred[None] = Deferred()
        self._previous_hup: Any = None
        self._stopping = False

    def _endpoint(self, reactor: Any, spec: str) -> IStreamServerEndpoint:
        if spec.split(":", 1)[0].strip().lower() == "ssl":
            from sparkcache.web.tls import ssl_endpoint  # OpenSSL: only where there is an ssl: listener

            made = ssl_endpoint(reactor, spec)
            if made is not None:
                self.tls.append(made[1])
                return made[0]
        return serverFromString(reactor, spec)

    async def reload_tls(self) -> int:
        """Re-read every ssl: listener's certificate and key (SIGHUP); new connections
        use them, open ones keep theirs. Files that do not load are logged and the
        listener keeps what it had. Returns how many listeners took new files."""
        from sparkcache.web.tls import TLSFileError

        done = 0
        for tls in self.tls:
            try:
                options = await self.store.in_io(tls.load)
            except TLSFileError as e:
                log.error("tls: {file}: {why}; new connections keep the certificate loaded before",
                          file=e.path, why=e.why)
                continue
            except Exception:
                log.failure("tls: re-reading {cert} failed; new connections keep the certificate loaded before",
                            cert=tls.files.cert)
                continue
            tls.use(options)
            done += 1
        return done

    def _install(self, spec: ProtocolSpec, built: Built) -> None:
        """Mount a protocol's apps, gates and /setup kinds; start its services
        (at once when the runtime services already run)."""
        self.built[spec.name] = built
        for segment in spec.segments:
            resource = built.mounts.get(segment, built.resource)
            if resource is not None:
                self.root.apps[segment] = resource
                gate = built.gates.get(segment, built.gate)
                if gate is not None:
                    self.root.gates[segment] = gate
        for svc in built.services:
            svc.setServiceParent(self.runtime)
        self.drains.extend(built.drains)
        self.setup.endpoints.update(built.setup)

    # -- live configuration ------------------------------------------------------------

    def reconfigure(self, new: Config) -> None:
        """Make ``new`` the running configuration (validated already: LiveConfig).

        Requests and fetches already under way keep the remote they looked up;
        the next request sees ``new``. Listeners and the data dir (every
        ``server:`` and ``storage:`` key) keep their running values until a restart."""
        old = self.ctx.config
        for section, kept, given in (("server", old.server, new.server), ("storage", old.storage, new.storage)):
            for f in fields(kept):
                if getattr(kept, f.name) != getattr(given, f.name):
                    value = getattr(kept, f.name)
                    log.warn("sparkcache: {key} changed in {source}; it takes effect at the next restart "
                             "(still {value})", key=f"{section}.{f.name}", source=new.source,
                             value=", ".join(value) if isinstance(value, tuple) else repr(value))
        new = replace(new, server=old.server, storage=old.storage)
        self.ctx.config = self.config = new
        self.ctx.auth = Authorizer(new.auth)
        pinned = frozenset(n for n, r in new.remotes.items() if self.ctx.remote_types[r.type].pinned)
        self.store.index.legacy_pinned_remotes |= pinned
        for spec in self.protocols:
            self._reconfigure_protocol(spec, old, new)
        added = sorted(set(new.remotes) - set(old.remotes))
        removed = sorted(set(old.remotes) - set(new.remotes))
        changed = sorted(n for n in set(old.remotes) & set(new.remotes) if old.remotes[n] != new.remotes[n])
        log.info("sparkcache: configuration applied ({n} remotes; added: {added}; removed: {removed}; "
                 "changed: {changed})", n=len(new.remotes), added=", ".join(added) or "none",
                 removed=", ".join(removed) or "none", changed=", ".join(changed) or "none")

    def _reconfigure_protocol(self, spec: ProtocolSpec, old: Config, new: Config) -> None:
        built = self.built[spec.name]
        try:
            if built.reconfigure is not None:
                built.reconfigure(new)
            elif _is_empty(built):
                # Nothing was mounted (no remote of its types at start): build it now.
                fresh = spec.build(self.ctx)
                if not _is_empty(fresh):
                    self._install(spec, fresh)
                    log.info("sparkcache: {proto} now served", proto=spec.name)
            elif _owned(spec, old) != _owned(spec, new):
                log.warn("sparkcache: protocol {proto}: its remotes or section changed; this takes effect at the "
                         "next restart", proto=spec.name)
        except Exception:
            log.failure("sparkcache: protocol {proto} could not apply the new configuration", proto=spec.name)

    def _on_hup(self) -> None:
        if self._stopping:
            log.info("sparkcache: SIGHUP ignored: stopping")
            return
        log.info("sparkcache: SIGHUP: reloading {path}", path=self.live.path)
        ensureDeferred(self.live.reload()).addErrback(lambda f: log.failure("sparkcache: reload failed", f))
        if self.tls:  # renewed certificates (certbot, cert-manager), whatever the config's fate
            ensureDeferred(self.reload_tls()).addErrback(lambda f: log.failure("tls: reload failed", f))

    def _install_hup(self) -> None:
        # Reactor-safe: the handler only schedules the reload on the reactor.
        # Only for a daemon started from a file, and only where signals can be set.
        if self.live.path is None or not hasattr(signal, "SIGHUP"):
            return
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, lambda sig, frame: self.reactor.callFromThread(self._on_hup))
        except ValueError:  # not the main thread
            self._previous_hup = None
            return
        if self.live.spread is not None:
            # Another worker changed the API remotes (its parent forwards SIGUSR2 to every worker).
            signal.signal(signal.SIGUSR2, lambda sig, frame: self.reactor.callFromThread(self._on_remotes_changed))
            # A change made between this worker's first read of api.json and now sent no signal here.
            self.reactor.callLater(0, self._on_remotes_changed)

    def _on_remotes_changed(self) -> None:
        if self._stopping:
            return
        ensureDeferred(self.live.refresh()).addErrback(lambda f: log.failure("sparkcache: remotes refresh failed", f))

    def _remove_hup(self) -> None:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None

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
        self._install_hup()
        d = ensureDeferred(self.store.start(check=self.check_store))

        def listen(_: object) -> None:
            if self.filters_keys:
                self.store.index.filter_keys()  # (in the background; lookups go to the index meanwhile)
            elif self.primary:
                self.store.index.fill_shared_keys()  # (likewise, for every worker: a no-op without one)
            self.status.store_open = True
            self.runtime.setServiceParent(self)
            self.status.listening = True
            log.info("sparkcache listening on {listen}; data in {data}", listen=", ".join(self.config.server.listen),
                     data=self.store.data_dir)
            self.ready.callback(None)

        d.addCallback(listen).addErrback(start_failed, self.reactor, self.ready)

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # SIGHUP stays handled (ignored) until the end: a reload racing a stop must not kill the daemon.
        self._stopping = True
        self.status.stopping = True
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
        # The hits batched since the last publish: a worker's counters outlive it (its file stays).
        self.metrics.publish()
        await MultiService.stopService(self)
        # A graceful stop is a success: exit 0 rather than have twistd re-raise
        # the SIGTERM that started it (status 143 looks like a crash to
        # supervisors other than systemd).
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None
        self._remove_hup()


def _is_empty(built: Built) -> bool:
    return built.resource is None and not built.mounts and not built.services and not built.setup


def _owned(spec: ProtocolSpec, config: Config) -> tuple[dict[str, Any], Any]:
    """The part of ``config`` a protocol reads: its remotes and its section."""
    types = {t.name for t in spec.remote_types}
    return ({n: r for n, r in config.remotes.items() if r.type in types},
            config.section(spec.section) if spec.section else None)
