"""Keeping mirrors fresh and healthy: the check scheduler and scheduled maintenance.

Each mirror has its own next check time (see rates.py: served or changed
recently → every ``fetch_interval``, idle → up to ``max_interval``, with
jitter), kept in one heap with one timer for the earliest: nothing wakes per
mirror. A due check waits for its forge host's slot (``max_upstream_rate``
checks a second per host) and is then one cheap ref check (Mirrors.check: an
HTTP request on the reactor for http(s) mirrors, a libgit2 ref listing in the
pool for ssh:// and file:// ones); only a mirror whose refs differ is fetched.
A failing repository is logged and recorded for ``GET /repos``; the loop goes on.

Every ``maintenance_interval`` mirrors that received objects are repacked
(bitmaps, multi-pack index, commit-graph) and stale ``*.lock`` files removed;
every ``fsck_interval`` they are checked with ``git fsck`` and re-cloned when corrupt.
"""

from __future__ import annotations

import heapq
from collections import deque
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger

from sparkcache.git.rates import forge_host, interval_for, jittered
from sparkcache.timers import Periodic

if TYPE_CHECKING:
    from sparkcache.git.interfaces import Mirror
    from sparkcache.git.mirrors import Mirrors

log = Logger()
STOP_TIMEOUT = 10.0
REGISTRY_SYNC = 1.0


@dataclass
class Entry:
    mirror: "Mirror"
    host: str
    due: float
    interval: float
    reserved: bool = False   # holds a rate slot: starts when due without asking again
    running: bool = False    # checking, or parked until its host's connection is free


class Scheduler(Service):
    """Checks each registered mirror when it is due, within its host's rate cap."""

    def __init__(self, mirrors: "Mirrors", clock: Any, rng: random.Random | None = None) -> None:
        self.setName("git check scheduler")
        self.mirrors = mirrors
        self.clock = clock
        self.rng = rng or random.Random()
        self.entries: dict[str, Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._timer: Any = None
        self.checks = 0
        self.failures = 0
        self.wakeups = 0
        self.waiting: dict[str, deque[Entry]] = {}  # per host: due, slot taken, connection busy
        mirrors.scheduler = self

    # -- lifecycle ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # The first check of each mirror lands somewhere in the first interval, so a
        # restart does not ask the forge about every repository in the same second.
        first = self.mirrors.config.fetch_interval
        added = [self._add(m, self.clock.seconds() + self.rng.uniform(0, first)) for m in self.mirrors.mirrors()]
        self._share([e for e in added if e is not None])
        self._arm()

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- the heap -------------------------------------------------------------------

    def add(self, mirror: "Mirror", due: float | None = None) -> None:
        """Schedule a mirror (a new registration, a first clone); known ones keep their time."""
        e = self._add(mirror, due)
        if e is not None and self.running:
            self._share([e])
            self._arm()

    def _add(self, mirror: "Mirror", due: float | None) -> Entry | None:
        if mirror.path in self.entries:
            return None
        now = self.clock.seconds()
        interval = self.mirrors.config.fetch_interval
        e = self.entries[mirror.path] = Entry(mirror, forge_host(mirror.url), now + interval if due is None else due,
                                              interval)
        self._push(e)
        return e

    def _share(self, entries: list[Entry]) -> None:
        """With worker processes: the others' GET /repos shows these times (git/served.py)."""
        stamps = self.mirrors.stamps
        if stamps is not None and entries:
            stamps.schedule((e.mirror.path, e.interval, e.due) for e in entries)

    def touch(self, mirror: "Mirror") -> None:
        """A mirror was just served or cloned: it is active now, so its next check is
        at most ``fetch_interval`` away (an idle one may have been an hour away)."""
        e = self.entries.get(mirror.path)
        if e is None:
            self.add(mirror)
            return
        now = self.clock.seconds()
        soon = now + jittered(self.mirrors.config.fetch_interval, self.rng)
        if e.running or e.reserved or e.due <= soon:
            return
        e.interval, e.due = self.mirrors.config.fetch_interval, soon
        self._push(e)
        if self.running:
            self._share([e])
            self._arm()

    def _push(self, e: Entry) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (e.due, self._seq, e.mirror.path))

    def _arm(self) -> None:
        """One timer, set for the earliest due entry (stale heap items are skipped)."""
        while self._heap:
            due, _, path = self._heap[0]
            e = self.entries.get(path)
            if e is None or e.due != due or e.running:
                heapq.heappop(self._heap)
                continue
            break
        else:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= due:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.wakeups += 1
        now = self.clock.seconds()
        rates = self.mirrors.rates
        while self._heap and self._heap[0][0] <= now:
            due, _, path = heapq.heappop(self._heap)
            e = self.entries.get(path)
            if e is None or e.due != due or e.running:
                continue
            if not e.reserved:
                wait = rates.cap(e.host).reserve()
                if wait > 0:
                    e.reserved, e.due = True, now + wait
                    self._push(e)
                    continue
            e.reserved, e.running = False, True
            if self.mirrors.busy(e.mirror):
                # The host answers slower than its cap: park it until a check there ends,
                # rather than queue it on the connection (or wake up to retry).
                self.waiting.setdefault(e.host, deque()).append(e)
                continue
            ensureDeferred(self._check(e))  # never fails: _check records its errors
        if self.running:
            self._arm()

    def _unpark(self, host: str) -> None:
        queue = self.waiting.get(host)
        while queue:
            e = queue[0]
            if self.mirrors.busy(e.mirror):
                return
            queue.popleft()
            ensureDeferred(self._check(e))
        self.waiting.pop(host, None)

    async def _check(self, e: Entry) -> None:
        m = e.mirror
        try:
            reg = self.mirrors.registry.get(m.name)
            if reg is None or self.mirrors.registry.mirror(reg).path != m.path:
                self.entries.pop(m.path, None)  # forgotten or re-pointed: no longer ours
                return
            self.checks += 1
            result = await self.mirrors.check(m, scheduled=True)
            if result == "error":
                self.failures += 1
        except Exception as ex:  # recorded in the mirror's state; the loop goes on
            self.failures += 1
            log.debug("git check loop: {name}: {why}", name=m.name, why=str(ex))
        finally:
            e.running = False
            if m.path in self.entries:
                self._reschedule(e)
            if e.host in self.waiting and self.running:
                self._unpark(e.host)

    def _reschedule(self, e: Entry) -> None:
        # With worker processes, last_served includes the others' serves: their
        # stamps are read every second (Mirrors.sync_served, git/served.py).
        st = self.mirrors.state(e.mirror)
        now = self.clock.seconds()
        e.interval = interval_for(self.mirrors.config, now, st.last_served, st.last_change)
        e.due = now + jittered(e.interval, self.rng)
        self._push(e)
        if self.running:
            self._share([e])
            self._arm()

    def next_check(self, mirror: "Mirror") -> tuple[float | None, float | None]:
        """(interval, next due time) of a mirror, for GET /repos."""
        e = self.entries.get(mirror.path)
        if e is None:
            return None, None
        return e.interval, (None if e.running else e.due)

    async def tick(self) -> None:
        """Check every registered mirror now, ignoring due times and caps (tests, a manual sweep)."""
        ds = []
        for m in self.mirrors.mirrors():
            self.add(m)
            e = self.entries[m.path]
            if e.running:
                continue
            e.running = True
            ds.append(ensureDeferred(self._check(e)))
        await DeferredList(ds, consumeErrors=True)


class Maintenance:
    def __init__(self, mirrors: "Mirrors", clock: Any) -> None:
        self.mirrors = mirrors
        self.clock = clock
        self.last_fsck: float | None = None

    async def tick(self) -> None:
        now = self.clock.seconds()
        fsck = self.last_fsck is None or now - self.last_fsck >= self.mirrors.config.fsck_interval
        if self.last_fsck is None:
            # No fsck right at start-up: the first one is due one fsck_interval later.
            self.last_fsck = now
            fsck = False
        await self.mirrors.run(self.mirrors.empty_trash)
        for m in await self.mirrors.present(self.mirrors.mirrors()):
            try:
                await self.mirrors.maintain(m, fsck=fsck)
            except Exception as e:
                log.warn("git maintenance: {name}: {why}", name=m.name, why=str(e)[:500])
        if fsck:
            self.last_fsck = now


class GitService(MultiService):
    """Starts the git pool, the fetch loop and maintenance; stops them, waiting
    (bounded) for running fetches."""

    def __init__(self, mirrors: "Mirrors", stop_timeout: float = 30.0, primary: bool = True) -> None:
        """``primary``: run the fetch loop and maintenance here (with worker
        processes, one of them does; the others only serve the mirrors)."""
        super().__init__()
        self.setName("git")
        self.mirrors = mirrors
        self.stop_timeout = stop_timeout
        cfg = mirrors.config
        self.loop = Scheduler(mirrors, mirrors.clock)
        self.maintenance = Maintenance(mirrors, mirrors.clock)
        self.maintenance_timer = Periodic("git maintenance", cfg.maintenance_interval, self.maintenance.tick, mirrors.clock)
        if primary:
            self.loop.setServiceParent(self)
            self.maintenance_timer.setServiceParent(self)
        else:  # a scheduler that never runs must not be told about mirrors either
            mirrors.scheduler = None
        mirrors.primary = primary
        if mirrors.xlocks is not None:
            # Worker processes: mirrors another one registered are scheduled (primary)
            # and listed here within a second even when no request asks first.
            Periodic("git registry sync", REGISTRY_SYNC, mirrors.synced, mirrors.clock).setServiceParent(self)
            # Per-host check counts: metrics of every worker; the primary's loop's, for
            # GET /repos/hosts in the others.
            Periodic("git host stats", REGISTRY_SYNC, mirrors.share_hosts, mirrors.clock).setServiceParent(self)
            if primary:
                # Serves in the other workers (their served stamps) reach the loop.
                Periodic("git served sync", REGISTRY_SYNC, mirrors.sync_served, mirrors.clock).setServiceParent(self)

    def startService(self) -> None:
        self.mirrors.start()
        super().startService()
        if self.mirrors.config.max_size is not None:
            # git.max_size must count mirrors cloned before this start, too.
            self.mirrors.measure().addErrback(
                lambda f: log.warn("git: measuring the mirrors failed: {why}", why=f.getErrorMessage()))

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # Bounded by stop_timeout (server.shutdown_timeout) as a whole: running
        # fetches get part of it to finish, then transfers are aborted and the
        # pool is joined off the reactor; a libgit2 call stuck on a silent
        # upstream is left to die with the process (the workers are daemons).
        reactor = self.mirrors.reactor
        deadline = reactor.seconds() + self.stop_timeout
        await super().stopService()  # type: ignore[misc]
        pending = self.mirrors.in_flight()
        if pending:
            d: Deferred[Any] = DeferredList(pending, consumeErrors=True)
            d.addTimeout(min(STOP_TIMEOUT, self.stop_timeout / 2), reactor)
            try:
                await d
            except Exception:
                log.warn("git: stopping with fetches still running; aborting them")
        if not await self.mirrors.stop(max(0.0, deadline - reactor.seconds())):
            log.warn("git: a pool thread is still busy (stuck upstream?); not waiting for it")
