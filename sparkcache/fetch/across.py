"""The engine's side of the cross-process singleflight (``server.workers > 1``).

``Cache`` runs ``claim`` at the start of a production, behind its in-process
Singleflight, so each worker makes at most one lock attempt per key at a time.
It ends in one of three ways:

- a ``Held``: this worker owns the production; it announces its spool in the
  marker before any byte flows and releases the lock after the index row (or
  instead of it);
- an outcome another worker already stored (its row appeared while we tried);
- a ``Live`` over a ``TailFlight``: another worker produces the key; our
  clients tail its spool file until its row appears (the rest is served from
  the same descriptor, which still reads the renamed file) or its marker goes
  away without a row (the readers' connections are aborted).

With ``workers: 1`` ``Cache`` has no ``KeyLocks`` and none of this runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater

from sparkcache.fetch.flight import BodyError, Flight
from sparkcache.fetch.xlock import POLL_INTERVAL, Ended, Held, KeyLocks, Tail
from sparkcache.store import Entry

if TYPE_CHECKING:
    from sparkcache.fetch.cache import Result


class TailFlight(Flight):
    """Another worker's production, seen through its spool file: the Flight
    interface the serving code reads (``written``, ``finished``, ``error``,
    ``read``/``fileno``, ``listen``, ``wait_done``, ``hold_last``), moved on by
    the polls of a ``Tail``. It writes nothing."""

    def __init__(self, tail: Tail) -> None:
        marker = tail.marker
        self.key = tail.key
        self.total = marker.total
        self.headers = dict(marker.headers)
        self.hold_last = marker.hold_last
        self.written = tail.written
        self.queued = 0
        self.finished = False
        self.error = None
        self.entry = None
        self.on_drain = lambda: None
        self._write_error = None
        # The tail's descriptor, opened before the owner's rename into cas/:
        # closed by the last user, like a local flight's (through the tail,
        # which waits for a poll still using it).
        self._tail = tail
        self._fd = tail.fd
        self._users = 1  # the follower itself, until the production ends
        self._listeners = []
        self._done_waiters = []

    def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._fd is not None:
            self._fd = None
            self._tail.close()

    def data(self, chunk: bytes) -> None:
        raise BodyError("another worker produces this body")

    def flushed(self) -> Deferred[None]:
        return succeed(None) if self.error is None else fail(self.error)


def fresh_outcome(row: Entry | None, now: float) -> Union["Result", None]:
    """What a fresh row stored by another worker answers, or None to produce."""
    from sparkcache.fetch.cache import Failed, Hit

    if row is None or not row.fresh(now):
        return None
    if row.status == 200:
        return Hit(row, "HIT")
    return Failed(row.status, "not found upstream (cached)")


async def claim(cache: Any, locks: KeyLocks, key: str, stale: Entry | None, adopting: bool,
                follow: Callable[[Tail], Deferred["Result"]]) -> Union[Held, "Result"]:
    """Own the production of ``key`` (a Held), or the outcome of another
    worker's: its stored row, or what ``follow(tail)`` makes of its flight.
    ``adopting`` (a complete upload replacing what is stored): wait until the
    key is free, whatever another worker stores meanwhile."""
    while True:
        held = await locks.acquire(key)
        if held is not None:
            if adopting:
                return held
            # Another worker may have committed while we asked for the lock.
            outcome = fresh_outcome(await cache.store.index.get(key), cache.clock.seconds())
            if outcome is None:
                return held
            await held.release()
            return outcome
        if not adopting:
            marker = await locks.marker(key)
            if marker is not None and marker.error is None:  # (an error: a failed owner's, to retry)
                tail = Tail(locks, key, marker, _committed(cache, key, stale))
                try:
                    await tail.open()
                except FileNotFoundError:
                    pass  # committed (or dropped) meanwhile: look again
                else:
                    return await follow(tail)
            else:
                # The owner is between its lock and its marker, or has just
                # written its row (a 304, a 404, a commit) and let go.
                outcome = fresh_outcome(await cache.store.index.get(key), cache.clock.seconds())
                if outcome is not None:
                    return outcome
        await deferLater(cache.clock, POLL_INTERVAL, lambda: None)


def _committed(cache: Any, key: str, stale: Entry | None) -> Any:
    async def committed() -> bool:
        row = await cache.store.index.get(key)
        return row is not None and row.status == 200 and (
            stale is None or row.digest != stale.digest or row.fetched != stale.fetched)
    return committed


async def follow(cache: Any, tail: Tail, flight: TailFlight, leave: Callable[[], None]) -> None:
    """Move ``flight`` on with each poll of ``tail`` until the owner's
    production ends; ``leave`` frees the key in our Singleflight before the
    end is announced, so nobody joins a finished flight."""
    try:
        while True:
            try:
                await tail.poll()
            except Ended as e:
                if tail.written > flight.written:
                    flight.written = tail.written
                row = await cache.store.index.get(tail.key) if e.committed else None
                leave()
                if row is not None and row.status == 200 and row.size == flight.written:
                    flight.complete(row)
                else:
                    flight.fail(BodyError(str(e) if not e.committed else
                                          f"{tail.key} was stored by another worker with another length"))
                return
            if tail.written > flight.written:
                flight.advance(tail.written - flight.written)
            await deferLater(cache.clock, POLL_INTERVAL, lambda: None)
    except BaseException:
        leave()
        flight.fail(BodyError("stopped while following another worker's production"))
        raise
