"""One upstream body being spooled, shared by every client that wants it.

The body goes to a spool file at upstream speed, hashed as it arrives. Each
client tails that file through its own producer, at its own speed, via
``pread`` on one descriptor the flight holds open — so a reader that joins
while the body is renamed into the content store still reads the same bytes.
Nothing a client does (pausing, disconnecting) reaches the upstream fetch.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import IResponse

from sparkcache.store import SpoolFile

log = Logger()


class BodyError(Exception):
    """The upstream body was truncated, stalled or failed verification."""


class Flight:
    """Spooling state of one upstream body.

    ``written`` grows as bytes land in the spool; ``done`` fires (with the
    flight) once the body is complete, verified and committed, or errbacks
    with BodyError. Readers subscribe to be told about progress.
    """

    def __init__(self, key: str, spool: SpoolFile, total: int | None, headers: dict[str, str]) -> None:
        self.key = key
        self.spool = spool
        self.total = total
        self.headers = headers
        self.written = 0
        self.finished = False
        self.error: BodyError | None = None
        self.entry: Any = None  # the committed Entry, once there is one
        self._fd: int | None = os.open(spool.path, os.O_RDONLY)
        self._users = 1  # the fetch itself
        self._listeners: list[Callable[[], None]] = []
        self._done_waiters: list[Deferred[Flight]] = []

    # -- reading -----------------------------------------------------------------

    def acquire(self) -> None:
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, offset: int, size: int) -> bytes:
        assert self._fd is not None, "flight released"
        return os.pread(self._fd, min(size, self.written - offset), offset)

    def listen(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def unlisten(self, fn: Callable[[], None]) -> None:
        try:
            self._listeners.remove(fn)
        except ValueError:
            pass

    def _notify(self) -> None:
        for fn in list(self._listeners):
            fn()

    def wait_done(self) -> Deferred["Flight"]:
        """A Deferred of this waiter's own: cancelling it cancels nothing shared."""
        if self.finished:
            return fail(self.error) if self.error else succeed(self)

        def cancel(d: Deferred[Flight]) -> None:
            if d in self._done_waiters:
                self._done_waiters.remove(d)

        d: Deferred[Flight] = Deferred(cancel)
        self._done_waiters.append(d)
        return d

    # -- writing (driven by BodyReceiver and the cache) ----------------------------

    def data(self, chunk: bytes) -> None:
        self.spool.write(chunk)
        self.written += len(chunk)
        self._notify()

    def complete(self, entry: Any) -> None:
        self.entry = entry
        self._finish(None)

    def fail(self, error: BodyError) -> None:
        self._finish(error)

    def _finish(self, error: BodyError | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.error = error
        waiters, self._done_waiters = self._done_waiters, []
        for d in waiters:
            if error is None:
                d.callback(self)
            else:
                d.errback(error)
        self._notify()
        self._listeners.clear()
        self.release()


class BodyReceiver(Protocol):
    """Receives an upstream body into a Flight, with an idle timeout."""

    def __init__(self, flight: Flight, clock: Any, idle_timeout: float, done: Deferred[None]) -> None:
        self.flight = flight
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.done = done
        self._timer: Any = None
        self.timed_out = False
        self.write_error: OSError | None = None

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        self.timed_out = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        try:
            self.flight.data(data)
        except OSError as e:  # disk full, I/O error: stop, never commit
            log.error("spool write failed for {key}: {e}", key=self.flight.key, e=e)
            self.write_error = e
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        f = self.flight
        if self.write_error is not None:
            self.done.errback(BodyError(f"spool write failed: {self.write_error}"))
        elif self.timed_out:
            self.done.errback(BodyError(f"upstream stalled for {self.idle_timeout:g}s after {f.written} bytes"))
        elif reason.check(ResponseDone):
            self.done.callback(None)
        elif reason.check(PotentialDataLoss) and f.total is None:
            # A body delimited by connection close (HTTP/1.0 framing) has no
            # other end marker; accept it, digests still apply.
            self.done.callback(None)
        else:
            self.done.errback(BodyError(f"upstream body ended early after {f.written} bytes: {reason.getErrorMessage()}"))


def receive(response: IResponse, flight: Flight, clock: Any, idle_timeout: float) -> Deferred[None]:
    done: Deferred[None] = Deferred()
    response.deliverBody(BodyReceiver(flight, clock, idle_timeout, done))
    return done
