"""Bare mirrors managed with pygit2 in their own thread pool.

Every operation that changes a mirror (clone, fetch, seed, repack, fsck) runs
in the pool under that mirror's DeferredLock, so at most one runs per mirror;
a refresh asked for while one is running joins it (each caller gets its own
Deferred, so a cancelled request never cancels the fetch).

A mirror is cloned into ``<data_dir>/git/tmp`` and renamed into place once
complete: a path under ``mirrors/`` is always a whole repository. A mirror
that pygit2 cannot open or that fails ``git fsck`` is re-cloned the same way,
and the old one moved to ``trash/`` (removed at the next maintenance run, so
an upload-pack still reading it is not cut off).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import pygit2
from pygit2.enums import FetchPrune
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sparkcache.fetch.produce import Singleflight
from sparkcache.git.config import GitConfig
from sparkcache.git.credentials import Callbacks, describe
from sparkcache.git.interfaces import IMirrors, Mirror, MirrorLimit, MirrorUnavailable
from sparkcache.pools import DaemonThreadPool, stop_pool
from sparkcache.git.rates import ACTIVE, HostCollector, HostGauges, HostRates, forge_host, interval_for
from sparkcache.git.refcheck import CheckError, RefChecker, is_http
from sparkcache.git.registry import RUNTIME_SOURCES, RegistrationError, Registry
from sparkcache.git.served import ServedStamps, Shared
from sparkcache.git.shared import (
    FetchRecord, MirrorLocks, RegistryChanges, Seen, read_host_stats, read_record, served_anywhere, wait,
    write_host_stats, write_record,
)
from sparkcache.git.repo_ops import (
    CHANGED,
    CONNECT_TIMEOUT_MS,
    IO_TIMEOUT_MS,
    MIRROR_REFSPEC,
    UNCHANGED,
    FetchResult,
    advertised_refs,
    bundle_default_branch,
    configure,
    dir_size,
    head_of,
    fetch_bundle,
    fsck,
    head_target,
    install,
    is_repo,
    missing_sync,
    origin,
    load_refs,
    probe_batch,
    read_refs,
    remove_ref_locks,
    remove_stale_locks,
    run_git,
    seed_refs,
    set_head,
    snapshot,
    terminate_children,
)

T = TypeVar("T")
log = Logger()


class FetchError(MirrorUnavailable):
    """Fetching from (or cloning) the upstream failed."""


class DamagedMirror(FetchError):
    """fsck found damage and the re-clone failed: the next refresh re-clones."""


class TooSoon(Exception):
    """Another worker fetched this mirror less than git.min_fetch_interval ago (before
    we asked): wait until ``at`` and ask again."""

    def __init__(self, at: float) -> None:
        super().__init__(at)
        self.at = at


# Mirrors whose last fetch time is remembered for pacing (oldest dropped first).
MAX_PACED = 10_000


@dataclass
class MirrorState:
    last_fetch: float | None = None
    last_error: str | None = None
    last_change: float | None = None
    refs: dict[str, str] | None = None
    head: str | None = None      # the branch HEAD points at
    size: int | None = None
    dirty: bool = False          # new objects since the last repack
    damaged: bool = False        # failed fsck; re-cloned by the next refresh
    last_repack: float | None = None
    last_fsck: float | None = None
    serving: int = 0
    fetching: bool = False
    last_served: float | None = None
    absent: bool = False         # not on disk at the last check (never cloned)
    refs_seen: int | None = None  # how many refs another worker's fetch left (GET /repos)
    # With worker processes (GET /repos): the newest served stamp of any worker, and
    # the primary's (interval, next check) of this mirror, as last read.
    served_seen: float | None = None
    scheduled: tuple[float, float] | None = None


@implementer(IMirrors)
class Mirrors:
    def __init__(self, config: GitConfig, data_dir: str, reactor: Any, clock: Any = None, metrics: Any = None,
                 shared: bool = False) -> None:
        """``shared``: other worker processes use the same mirrors (server.workers > 1):
        per-mirror flocks, shared fetch records and registry (git/shared.py)."""
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        self.metrics = metrics
        self.git_dir = os.path.abspath(os.path.join(data_dir, "git"))
        self.tmp_dir = os.path.join(self.git_dir, "tmp")
        self.trash_dir = os.path.join(self.git_dir, "trash")
        self.registry = Registry(config, self.git_dir)
        self.registry.admit = self._admit
        for problem in self.registry.load():
            log.warn("git registry: {problem}", problem=problem)
        self.pool = DaemonThreadPool(0, config.threads + config.fetch_concurrency, "sparkcache-git")
        self._cancel = threading.Event()
        # _locks: operations that change refs or replace the repository (clone, fetch,
        # seed, fsck + re-clone); _mlocks: repack and commit-graph, which git lets run
        # beside a fetch, so a long repack never delays a fetch for a just-pushed commit.
        self._locks: dict[str, DeferredLock] = {}
        self._mlocks: dict[str, DeferredLock] = {}
        # One fetch per mirror at a time; refresh() callers join the running one.
        self._refreshes: Singleflight[str, dict[str, str]] = Singleflight()
        # One ref check per mirror at a time; a clone of a stale mirror joins the loop's.
        self._checks: Singleflight[str, str] = Singleflight()
        self.rates = HostRates(config.max_upstream_rate, self.clock)
        self.checker = RefChecker(reactor)
        self.scheduler: Any = None  # the loop.Scheduler, told about new and cloned mirrors
        registry = getattr(metrics, "registry", None)
        self.gauges: HostGauges | None = None
        if registry is not None and not shared:
            registry.register(HostCollector(self))
        elif registry is not None:
            self.gauges = HostGauges(self, registry)
        self._state: dict[str, MirrorState] = {}
        self._creds: dict[str, Any] = {}
        self._building: set[str] = set()
        self._building_lock = threading.Lock()
        self._stopped = False
        # mirror path -> when its last upstream fetch ended (git.min_fetch_interval)
        self._fetched_at: dict[str, float] = {}
        self.xlocks: MirrorLocks | None = None
        self.stamps: ServedStamps | None = None
        self._syncs: Singleflight[str, None] = Singleflight()
        self._last_save: Deferred[Any] | None = None
        self.primary = True  # GitService says: the check loop and maintenance run here
        self._shared_hosts: dict[str, tuple[int, float]] = {}
        if shared:
            self.xlocks = MirrorLocks(self.git_dir, self.run, self.clock)
            self.stamps = ServedStamps(self.git_dir, self.run, lambda: self.config.fetch_interval)
            self.registry.changes = RegistryChanges(self.git_dir)
            # What the others registered before this worker started.
            seen, entries = self.registry.read_shared()
            self.registry.merge(entries, shared=True)
            self.registry.changes.seen = seen
        pygit2.settings.server_connect_timeout = CONNECT_TIMEOUT_MS
        pygit2.settings.server_timeout = IO_TIMEOUT_MS

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if not self.pool.started and not self._stopped:
            self.pool.start()

    def stop(self, timeout: float | None = None) -> Deferred[bool]:
        """Final (a restarted pool would keep the process alive): abort transfers and git
        children, then wait for the workers, at most ``timeout`` seconds (None: unbounded)."""
        self._stopped = True
        self._cancel.set()
        terminate_children()
        self.checker.close()
        if timeout is None:
            if self.pool.started:
                self.pool.stop()
            return succeed(True)
        return stop_pool(self.pool, self.reactor, timeout)

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._stopped:
            return fail(MirrorUnavailable("the git mirrors are shutting down"))
        self.start()
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def idle(self, mirror: Mirror) -> Deferred[None]:
        """Fires once the operations queued on this mirror so far are done."""
        d = self._lock(mirror).run(lambda: succeed(None))
        return d.addCallback(lambda _: self._lock(mirror, self._mlocks).run(lambda: succeed(None)))

    def in_flight(self) -> list[Deferred[Any]]:
        """One Deferred per running operation (for a graceful stop)."""
        return self._refreshes.ends()

    def reconfigure(self, config: GitConfig) -> None:
        """Follow a new ``git:`` section (a reload). New repos are scheduled at
        once; removed ones are no longer fetched (the loop drops them at their
        next turn) and their mirrors stay on disk; credentials, intervals,
        allowed hosts and rate caps apply from the next fetch on. A fetch under
        way finishes with what it started with."""
        added, removed = self.registry.reconfigure(config)
        for key in ("threads", "fetch_concurrency"):
            if getattr(config, key) != getattr(self.config, key):
                log.warn("git.{key} changed; it takes effect at the next restart", key=key)
        self.config = config
        self._creds.clear()
        self.rates.rate = config.max_upstream_rate
        self.rates.caps.clear()
        for reg in removed:
            if self.registry.get(reg.name) is None:
                log.info("git: {name} is no longer configured: not fetched any more; its mirror stays in {path}",
                         name=reg.name, path=self.registry.path_for(reg))
        for reg in added:
            log.info("git: {name} ({url}) configured", name=reg.name, url=reg.url)
            self._schedule(self.registry.mirror(reg))
        if self.registry.dirty():
            self._save_registry()

    # -- registry ---------------------------------------------------------------

    def lookup(self, name_or_url: str) -> Mirror:
        reg, created = self.registry.resolve(name_or_url)
        if created:
            self._schedule(self.registry.mirror(reg))
            # Saved once its first clone succeeds (see refresh): a name that does
            # not exist upstream must not stay registered, or anonymous clients
            # could grow the registry without bound.
            log.info("git: {name} ({url}) on an allow-listed host, first use", name=reg.name, url=reg.url)
        return self.registry.mirror(reg)

    def register(self, name: str | None, url: str) -> Mirror:
        """A runtime registration (``POST /git/register``); raises RegistrationError."""
        reg, created = self.registry.register(name, url)
        if created:
            log.info("git: registered {name} ({url})", name=reg.name, url=reg.url)
            self._save_registry()
            self._schedule(self.registry.mirror(reg))
        return self.registry.mirror(reg)

    def mirrors(self) -> list[Mirror]:
        return [self.registry.mirror(r) for r in self.registry.all()]

    def _admit(self) -> None:
        """Refuse one more run-time mirror over git.max_mirrors or git.max_size
        (anonymous clients on an allowed host must not grow the disk without bound)."""
        cfg = self.config
        if self.registry.created_at_runtime() >= cfg.max_mirrors:
            raise MirrorLimit(f"this cache already holds git.max_mirrors ({cfg.max_mirrors}) mirrors created at "
                              "run time; list the repository in git.repos or raise the limit")
        if cfg.max_size is not None:
            used = self.disk_used()
            if used >= cfg.max_size:
                raise MirrorLimit(f"the git mirrors take {used} bytes, at or over git.max_size ({cfg.max_size}); "
                                  "no new mirror is created until some are removed or the budget is raised")

    def disk_used(self) -> int:
        """Bytes the mirrors take on disk, as last measured (after each fetch, each
        maintenance, and at start-up by ``measure``)."""
        return sum(st.size for st in self._state.values() if st.size)

    def measure(self) -> Deferred[int]:
        """Read the size of every mirror on disk whose size is not known yet (in
        the pool), so that git.max_size counts mirrors cloned before a restart."""
        todo = [m for m in self.mirrors() if self.state(m).size is None]

        def sizes() -> list[int | None]:
            return [dir_size(m.path) if is_repo(m.path) else None for m in todo]

        def done(found: list[int | None]) -> int:
            for m, size in zip(todo, found):
                st = self.state(m)
                if st.size is None and size is not None:
                    st.size = size
            return self.disk_used()

        return self.run(sizes).addCallback(done)

    def _schedule(self, mirror: Mirror) -> None:
        if self.scheduler is not None:
            if self.stamps is not None:
                self.stamps.learn(mirror.path)  # served elsewhere before the loop knew it?
            self.scheduler.touch(mirror)

    def _save_registry(self) -> None:
        snap = self.registry.snapshot()
        d = self.run(self.registry.save, snap)
        self._last_save = d
        changes = self.registry.changes
        if changes is not None:
            def saved(value: int | None) -> None:
                self.registry.written(e["name"] for e in snap[1])
                if value is not None and value == changes.seen + 1:
                    changes.seen = value  # nobody else wrote since our last look: nothing to re-read

            d.addCallback(saved)
        d.addErrback(lambda f: log.failure("git: could not save the registry", f))

    def flushed(self) -> Deferred[None]:
        """Fires once the registrations made so far are written (with worker processes,
        a registration is answered only then, so the next request may reach another)."""
        d = self._last_save
        if d is None or d.called:
            return succeed(None)
        out: Deferred[None] = Deferred()

        def fire(result: Any) -> Any:
            out.callback(None)
            return result

        d.addBoth(fire)
        return out

    def synced(self) -> Deferred[None]:
        """Fires once this worker knows the registrations the others wrote (with one
        process, or when nothing changed: at once; else the file is re-read in the pool)."""
        changes = self.registry.changes
        if changes is None or not changes.stale():
            return succeed(None)
        return self._syncs.run("registry", lambda: self.run(self.registry.read_shared).addCallback(self._merge))

    def _merge(self, shared: tuple[int, list[Any]]) -> Deferred[None] | None:
        value, entries = shared
        known = {m.path for m in self.mirrors()}
        added, problems = self.registry.merge(entries, shared=True)
        assert self.registry.changes is not None
        self.registry.changes.seen = value
        for problem in problems:
            log.warn("git registry: {problem}", problem=problem)
        for path in known - {m.path for m in self.mirrors()}:
            self._state.pop(path, None)
        for reg in added:
            self._schedule(self.registry.mirror(reg))
        if added and self.config.max_size is not None:
            # git.max_size counts the mirrors the others cloned too.
            return self.measure().addBoth(lambda _: None)
        return None

    def exists(self, mirror: Mirror) -> bool:
        return is_repo(mirror.path)

    # -- state for GET /repos -----------------------------------------------------

    def state(self, mirror: Mirror) -> MirrorState:
        st = self._state.get(mirror.path)
        if st is None:
            st = self._state[mirror.path] = MirrorState()
        return st

    def present(self, mirrors: list[Mirror]) -> Deferred[list[Mirror]]:
        """The mirrors among ``mirrors`` that exist on disk (the stat calls run in the pool)."""
        return self.run(lambda: [m for m in mirrors if is_repo(m.path)])

    def status(self) -> Deferred[list[dict[str, Any]]]:
        regs = self.registry.all()
        mirrors = [self.registry.mirror(r) for r in regs]

        def build(cloned: list[Mirror]) -> list[dict[str, Any]]:
            paths = {c.path for c in cloned}
            return [self._status(r, m, m.path in paths) for r, m in zip(regs, mirrors)]

        if self.xlocks is None:
            return self.present(mirrors).addCallback(build)

        # Worker processes: what the others fetched, checked and served is in the
        # mirrors' records and stamps; the loop's schedule is the primary's.
        xlocks, stamps, paths = self.xlocks, self.stamps, [m.path for m in mirrors]

        def read() -> list[tuple[Seen, Shared]]:
            shared = stamps.read_sync(paths) if stamps is not None else [(None, None)] * len(paths)
            return list(zip(xlocks.seen_sync(paths), shared))

        def adopt(found: list[tuple[Seen, Shared]]) -> Deferred[list[Mirror]]:
            for m, (seen, (served, scheduled)) in zip(mirrors, found):
                st = self.state(m)
                self._adopt(st, seen)
                if served is not None and (st.served_seen is None or served > st.served_seen):
                    st.served_seen = served
                if scheduled is not None:
                    st.scheduled = (scheduled.interval, scheduled.due)
            return self.present(mirrors)

        return self.run(read).addCallback(adopt).addCallback(build)

    def _adopt(self, st: MirrorState, seen: Seen) -> None:
        """Take what another worker's fetch or check found, when newer than what we know."""
        record, checked = seen
        if record is not None and (st.last_fetch is None or st.last_fetch < record.ended):
            st.last_fetch, st.last_error = record.ended, record.error
            if record.size is not None:
                st.size = record.size
            if record.changed is not None and (st.last_change is None or record.changed > st.last_change):
                st.last_change = record.changed
            st.refs_seen = record.refs
        if checked is not None and (st.last_fetch is None or st.last_fetch < checked.at):
            st.last_fetch, st.last_error = checked.at, checked.error

    def _share_check(self, mirror: Mirror, st: MirrorState) -> None:
        if self.xlocks is not None and st.last_fetch is not None:
            self.xlocks.checked(mirror.path, st.last_fetch, st.last_error)

    def _status(self, reg: Any, m: Mirror, cloned: bool) -> dict[str, Any]:
        st = self.state(m)
        interval, due = self.scheduler.next_check(m) if self.scheduler is not None else (None, None)
        served = max((t for t in (st.last_served, st.served_seen) if t is not None), default=None)
        if self.scheduler is None and self.xlocks is not None:
            # Another worker (the primary) runs the loop: its times, from its .next
            # record; before it wrote one, the interval by the loop's rule.
            if st.scheduled is not None:
                interval, due = st.scheduled
            else:
                interval = interval_for(self.config, self.clock.seconds(), served, st.last_change)
                due = st.last_fetch + interval if st.last_fetch is not None else None
        return {"name": reg.name, "url": reg.url, "source": reg.source, "cloned": cloned,
                "last_fetch": st.last_fetch, "last_check": st.last_fetch, "last_change": st.last_change,
                "last_served": served, "last_error": st.last_error,
                "interval": interval, "next_check": due, "host": forge_host(m.url),
                "size": st.size, "refs": len(st.refs) if st.refs is not None else st.refs_seen,
                "fetching": st.fetching, "credentials": describe(self._credentials(m))}

    def hosts(self, primary: dict[str, tuple[int, float]] | None = None) -> list[dict[str, Any]]:
        """Per forge host: ref checks sent, their rate over the last minute, the cap.
        ``primary``: the primary worker's (checks, rate) per host, added to ours."""
        counts: dict[str, int] = {}
        for r in self.registry.all():
            h = forge_host(r.url)
            counts[h] = counts.get(h, 0) + 1
        stats = {s.host: (s.checks, s.rate) for s in self.rates.stats()}
        for host, (checks, rate) in (primary or {}).items():
            mine = stats.get(host, (0, 0.0))
            stats[host] = (mine[0] + checks, mine[1] + rate)
        out = []
        for host in sorted(set(counts) | set(stats)):
            checks, rate = stats.get(host, (0, 0.0))
            out.append({"host": host, "checks": checks, "checks_per_second": round(rate, 3),
                        "max_upstream_rate": self.rates.rate, "mirrors": counts.get(host, 0)})
        return out

    def hosts_view(self) -> Deferred[list[dict[str, Any]]]:
        """``hosts()`` for GET /repos/hosts: with worker processes, the primary's loop
        checks (shared through a file each second, ``share_hosts``) count too."""
        if self.xlocks is None or self.primary:
            return succeed(self.hosts())
        d = self.run(read_host_stats, self.xlocks.hosts_path())
        return d.addCallback(lambda primary: self.hosts(primary))

    def share_hosts(self) -> Deferred[None] | None:
        """The primary's per-host check counts, for the other workers' GET /repos/hosts."""
        if self.xlocks is None:
            return None
        if self.gauges is not None:
            self.gauges.publish()
        if not self.primary:
            return None
        stats = {s.host: (s.checks, s.rate) for s in self.rates.stats()}
        if stats == self._shared_hosts:
            return None
        self._shared_hosts = stats
        return self.run(write_host_stats, self.xlocks.hosts_path(), stats)

    # -- serving guard (no pruning repack while upload-pack reads a mirror) -------

    def acquire(self, mirror: Mirror) -> None:
        st = self.state(mirror)
        st.serving += 1
        if st.serving == 1 and self.xlocks is not None:
            self.xlocks.serve_begin(mirror.path)
        self._served(mirror, st, self.clock.seconds())
        if self.scheduler is not None:
            self.scheduler.touch(mirror)

    def _served(self, mirror: Mirror, st: MirrorState, now: float) -> None:
        st.last_served = now
        if self.stamps is not None:
            # For the primary's loop (and GET /repos everywhere): at most one stamp
            # per fetch_interval, so most serves cost one dict lookup here.
            self.stamps.note(mirror.path, now)

    def sync_served(self) -> Deferred[None] | None:
        """The primary, every second: serves (and changing fetches) in the other
        workers reach the loop. Mirrors stamped or changed since the last look are
        touched (next check within fetch_interval), and their interval follows."""
        stamps = self.stamps
        if stamps is None or not stamps.changed():
            return None
        mirrors = self.mirrors()
        paths = [m.path for m in mirrors]
        by_path = dict(zip(paths, mirrors))

        def served(found: dict[str, tuple[float | None, float | None]]) -> None:
            now = self.clock.seconds()
            for path, (at, changed) in found.items():
                m = by_path[path]
                st = self.state(m)
                if at is not None and (st.last_served is None or at > st.last_served):
                    st.last_served = at
                if changed is not None and (st.last_change is None or changed > st.last_change):
                    st.last_change = changed  # (GET /repos here may have taken it already)
                # Touched when active by the loop's rule (a touch of a mirror due
                # soon anyway does nothing); one served or changed longer ago (read
                # after a restart) is left to the next reschedule.
                if self.scheduler is not None and any(t is not None and now - t <= ACTIVE for t in (at, changed)):
                    self.scheduler.touch(m)

        return stamps.collect(paths).addCallback(served)

    def release(self, mirror: Mirror) -> None:
        st = self.state(mirror)
        st.serving = max(0, st.serving - 1)
        if st.serving == 0 and self.xlocks is not None:
            self.xlocks.serve_end(mirror.path)

    @contextmanager
    def serving(self, mirror: Mirror) -> Iterator[Mirror]:
        self.acquire(mirror)
        try:
            yield mirror
        finally:
            self.release(mirror)

    # -- operations -----------------------------------------------------------------

    def _credentials(self, mirror: Mirror) -> Any:
        if mirror.path not in self._creds:
            self._creds[mirror.path] = self.config.credentials_for(mirror.name, mirror.url)
        return self._creds[mirror.path]

    def _lock(self, mirror: Mirror, locks: dict[str, DeferredLock] | None = None) -> DeferredLock:
        locks = self._locks if locks is None else locks
        lock = locks.get(mirror.path)
        if lock is None:
            lock = locks[mirror.path] = DeferredLock()
        return lock

    def _exclusive(self, mirror: Mirror, fn: Callable[..., T], *args: Any, kind: str = "") -> Deferred[T]:
        """Run ``fn(*args)`` in the pool, after any other operation on this mirror (with
        worker processes: in any of them). ``kind="maint"``: repack and commit-graph."""
        lock = self._lock(mirror, self._mlocks if kind else None)
        xlocks = self.xlocks
        if xlocks is None:
            return lock.run(self.run, fn, *args)
        return lock.run(lambda: Deferred.fromCoroutine(xlocks.holding(mirror.path, fn, *args, kind=kind)))

    def ensure(self, mirror: Mirror) -> Deferred[Mirror]:
        if self.exists(mirror):
            return succeed(mirror)
        d = self.refresh(mirror)

        def check(_: object) -> Mirror:
            if not self.exists(mirror):
                raise MirrorUnavailable(f"{mirror.name}: the mirror is not available")
            return mirror

        return d.addCallback(check)

    def refresh(self, mirror: Mirror, clone: bool = True, paced: bool = True) -> Deferred[dict[str, str]]:
        """Fetch now (cloning when the mirror is missing, unless ``clone`` is False),
        joining a fetch already running for this mirror. ``paced``: wait until
        git.min_fetch_interval has passed since the last fetch ended (False only
        for the forge's own signed push webhooks)."""
        if self.xlocks is not None:
            return self._refreshes.run(mirror.path,
                                       lambda: Deferred.fromCoroutine(self._paced_shared(mirror, clone, paced)))
        return self._refreshes.run(mirror.path, lambda: Deferred.fromCoroutine(self._paced(mirror, clone, paced)))

    async def _paced_shared(self, mirror: Mirror, clone: bool, paced: bool) -> dict[str, str]:
        # Across worker processes: the fetch record says when the last fetch of
        # any worker ended. One ending after we asked is our answer (joined, as
        # the singleflight joins one in this process); else wait out
        # min_fetch_interval from its end, then fetch under the mirror's lock.
        assert self.xlocks is not None
        asked = self.clock.seconds()
        while True:
            if paced:
                record = await self.xlocks.read(mirror.path)
                if record is not None and record.ended < asked:
                    await wait(self.clock, record.ended + self.config.min_fetch_interval - self.clock.seconds())
            try:
                return await self._refresh(mirror, clone, (asked, paced))
            except TooSoon as e:
                await wait(self.clock, e.at - self.clock.seconds())

    async def _paced(self, mirror: Mirror, clone: bool, paced: bool) -> dict[str, str]:
        # One fetch in flight per mirror (the singleflight above), and the next
        # one no sooner than min_fetch_interval after the last ended: whoever asks
        # in between (unknown SHAs, refreshes, webhooks) joins this one, so a
        # storm of requests costs the forge one fetch per interval at most.
        last = self._fetched_at.get(mirror.path)
        if last is not None and paced:
            wait = last + self.config.min_fetch_interval - self.clock.seconds()
            if wait > 0:
                await deferLater(self.clock, wait)
        try:
            return await self._refresh(mirror, clone)
        finally:
            # Kept for names that failed and were forgotten too (a repository
            # that does not exist is not asked for again at once); bounded.
            self._fetched_at.pop(mirror.path, None)
            self._fetched_at[mirror.path] = self.clock.seconds()
            if len(self._fetched_at) > MAX_PACED:
                for path in list(self._fetched_at)[:MAX_PACED // 2]:
                    del self._fetched_at[path]

    def _refresh(self, mirror: Mirror, clone: bool, shared: tuple[float, bool] | None = None) -> Deferred[dict[str, str]]:
        st = self.state(mirror)
        st.fetching = True
        known = dict(st.refs) if st.refs is not None else None
        creds = self._credentials(mirror)
        if shared is None:
            d = self._exclusive(mirror, self._fetch_sync, mirror, creds, known, clone, st.damaged)
        else:
            asked, paced = shared
            reg = self.registry.get(mirror.name)
            reserve = reg if reg is not None and reg.source in RUNTIME_SOURCES else None
            d = self._exclusive(mirror, self._fetch_shared_sync, mirror, creds, clone, st.damaged, asked,
                                self.config.min_fetch_interval if paced else 0.0, reserve)

        def done(result: Any) -> Any:
            st.fetching = False
            if isinstance(result, Failure) and result.check(TooSoon):
                return result  # nothing happened: _paced_shared waits and asks again
            st.last_fetch = self.clock.seconds()
            if isinstance(result, Failure):
                self._failed(mirror, st, result.getErrorMessage())
                self._count("error")
                if self.registry.forget_unused_host(mirror.name):
                    self._state.pop(mirror.path, None)
                    self._creds.pop(mirror.path, None)
                    for locks in (self._locks, self._mlocks):
                        lock = locks.get(mirror.path)
                        if lock is not None and not lock.locked and not lock.waiting:
                            del locks[mirror.path]
                    self._save_registry()
                if not result.check(MirrorUnavailable, MirrorLimit):
                    result = Failure(FetchError(f"{mirror.name}: {st.last_error}"))
                return result
            st.last_error = None
            if result.cloned:
                st.damaged = False
            self._count("cloned" if result.cloned else "fetched" if result.changed else "unchanged")
            if result.joined:  # another worker's fetch: did it change what we knew?
                result.changed = result.refs != st.refs or result.head != st.head
            if not result.missing:
                st.refs, st.head = result.refs, result.head
                if result.size is not None:
                    st.size = result.size
                if result.changed:
                    st.last_change = st.last_fetch
                    st.dirty = True
            st.absent = False
            if result.cloned:
                self._after_clone(mirror)
                self._schedule(mirror)
                if self.registry.dirty():
                    self._save_registry()
            return dict(result.refs)

        return d.addBoth(done)

    # -- cheap checks (the loop, stale clones, webhooks) ------------------------------

    def check(self, mirror: Mirror, scheduled: bool = False) -> Deferred[str]:
        """Ask the upstream for its refs and fetch when they differ from the mirror's,
        joining a check in flight. Fires with ``unchanged``, ``fetched``, ``missing``
        (no mirror on disk: nothing to compare, nothing cloned) or ``error`` (recorded
        in the mirror's state). ``scheduled``: the loop already took the host's rate
        slot; otherwise the check takes one without waiting."""
        return self._checks.run(mirror.path, lambda: Deferred.fromCoroutine(self._check(mirror, scheduled)))

    def busy(self, mirror: Mirror) -> bool:
        """Whether the mirror's forge connection has a backlog (the loop waits then)."""
        return is_http(mirror.url) and self.checker.busy(mirror.url)

    async def _check(self, mirror: Mirror, scheduled: bool) -> str:
        st = self.state(mirror)
        if mirror.path in self._refreshes:
            await self._quiet_refresh(mirror)  # a fetch is running: its answer is fresher than a check
            return "fetched"
        if st.refs is None and not st.damaged:
            # First check since start-up: the refs the mirror holds, read once. From
            # then on they are known here and a check never touches the disk.
            loaded = await self.run(load_refs, mirror.path)
            if loaded is None:
                st.absent = True
                return "missing"
            if st.refs is None:
                st.refs, st.head = loaded
        if st.damaged or st.refs is None:
            await self._quiet_refresh(mirror)
            return "fetched"
        cap = self.rates.cap(forge_host(mirror.url))
        if not scheduled:
            cap.take()
        cap.record()
        known, head = st.refs, st.head
        adv = None
        if is_http(mirror.url):
            try:
                adv = await self.checker.check(mirror.url, self._credentials(mirror))
            except CheckError as e:
                if e.status is None or not 300 <= e.status < 400:
                    st.last_fetch = self.clock.seconds()
                    self._failed(mirror, st, f"{mirror.name}: {e}")
                    self._share_check(mirror, st)
                    self._count("error")
                    return "error"
                # A redirect (a renamed repository): libgit2 follows it, below.
        if adv is not None:
            changed = adv.refs != known or (adv.head is not None and adv.head != head)
        else:
            # ssh:// and file://: libgit2's ref listing, in the pool (today's path).
            need, failed = await self.poll([mirror])
            if failed:
                return "error"
            changed = bool(need)
        if not changed:
            st.last_fetch, st.last_error = self.clock.seconds(), None
            if adv is not None:  # poll counted its own
                self._count("unchanged")
            self._share_check(mirror, st)
            return "unchanged"
        await self._quiet_refresh(mirror)
        return "fetched"

    async def _quiet_refresh(self, mirror: Mirror) -> None:
        try:
            await self.refresh(mirror, False)
        except Exception:
            pass  # recorded in the mirror's state by refresh

    def freshen(self, mirror: Mirror) -> Deferred[str | None]:
        """Before serving: a mirror not checked for ``fetch_interval`` is checked once
        (joining a check in flight); a fresh one is served as it is. Never fails."""
        st = self.state(mirror)
        now = self.clock.seconds()
        self._served(mirror, st, now)
        if st.last_fetch is not None and now - st.last_fetch < self.config.fetch_interval:
            return succeed(None)
        if self.xlocks is None:
            d = self.check(mirror)
        else:
            # Worker processes: another one may have fetched or checked it meanwhile.
            d = self.xlocks.last_seen([mirror.path]).addCallback(lambda seen: self._freshen_shared(seen[0], mirror))
        return d.addErrback(lambda f: log.warn("git: checking {name} failed: {why}", name=mirror.name,
                                               why=f.getErrorMessage()))

    def _freshen_shared(self, seen: Seen, mirror: Mirror) -> Any:
        st = self.state(mirror)
        self._adopt(st, seen)
        if st.last_fetch is not None and self.clock.seconds() - st.last_fetch < self.config.fetch_interval:
            return None
        return self.check(mirror)

    def pushed(self, mirror: Mirror, updates: dict[str, str] | None = None) -> Deferred[Any]:
        """A webhook said ``mirror`` changed: fetch now. A fetch in flight may have
        started before the push, so it is joined and, when it did not bring every
        updated ref in ``updates`` (ref name → new id), a second fetch follows."""
        st = self.state(mirror)
        # With worker processes the refresh may join another worker's fetch, which may
        # have started before the push too.
        running = mirror.path in self._refreshes or self.xlocks is not None
        d = self.refresh(mirror, False, paced=False)

        def again(refs: dict[str, str]) -> Any:
            if running and updates and any(refs.get(k) != v for k, v in updates.items()):
                return self.refresh(mirror, False, paced=False)
            return refs

        d.addCallback(again)
        d.addCallback(lambda refs: setattr(st, "last_change", self.clock.seconds()))
        return d

    def poll(self, mirrors: list[Mirror]) -> Deferred[tuple[list[Mirror], int]]:
        """The fetch loop's cheap check of a batch of mirrors, in one pool job: each
        mirror's ref advertisement is compared with the refs it holds. Unchanged and
        unreachable ones are recorded here; fires with (the mirrors that need a real
        refresh, how many failed). A mirror being fetched, or whose refs are not known
        yet, goes straight to the refresh list (which joins the running fetch)."""
        need: list[Mirror] = []
        batch: list[Mirror] = []
        for m in mirrors:
            st = self.state(m)
            if st.refs is None or st.damaged or m.path in self._refreshes:
                need.append(m)
            else:
                batch.append(m)
        if not batch:
            return succeed((need, 0))
        items = [(m.path, m.url, self._credentials(m), self.state(m).refs, self.state(m).head) for m in batch]
        d = self.run(probe_batch, items)

        def done(results: list[tuple[str, str | None]]) -> tuple[list[Mirror], int]:
            now = self.clock.seconds()
            failed = 0
            for m, (status, error) in zip(batch, results):
                st = self.state(m)
                if status == CHANGED:
                    need.append(m)
                    continue
                if status == UNCHANGED:
                    st.last_fetch, st.last_error = now, None
                    self._count("unchanged")
                elif error is not None:
                    st.last_fetch = now
                    self._failed(m, st, f"{m.name}: {error}")
                    self._share_check(m, st)
                    failed += 1
                    self._count("error")
            return need, failed

        return d.addCallback(done)

    def _failed(self, mirror: Mirror, st: MirrorState, error: str) -> None:
        # Logged when the error changes: a forge that is down for an hour must not
        # write a line per mirror per round.
        if error != st.last_error:
            log.warn("git: fetching {name} failed: {why}", name=mirror.name, why=error)
        st.last_error = error

    def _count(self, result: str) -> None:
        # One label for all mirrors: a per-repo label would make a thousand series.
        if self.metrics is not None:
            self.metrics.upstream("git", result)

    def _after_clone(self, mirror: Mirror) -> None:
        # Bitmaps and the commit-graph make the first clones from the cache cheap;
        # the mirror is already served while they are written.
        d = self.maintain(mirror)
        d.addErrback(lambda f: log.failure("git: optimizing {name} failed", f, name=mirror.name))

    def missing(self, mirror: Mirror, oids: list[str]) -> Deferred[list[str]]:
        """The object ids among ``oids`` that the mirror lacks (for the push-then-clone race)."""
        return self.run(missing_sync, mirror.path, list(oids))

    def seed(self, url: str, bundle_path: str, name: str | None = None) -> Deferred[Mirror]:
        try:
            reg = self.registry.by_url(url)
            if reg is None:
                reg, created = self.registry.register(name, url)
                if created:
                    self._save_registry()
        except RegistrationError as e:
            return fail(e)
        mirror = self.registry.mirror(reg)
        d = self._exclusive(mirror, self._seed_sync, mirror, bundle_path)

        def done(result: FetchResult) -> Mirror:
            st = self.state(mirror)
            st.refs, st.head, st.size, st.dirty = result.refs, result.head, result.size, True
            st.last_change = self.clock.seconds()
            if result.cloned:
                self._after_clone(mirror)
            return mirror

        return d.addCallback(done)

    def maintain(self, mirror: Mirror, fsck: bool = False) -> Deferred[dict[str, Any]]:
        """Repack (bitmaps, commit-graph) when new objects arrived, remove stale
        locks, and with ``fsck`` check the mirror, re-cloning it when corrupt."""
        return Deferred.fromCoroutine(self._maintain(mirror, fsck))

    async def _maintain(self, mirror: Mirror, fsck: bool) -> dict[str, Any]:
        st = self.state(mirror)
        report: dict[str, Any] = {}
        if fsck:
            try:
                report = await self._exclusive(mirror, self._fsck_sync, mirror, self._credentials(mirror))
            except DamagedMirror as e:
                # Served as it is meanwhile; the fetch loop retries the re-clone every round.
                st.damaged, st.last_error = True, str(e)
                raise
            st.last_fsck = self.clock.seconds()
            if report.get("recloned"):
                st.refs, st.head = report["refs"], None
                st.last_error = None
        # Only mirrors that received objects: a restart must not repack them all.
        repack = st.dirty or bool(report.get("recloned"))
        # Pruning drops unreachable objects, which an upload-pack in flight may still send.
        prune = st.serving == 0
        st.dirty = False  # a fetch landing during the repack sets it again
        try:
            more = await self._exclusive(mirror, self._repack_sync, mirror.path, repack, prune, kind="maint")
        except BaseException:
            st.dirty = st.dirty or repack
            raise
        if more.get("repacked"):
            st.last_repack = self.clock.seconds()
        if more.get("size") is not None:
            st.size = more["size"]
        report.update(more)
        return report

    # -- in the pool ----------------------------------------------------------------------

    def _fetch_sync(self, mirror: Mirror, creds: Any, known: dict[str, str] | None, clone: bool,
                    reclone: bool = False) -> FetchResult:
        path = mirror.path
        if not is_repo(path):
            if not clone:
                return FetchResult(missing=True)
            self._clone_sync(mirror, creds)
            return snapshot(path, changed=True, cloned=True)
        if reclone:
            self._clone_sync(mirror, creds)
            return snapshot(path, changed=True, cloned=True)
        try:
            repo = pygit2.Repository(path)
        except pygit2.GitError as e:
            log.warn("git: {name} cannot be opened ({why}); re-cloning", name=mirror.name, why=str(e))
            self._clone_sync(mirror, creds)
            return snapshot(path, changed=True, cloned=True)
        try:
            remote = origin(repo, mirror.url)
            cb = Callbacks(creds, self._cancel)
            heads = remote.list_heads(callbacks=cb)
            default_branch = head_target(heads)
            local = known if known is not None else read_refs(repo)
            if advertised_refs(heads) == local:
                set_head(repo, default_branch)
                return FetchResult(refs=local, head=head_of(repo))
            remote.fetch(callbacks=Callbacks(creds, self._cancel), prune=FetchPrune.PRUNE)
            set_head(repo, default_branch)
            refs = read_refs(repo)
            head = head_of(repo)
        except pygit2.GitError as e:
            raise FetchError(f"{mirror.name}: {e}") from None
        finally:
            repo.free()
        return FetchResult(refs=refs, changed=True, size=dir_size(path), head=head)

    def _fetch_shared_sync(self, mirror: Mirror, creds: Any, clone: bool, reclone: bool, asked: float,
                           min_interval: float, reserve: Any) -> FetchResult:
        """``_fetch_sync`` under the mirror's lock held across worker processes: join a
        fetch another worker ended after ``asked``, keep min_fetch_interval from the
        last one, and leave the fetch record for the others."""
        assert self.xlocks is not None
        record_path = self.xlocks.record_path(mirror.path)
        record = read_record(record_path)
        if record is not None and record.ended >= asked and not reclone:
            if record.error is not None:
                raise FetchError(record.error)
            if is_repo(mirror.path):
                result = snapshot(mirror.path)
                result.joined = True
                return result
        if min_interval and record is not None and record.ended + min_interval > self.clock.seconds():
            raise TooSoon(record.ended + min_interval)
        if reserve is not None and clone and not is_repo(mirror.path):
            self.registry.reserve(reserve, self.config.max_mirrors)
        if is_repo(mirror.path) and remove_ref_locks(mirror.path):
            log.warn("git: {name}: removed ref locks left by a worker that died mid-fetch", name=mirror.name)
        started = self.clock.seconds()
        try:
            # The refs on disk, not those this worker last saw: another may have fetched.
            result = self._fetch_sync(mirror, creds, None, clone, reclone)
        except Exception as e:
            kept = (record.refs, record.size, record.changed) if record is not None else (None, None, None)
            write_record(record_path, FetchRecord(started, self.clock.seconds(), str(e), os.getpid(), *kept))
            raise
        if not result.missing:
            ended = self.clock.seconds()
            previous = record
            write_record(record_path, FetchRecord(
                started, ended, None, os.getpid(), len(result.refs),
                result.size if result.size is not None else previous.size if previous else None,
                ended if result.changed else previous.changed if previous else None))
            if result.changed and self.stamps is not None:
                self.stamps.changed_sync(mirror.path)  # the primary's loop: a change (git/served.py)
        return result

    def _tmp(self, mirror: Mirror) -> str:
        os.makedirs(self.tmp_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(mirror.path) + ".", dir=self.tmp_dir)
        with self._building_lock:
            self._building.add(os.path.basename(tmp))
        return tmp

    def _done_building(self, tmp: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        with self._building_lock:
            self._building.discard(os.path.basename(tmp))

    def _clone_sync(self, mirror: Mirror, creds: Any) -> None:
        # Not pygit2.clone_repository: with a mirror refspec libgit2's clone guesses
        # HEAD and adds refs/remotes/origin/HEAD. init + fetch is `git clone --mirror`.
        tmp = self._tmp(mirror)
        target = os.path.join(tmp, "repo.git")
        try:
            repo = pygit2.init_repository(target, bare=True)
            try:
                configure(repo, mirror.url)
                remote = repo.remotes["origin"]
                heads = remote.list_heads(callbacks=Callbacks(creds, self._cancel))
                remote.fetch(callbacks=Callbacks(creds, self._cancel), prune=FetchPrune.PRUNE)
                set_head(repo, head_target(heads))
            except (pygit2.GitError, ValueError, KeyError) as e:
                raise FetchError(f"cannot clone {mirror.url}: {e}") from None
            finally:
                repo.free()
            install(target, mirror.path, self.trash_dir)
            log.info("git: cloned {name} from {url}", name=mirror.name, url=mirror.url)
        finally:
            self._done_building(tmp)

    def _seed_sync(self, mirror: Mirror, bundle_path: str) -> FetchResult:
        bundle = os.path.abspath(bundle_path)
        try:
            heads = run_git(["bundle", "list-heads", bundle]).stdout.decode("utf-8", "replace")
        except RuntimeError as e:
            raise ValueError(f"not a usable git bundle: {e}") from None
        if is_repo(mirror.path):
            # Only new refs and fast-forwards: an old bundle must not move a branch back.
            seed_refs(bundle, mirror.path)
            return snapshot(mirror.path, changed=True)
        tmp = self._tmp(mirror)
        target = os.path.join(tmp, "repo.git")
        try:
            repo = pygit2.init_repository(target, bare=True)
            try:
                repo.remotes.create("origin", mirror.url, MIRROR_REFSPEC)
                configure(repo, mirror.url)
            finally:
                repo.free()
            fetch_bundle(bundle, target)
            repo = pygit2.Repository(target)
            try:
                set_head(repo, bundle_default_branch(heads))
            finally:
                repo.free()
            install(target, mirror.path, self.trash_dir)
        finally:
            self._done_building(tmp)
        log.info("git: seeded {name} from a bundle", name=mirror.name)
        return snapshot(mirror.path, changed=True, cloned=True)

    def _fsck_sync(self, mirror: Mirror, creds: Any) -> dict[str, Any]:
        if not is_repo(mirror.path):
            return {}
        damage = fsck(mirror.path)
        if not damage:
            return {"fsck": "ok"}
        log.warn("git: {name} failed fsck ({why}); re-cloning", name=mirror.name, why="; ".join(damage[:5])[:500])
        try:
            self._clone_sync(mirror, creds)
        except FetchError as e:
            raise DamagedMirror(f"{mirror.name} is damaged and could not be re-cloned: {e}") from None
        return {"fsck": "failed", "recloned": True, "refs": snapshot(mirror.path).refs}

    def _repack_sync(self, path: str, repack: bool, prune: bool) -> dict[str, Any]:
        report: dict[str, Any] = {}
        if not is_repo(path):
            return report
        report["locks_removed"] = remove_stale_locks(path, self.config.stale_lock_age)
        if repack and prune and self.xlocks is not None and served_anywhere(self.xlocks.path(path, "serve")):
            prune = False  # another worker's upload-pack reads this mirror
        if repack:
            args = ["repack", "-a", "-d", "-b", "-q", "--write-midx"]
            if not prune:
                args.append("--keep-unreachable")
            run_git(args, cwd=path)
            run_git(["commit-graph", "write", "--reachable", "--no-progress"], cwd=path)
            report["repacked"] = True
        report["size"] = dir_size(path)
        return report

    def empty_trash(self) -> None:
        """Remove replaced mirrors and clones abandoned by a crash (blocking: call in the pool)."""
        for d in (self.trash_dir, self.tmp_dir):
            if os.path.isdir(d):
                for entry in os.listdir(d):
                    with self._building_lock:
                        if entry in self._building:
                            continue  # a clone in progress
                    if d == self.tmp_dir and self.xlocks is not None and self.xlocks.building(entry):
                        continue  # another worker's clone in progress
                    shutil.rmtree(os.path.join(d, entry), ignore_errors=True)
