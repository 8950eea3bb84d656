"""Keeping mirrors fresh and healthy: the fetch loop and scheduled maintenance.

Every ``fetch_interval`` each mirror that exists on disk is refreshed, with at
most ``fetch_concurrency`` at a time and each start delayed by a random
``jitter`` so a thousand mirrors do not hit the forge in the same second. Mirrors are
checked in batches, one pool job each: a check is one ref advertisement round
trip compared with the refs the mirror holds; only mirrors that differ are
fetched (through Mirrors.refresh, so at most one fetch per mirror runs).
A failing repository is logged and recorded for ``GET /repos``; the loop goes on.

Every ``maintenance_interval`` mirrors that received objects are repacked
(bitmaps, multi-pack index, commit-graph) and stale ``*.lock`` files removed;
every ``fsck_interval`` they are checked with ``git fsck`` and re-cloned when corrupt.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from sparkcache.timers import Periodic

if TYPE_CHECKING:
    from sparkcache.git.interfaces import Mirror
    from sparkcache.git.mirrors import Mirrors

log = Logger()
STOP_TIMEOUT = 10.0
MAX_BATCH = 50


class FetchLoop:
    def __init__(self, mirrors: "Mirrors", clock: Any, rng: random.Random | None = None) -> None:
        self.mirrors = mirrors
        self.clock = clock
        self.rng = rng or random.Random()
        self.sem = DeferredSemaphore(mirrors.config.fetch_concurrency)
        self.rounds = 0
        self.failures = 0

    async def tick(self) -> None:
        """One round over every registered mirror that exists on disk."""
        present = await self.mirrors.present(self.mirrors.mirrors())
        jitter = self.mirrors.config.jitter
        size = batch_size(len(present), self.mirrors.config.fetch_concurrency)
        batches = [present[i:i + size] for i in range(0, len(present), size)]
        ds = [ensureDeferred(self._batch(b, self.rng.uniform(0, jitter) if jitter > 0 else 0.0)) for b in batches]
        await DeferredList(ds, consumeErrors=True)
        self.rounds += 1

    async def _batch(self, batch: list["Mirror"], delay: float) -> None:
        if delay > 0:
            await deferLater(self.clock, delay, lambda: None)
        try:
            need, failed = await self.sem.run(self.mirrors.poll, batch)
        except Exception as e:
            log.warn("git fetch loop: checking {n} mirrors failed: {why}", n=len(batch), why=str(e))
            need, failed = batch, 0
        self.failures += failed
        for mirror in need:
            try:
                await self.sem.run(self.mirrors.refresh, mirror, False)
            except Exception as e:  # recorded in the mirror's state; the loop goes on
                self.failures += 1
                log.debug("git fetch loop: {name}: {why}", name=mirror.name, why=str(e))


def batch_size(n: int, concurrency: int) -> int:
    """Mirrors checked per pool job: enough to amortize the thread hand-off, few
    enough that every worker gets several batches (and jitter spreads them)."""
    return max(1, min(MAX_BATCH, -(-n // (concurrency * 4))))


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

    def __init__(self, mirrors: "Mirrors", stop_timeout: float = 30.0) -> None:
        super().__init__()
        self.setName("git")
        self.mirrors = mirrors
        self.stop_timeout = stop_timeout
        cfg = mirrors.config
        self.loop = FetchLoop(mirrors, mirrors.clock)
        self.maintenance = Maintenance(mirrors, mirrors.clock)
        self.fetch_timer = Periodic("git fetch-loop", cfg.fetch_interval, self.loop.tick, mirrors.clock)
        self.fetch_timer.setServiceParent(self)
        self.maintenance_timer = Periodic("git maintenance", cfg.maintenance_interval, self.maintenance.tick, mirrors.clock)
        self.maintenance_timer.setServiceParent(self)

    def startService(self) -> None:
        self.mirrors.start()
        super().startService()

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
