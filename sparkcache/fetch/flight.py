"""One body being produced into a spool file, shared by every client that wants it.

Pushed bodies (an upstream response, a child's stdout) go to the spool at
their producer's speed through an Intake, hashed as they arrive; the disk
writes and hashing run in two threads of the flight's own, its ``Lanes`` (a
page-cache write can be slower than the network), with the producer paused
while too much is queued. A body built
in a worker thread is written there directly through a ThreadWriter. Each
client tails the file through its own producer, at its own speed, via
``pread`` on one descriptor the flight holds open — so a reader that joins
while the body is renamed into the content store still reads the same bytes.
Nothing a client does (pausing, disconnecting) reaches the production.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import IResponse
from zope.interface import implementer

from sparkcache.fetch import crew
from sparkcache.fetch.siphon import Siphon, siphonable
from sparkcache.store import SpoolFile

log = Logger()


READ_SIZE = 512 << 10
# Pause the upstream while more than this is waiting for the disk.
HIGH_WATER = 2 << 20
LOW_WATER = 1 << 20
# A miss's spool is written in batches of at least this much (see Flight._take).
BATCH = 512 << 10
BATCH_WAIT = 0.002
# Readers of a body a Siphon reads hear about new bytes in steps of this size:
# those that listen from their own thread (sendfile tails) straight from the
# siphon's thread, the reactor (and the readers it serves) every REACTOR_STEP.
SIPHON_STEP = 1 << 20
REACTOR_STEP = 4 << 20
# Readers of a body built in a thread hear about new bytes in steps of this size.
PROGRESS_STEP = 256 << 10


class BodyError(Exception):
    """The body was truncated, stalled, could not be spooled or failed verification."""


class Lanes:
    """Where a Flight's writer and hasher run: each in a thread of its own,
    started when the first bytes come and ending once it waited ``linger``
    seconds for more (or the flight ended). The lanes tell the reactor of
    their progress with ``call`` (``reactor.callFromThread``).

    Threads of their own, not the I/O pool's: a lane keeps its thread for as
    long as the body streams, and a few long downloads must not take every
    pool thread from the commits and space checks that need one.
    """

    LINGER = 0.05

    def __init__(self, reactor: Any, linger: float = LINGER) -> None:
        self.call: Callable[..., Any] = reactor.callFromThread
        self.linger = linger

    def start(self, lane: Callable[[], None]) -> None:
        crew.streams.run(lane)  # (a thread kept for reuse: fetch/crew.py)


class Flight:
    """Spooling state of one body being produced.

    ``written`` grows as bytes land in the spool; ``done`` fires (with the
    flight) once the body is complete, verified and committed, or errbacks
    with BodyError. Readers subscribe to be told about progress.
    """

    # (For the subclasses that write nothing themselves: nothing lands but
    # what ``written`` says, and no thread wakes a reader.)
    _on_disk = 0
    _wakers: tuple[Callable[[], None], ...] = ()

    def __init__(
        self,
        key: str,
        spool: SpoolFile,
        total: int | None,
        headers: dict[str, str],
        lanes: Lanes,
    ) -> None:
        self.key = key
        self.spool = spool
        self._lanes: Lanes = lanes
        # Shared with the lanes (under _lock): their queues, what they did, and whether they run.
        self._lock = threading.Lock()
        self._write_cond = threading.Condition(self._lock)
        self._hash_cond = threading.Condition(self._lock)
        self._to_write: list[bytes] = []  # received, not yet written
        self._to_write_bytes = 0
        self._draining = False  # flushed() was asked: batches go now, however small
        self._to_hash: list[bytes] = []  # written, not yet hashed
        self._alive: set[str] = set()  # lanes running ("write", "hash")
        self._working: set[str] = set()  # lanes busy with a batch
        self._on_disk = 0  # bytes written
        self._retired = 0  # bytes done with: hashed (or written, when hashed as written)
        self._lane_error: BaseException | None = None
        self._told = False  # a _sync is on its way to the reactor
        self._siphoned = 0  # bytes a Siphon's thread wrote (it takes the write lane's place)
        self._siphon_told = 0  # (_on_disk when the siphon last told the reactor)
        self._siphon_woke = 0  # (_on_disk when the siphon last woke the readers in threads)
        self._closing = False  # finished: lanes end instead of waiting for more
        # The reactor's view.
        self._received = 0
        self.queued = 0  # bytes received but not yet on disk (and hashed)
        self._split: bool | None = None  # data() hashes in a lane of its own
        self._drained: list[Deferred[None]] = []
        self._write_error: BaseException | None = None
        self.on_drain: Callable[[], None] = lambda: None
        self.total = total
        self.headers = headers
        self.written = 0
        self.finished = False
        self.error: BodyError | None = None
        self.entry: Any = None  # the committed Entry, once there is one
        # The body has a digest to match (OCI blobs): readers get its last
        # byte only once it matched, so a client that trusts Content-Length
        # never sees a clean end of an unverified body.
        self.hold_last = False
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
            # Not on the reactor: the last close of a spool dropped as a
            # duplicate of a stored body frees its blocks (~1 ms per 2 MiB here).
            crew.streams.run(os.close, self._fd)
            self._fd = None

    def fileno(self) -> int:
        """The spool's read descriptor (valid while acquired); use with offsets only."""
        assert self._fd is not None, "flight released"
        return self._fd

    def read(self, offset: int, size: int) -> bytes:
        assert self._fd is not None, "flight released"
        return os.pread(self._fd, min(size, self.written - offset), offset)

    def listen(self, fn: Callable[[], None], from_threads: bool = False) -> None:
        """Call ``fn`` (on the reactor) when bytes land or the flight ends.
        ``from_threads``: also from the thread that writes the spool, as soon
        as bytes land (a Siphon's, ahead of the reactor): ``fn`` must be
        thread-safe (a ``threading.Event``'s ``set``), and read ``landed()``."""
        self._listeners.append(fn)
        if from_threads:
            self._wakers = self._wakers + (fn,)

    def unlisten(self, fn: Callable[[], None]) -> None:
        try:
            self._listeners.remove(fn)
        except ValueError:
            pass
        if fn in self._wakers:
            self._wakers = tuple(w for w in self._wakers if w is not fn)

    def landed(self) -> int:
        """(Any thread.) Bytes in the spool now: ``written``, or more when a
        Siphon wrote some the reactor has yet to hear of. Only for a reader
        that may send each byte as it lands (not a body held for its digest)."""
        return max(self.written, self._on_disk)

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

    # -- writing (by an Intake on the reactor, or a ThreadWriter) --------------------

    def advance(self, n: int) -> None:
        """``n`` more bytes are in the spool, written there by a worker thread."""
        self.written += n
        self._notify()

    def data(self, chunk: bytes) -> None:
        if self._write_error is not None:
            raise OSError(f"spool write failed: {self._write_error}")
        if self.finished:  # (its spool may be discarded: no lane may write to it now)
            raise OSError("the production has ended")
        if self._split is None:
            # Not when bytes were written, and hashed, before (an adopted
            # spool), nor for a body to verify: its readers get each byte only
            # once it is hashed, so a mismatch found at the end is most often
            # answered with a clean 502 rather than a cut-off 200.
            self._split = self.spool.size == 0 and not self.hold_last
            if self._split:
                self.spool.defer_hashing()
        self._received += len(chunk)
        self.queued += len(chunk)
        with self._lock:
            self._to_write.append(chunk)
            self._to_write_bytes += len(chunk)
            # (Woken for the first chunk of a batch too: it may be lingering,
            # and it then waits BATCH_WAIT at most for the rest.)
            start = self._wake("write", len(self._to_write) == 1 or self._to_write_bytes >= BATCH)
        if start:
            self._lanes.start(self._write_lane)

    # Writing and hashing are two lanes, each a thread of the flight's own that
    # works through its queue and waits a moment (``Lanes.linger``) for more
    # before it ends: one batch is hashed while the next is written (sha256
    # runs at about the speed of the page-cache write, so one thread doing
    # both in turn halved what a miss could relay). Handing a chunk to a lane
    # is an append under a lock, and a wake-up only if it sleeps: no thread-pool
    # call and no Deferred per batch. The lanes tell the reactor of their
    # progress through ``_sync`` (one call in flight at a time); readers hear
    # of bytes once they are written, and a chunk counts in ``queued`` (the
    # backpressure on the producer) until it is hashed too.

    def _wake(self, lane: str, now: bool = True) -> bool:
        """(Under the lock.) Wake ``lane`` if it waits (and ``now``: it would
        wait for a fuller batch otherwise); True if it must be started."""
        if lane in self._alive:
            if now:
                (self._write_cond if lane == "write" else self._hash_cond).notify()
            return False
        self._alive.add(lane)
        return True

    def _take(self, lane: str) -> list[bytes]:
        """(In the lane, under the lock.) The next batch; empty: the lane ends.

        The write lane takes at least BATCH bytes at a time, waiting up to
        BATCH_WAIT for them, except for the first bytes (readers are waiting)
        and the last (``flushed`` was asked): every batch costs a wake-up of
        the lane, one of the reactor (``_sync``) and one of each reader, and
        the hash lane hashes what the write lane wrote, in the same batches.
        """
        cond = self._write_cond if lane == "write" else self._hash_cond
        waited = held = False
        while True:
            batch = self._to_write if lane == "write" else self._to_hash
            if batch and self._lane_error is None:
                if (lane == "write" and not held and self._to_write_bytes < BATCH and self._on_disk
                        and not self._closing and not self._draining and self._lanes.linger > 0):
                    held = True
                    cond.wait(BATCH_WAIT)
                    continue
                if lane == "write":
                    self._to_write, self._to_write_bytes = [], 0
                else:
                    self._to_hash = []
                self._working.add(lane)
                return batch
            if waited or self._lane_error is not None or self._closing or self._lanes.linger <= 0:
                self._alive.discard(lane)
                return []
            cond.wait(self._lanes.linger)
            waited = True

    def _write_lane(self) -> None:
        self._run_lane("write", self.spool.write_all, self._written)

    def _hash_lane(self) -> None:
        self._run_lane("hash", self.spool.hash_chunks, self._hashed)

    def _run_lane(self, lane: str, work: Callable[[list[bytes]], int],
                  done: Callable[[list[bytes], int], None]) -> None:
        """(A lane's thread.) ``work`` batch after batch, until none comes."""
        while True:
            with self._lock:
                batch = self._take(lane)
            if not batch:
                self._tell()
                return
            try:
                n = work(batch)
            except BaseException as e:
                self._lane_failed(lane, e)
                return
            done(batch, n)
            if lane == "write" or self._hash_news():
                self._tell()

    def _hash_news(self) -> bool:
        """(In the hash lane.) Whether the reactor must hear of a hashed batch:
        always, but behind a Siphon while it reads (only flushed() waits for
        the hash there, and the siphon tells of the bytes it writes)."""
        with self._lock:
            return not self._siphoned or self._draining or "write" not in self._alive

    def _written(self, batch: list[bytes], n: int) -> None:
        with self._lock:
            self._working.discard("write")
            start = self._on_disk_now(batch, n)
        if start:
            self._lanes.start(self._hash_lane)

    def _on_disk_now(self, chunks: list[Any], n: int) -> bool:
        """(Under the lock.) ``chunks`` (``n`` bytes) are in the spool: next for
        the hash lane (True: it must be started), or done with."""
        self._on_disk += n
        if self._split:
            self._to_hash.extend(chunks)
            return self._wake("hash")
        self._retired += n
        return False

    def _hashed(self, batch: list[bytes], n: int) -> None:
        with self._lock:
            self._working.discard("hash")
            self._retired += n
            if self._siphoned:
                self._write_cond.notify()  # (a Siphon may wait for this buffer back)

    # A Siphon (fetch/siphon.py) reads an upstream body from its socket in a
    # thread that takes the write lane's place: it writes each read to the
    # spool itself and hands the very buffer to the hash lane, reusing it once
    # hashed. These are its side of the flight (``siphon_*`` in its thread).

    def take_over(self) -> bool:
        """(On the reactor, before any byte.) A Siphon writes the body from now
        on; False if bytes already went the other way (then it must not)."""
        if self._received or self._split is not None or self.finished:
            return False
        self._split = self.spool.size == 0 and not self.hold_last
        if self._split:
            self.spool.defer_hashing()
        with self._lock:
            self._alive.add("write")
            self._working.add("write")
        return True

    @property
    def body_offset(self) -> int:
        """(In the siphon.) Bytes of the body before what the siphon writes next."""
        return self._received + self._siphoned

    def siphon_wrote(self, n: int) -> None:
        """(In the siphon.) ``n`` more bytes are in the spool: readers are told
        (the first bytes at once, then every SIPHON_STEP, the reactor every
        REACTOR_STEP). They are hashed once handed over with ``siphon_hash``
        (unless hashed as written)."""
        with self._lock:
            self._siphoned += n
            self._on_disk += n
            if not self._split:
                self._retired += n
            # Each telling of the reactor is a wake-up of the reactor and of
            # the readers it serves; each waking, of every tail's thread.
            on_disk = self._on_disk
            wake = not self._siphon_woke or on_disk - self._siphon_woke >= SIPHON_STEP
            if wake:
                self._siphon_woke = on_disk
            tell = not self._siphon_told or on_disk - self._siphon_told >= REACTOR_STEP
            if tell:
                self._siphon_told = on_disk
        self._siphon_announce(wake, tell)

    def siphon_hash(self, chunk: Any) -> None:
        """(In the siphon.) ``chunk``, written already, goes to the hash lane;
        its buffer may be read into again once ``siphon_wait`` says it is hashed.
        One hand-over per buffer filled, not per read: each is a wake-up of
        the hash lane, and a ring buffer filled by several short reads (a
        small receive window) would cost as many."""
        if not self._split:
            return
        with self._lock:
            if self._lane_error is not None:
                return  # (the spool failed: nothing more is hashed, and no lane starts for it)
            self._to_hash.append(chunk)
            start = self._wake("hash")
        if start:
            self._lanes.start(self._hash_lane)

    def siphon_caught_up(self) -> None:
        """(In the siphon.) Upstream has sent nothing more for now: readers hear
        of every byte on disk (not only at the next step)."""
        with self._lock:
            wake = self._on_disk > self._siphon_woke
            tell = self._on_disk > self._siphon_told
            self._siphon_woke = self._siphon_told = self._on_disk
        self._siphon_announce(wake, tell)

    def _siphon_announce(self, wake: bool, tell: bool) -> None:
        """(In the siphon, outside the lock.) Wake the tails' threads, tell the reactor."""
        if wake:
            for fn in self._wakers:
                fn()
        if tell:
            self._tell()

    def siphon_wait(self, retired: int) -> bool:
        """(In the siphon.) Wait until the first ``retired`` bytes are hashed (a
        buffer comes back); False if the flight fails or ends meanwhile."""
        with self._lock:
            while self._retired < retired:
                if self._lane_error is not None or self._closing:
                    return False
                self._write_cond.wait(1.0)
            return self._lane_error is None and not self._closing

    def siphon_failed(self, e: BaseException) -> None:
        """(In the siphon.) Writing the spool failed: the flight's write error."""
        self._lane_failed("write", e)

    def siphon_ended(self) -> None:
        """(In the siphon, last.) No more bytes from it: flushed() may fire."""
        with self._lock:
            self._working.discard("write")
            self._alive.discard("write")
        self._tell()

    def _lane_failed(self, lane: str, e: BaseException) -> None:
        with self._lock:
            self._working.discard(lane)
            if self._lane_error is None:
                self._lane_error = e
            self._to_write, self._to_write_bytes, self._to_hash = [], 0, []
            self._alive.clear()  # (the other lane sees the error and ends)
            self._write_cond.notify_all()
            self._hash_cond.notify_all()
        self._tell()

    def _tell(self) -> None:
        """(In a lane.) Have the reactor take in the progress, unless it is about to."""
        with self._lock:
            if self._told:
                return
            self._told = True
        self._lanes.call(self._sync)

    def _sync(self) -> None:
        """(On the reactor.) Take in what the lanes did: readers, backpressure, flushed()."""
        with self._lock:
            self._told = False
            on_disk, retired, error = self._on_disk, self._retired, self._lane_error
            received = self._received + self._siphoned
        if error is not None and self._write_error is None:
            self._write_error = error
        grew = on_disk > self.written
        self.written = on_disk
        self.queued = 0 if self._write_error is not None else received - retired
        self._progress()
        if grew:
            self._notify()

    def _busy(self) -> bool:
        """Whether a lane still works on the spool, bytes wait for one, or
        the reactor has yet to hear (``_sync``) that they are done. After a
        write error only the write lane counts: the hash lane touches no
        descriptor, and the failure (the disk's, noted by the engine once
        this says no thread writes) must not wait for a hash nobody reads."""
        if self.queued:
            return True
        with self._lock:
            if self._write_error is not None:
                return "write" in self._working
            return bool(self._working or self._to_write or self._to_hash)

    def _progress(self) -> None:
        # (On a write error, a producer paused until the disk catches up hears
        # here that it never will.)
        self.on_drain()
        if not self._busy():
            drained, self._drained = self._drained, []
            for w in drained:
                if self._write_error is None:
                    w.callback(None)
                else:
                    w.errback(BodyError(f"spool write failed: {self._write_error}"))

    @property
    def write_error(self) -> BaseException | None:
        """Why the spool could not be written (disk full, I/O error), if it could not."""
        return self._write_error

    def flushed(self) -> Deferred[None]:
        """Fires once every byte received so far is in the spool file and
        hashed; fails (once no thread writes to the spool any more) if the
        spool could not be written."""
        if not self._busy():
            if self._write_error is not None:
                return fail(BodyError(f"spool write failed: {self._write_error}"))
            return succeed(None)
        with self._lock:
            self._draining = True
            self._write_cond.notify()
            self._hash_cond.notify()  # (a hash lane lingering for more ends, and says so, now)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def _close_lanes(self) -> None:
        """No more bytes come: lanes waiting for some end now."""
        lock = getattr(self, "_lock", None)  # (None: a flight that writes nothing itself)
        if lock is None:
            return
        with lock:
            self._closing = True
            self._write_cond.notify_all()
            self._hash_cond.notify_all()

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
        self._close_lanes()
        waiters, self._done_waiters = self._done_waiters, []
        for d in waiters:
            if error is None:
                d.callback(self)
            else:
                d.errback(error)
        self._notify()
        self._listeners.clear()
        self._wakers = ()
        self.release()


class PassFlight(Flight):
    """An upstream body passed straight through to one client, never stored:
    what a miss gets while the store cannot write (disk full).

    Bytes wait in memory until the client's producer reads them, in order;
    ``queued`` counts them, so the Intake pauses the upstream while the
    client is behind. The body is sent without a length (``total`` is None:
    chunked, Range ignored) and ends cleanly only once the production saw it
    complete and matching its digests (``complete``); otherwise the client's
    connection is aborted, as for any failed flight.

    One client reads it: the request the production was started for. Others
    that joined start their own. ``abandon`` (set by the engine) stops the
    upstream when that client goes away, never came (``ATTACH_TIMEOUT``), or
    only waits for the end (a caller that needs a stored entry gets a
    BodyError at once).
    """

    ATTACH_TIMEOUT = 10.0

    def __init__(self, key: str, headers: dict[str, str], clock: Any, algorithms: tuple[str, ...] = ()) -> None:
        self.key = key
        self.total = None
        self.headers = headers
        self.written = 0
        self.queued = 0
        self.finished = False
        self.error = None
        self.entry = None
        self.hold_last = True
        self.on_drain = lambda: None
        self.abandon: Callable[[], None] = lambda: None
        self.claimed = False
        self._chunks: list[bytes] = []
        self._base = 0  # offset of the first byte in _chunks
        self._users = 1
        self._attached = False
        self._listeners = []
        self._done_waiters = []
        self._hashes = {a: hashlib.new(a) for a in algorithms}
        self._timer: Any = clock.callLater(self.ATTACH_TIMEOUT, self._unattended)

    def hexdigest_of(self, algorithm: str) -> str:
        return str(self._hashes[algorithm].hexdigest())

    def _unattended(self) -> None:
        self._timer = None
        if not self._attached:
            self.abandon()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def acquire(self) -> None:
        self._users += 1
        self._attached = True
        self._stop_timer()

    def release(self) -> None:
        self._users -= 1
        if self._users == 1 and self._attached and not self.finished:
            self.abandon()  # the client went away: nobody else reads this body
        if self._users == 0 and self._attached:
            self._chunks = []  # (a body that ended before its client came stays for it)
            self._stop_timer()

    def fileno(self) -> int:
        raise OSError("a passed-through body has no file")

    def read(self, offset: int, size: int) -> bytes:
        if offset != self._base:
            return b""  # not where the one reader left off: its producer aborts
        out: list[bytes] = []
        n = 0
        while self._chunks and n < size:
            chunk = self._chunks[0]
            take = min(len(chunk), size - n)
            out.append(chunk[:take])
            if take == len(chunk):
                self._chunks.pop(0)
            else:
                self._chunks[0] = chunk[take:]
            n += take
        self._base += n
        self.queued -= n
        if self.queued < LOW_WATER:
            self.on_drain()
        return b"".join(out)

    def wait_done(self) -> Deferred["Flight"]:
        """Nothing is stored: whoever waits for the entry hears so now."""
        if not self._attached:
            self.abandon()
        return fail(BodyError("not stored: the store cannot write (disk full?); the body was passed through"))

    def data(self, chunk: bytes) -> None:
        for h in self._hashes.values():
            h.update(chunk)
        self._chunks.append(chunk)
        self.queued += len(chunk)
        self.written += len(chunk)
        self._notify()

    @property
    def write_error(self) -> BaseException | None:
        return None

    def flushed(self) -> Deferred[None]:
        return succeed(None)

    def _finish(self, error: BodyError | None) -> None:
        self._stop_timer()
        super()._finish(error)


@implementer(IConsumer)
class Intake:
    """A push producer's bytes into a Flight: an upstream body, a child's stdout.

    Pauses the producer while too much waits for the disk, and stops it when it
    stays silent for ``idle_timeout`` (waiting on our own disk does not count)
    or when the spool cannot be written; ``error`` then says why. Remembers the
    last bytes, for output that ends with a marker (git's flush-pkt).
    """

    TAIL = 16

    def __init__(self, flight: Flight, clock: Any, idle_timeout: float, idle_error: str) -> None:
        """``idle_error`` is formatted with ``timeout`` and ``bytes`` (received so far)."""
        self.flight = flight
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.idle_error = idle_error
        self.producer: Any = None
        self.error: str | None = None
        self.tail = b""
        self._paused = False
        self._closed = False
        self._timer: Any = clock.callLater(idle_timeout, self._idle)
        flight.on_drain = self._maybe_resume

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if self.error is not None:
            producer.stopProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        if self.error is not None or not data:
            return
        try:
            self.flight.data(data)
        except OSError as e:  # disk full, I/O error: stop, never commit
            log.error("spool write failed for {key}: {e}", key=self.flight.key, e=e)
            self.stop(f"spool write failed: {e}")
            return
        self.tail = data[-self.TAIL:] if len(data) >= self.TAIL else (self.tail + data)[-self.TAIL:]
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        if self.flight.queued > HIGH_WATER and not self._paused and self.producer is not None:
            self._paused = True
            self.producer.pauseProducing()
            if self._timer is not None and self._timer.active():
                self._timer.cancel()  # waiting on our disk is not a stalled producer

    def _maybe_resume(self) -> None:
        if self.flight.write_error is not None:
            self.stop(f"spool write failed: {self.flight.write_error}")
            return
        if self._paused and self.flight.queued < LOW_WATER:
            self._paused = False
            if self.error is None and not self._closed:
                self._timer = self.clock.callLater(self.idle_timeout, self._idle)
            if self.producer is not None:
                self.producer.resumeProducing()

    def _idle(self) -> None:
        received = self.flight.written + self.flight.queued
        self.stop(self.idle_error.format(timeout=self.idle_timeout, bytes=received))

    def stop(self, why: str) -> None:
        """Stop the producer; nothing it sends from now on is kept."""
        if self.error is None:
            self.error = why
        if self.producer is not None:
            self.producer.stopProducing()

    def hand_over(self) -> None:
        """A Siphon reads the producer's bytes from now on, and watches for a
        stall itself: no timer here."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def close(self) -> None:
        """The producer is done (or gone): no more timers, no more resumes."""
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.flight.on_drain = lambda: None


class BodyReceiver(Protocol):
    """Receives an upstream body into a Flight, with an idle timeout.

    A large body of known length on plain TCP is read by a Siphon (see
    fetch/siphon.py) instead of the reactor: ``siphon`` says so from
    ``connectionMade`` on, and the bytes delivered before ``receive`` hands
    the connection over wait in ``held``.
    """

    def __init__(self, flight: Flight, clock: Any, idle_timeout: float, done: Deferred[None],
                 length: Any = None) -> None:
        self.flight = flight
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.done = done
        self.length = length
        self.intake: Intake | None = None
        self.siphon: Siphon | None = None
        self.held: list[bytes] | None = None
        self._taken: Any = None

    def connectionMade(self) -> None:
        self.intake = Intake(self.flight, self.clock, self.idle_timeout,
                             "upstream stalled for {timeout:g}s after {bytes} bytes")
        self.intake.registerProducer(self.transport, True)
        taken = siphonable(self.transport, self.length) if type(self.flight) is Flight else None
        if taken is not None and self.flight.take_over():
            self._taken, self.held = taken, []
            return
        # Read upstream in large gulps: each read is a trip through the HTTP
        # parser and the spool, so fewer, bigger reads mean less CPU per byte.
        tcp = getattr(self.transport, "_producer", None)
        if tcp is not None and hasattr(tcp, "bufferSize"):
            tcp.bufferSize = READ_SIZE

    def hand_over(self) -> None:
        """(After deliverBody.) Stop the reactor reading the connection, and
        start a Siphon on the rest of the body at the next turn: the HTTP
        parser may still deliver bytes it read along with the headers as the
        call that got here unwinds (they join ``held``)."""
        if self.held is None or self._taken is None:
            return
        self._taken[0].stopReading()
        assert self.intake is not None
        self.intake.hand_over()
        self.clock.callLater(0, self._start_siphon)

    def _start_siphon(self) -> None:
        if self.held is None:
            return  # (it ended meanwhile: see connectionLost)
        held, self.held = self.held, None
        conn, decoder = self._taken
        if self.done.called:  # cancelled meanwhile
            self.flight.siphon_ended()
            return
        siphon = Siphon(self.flight, conn, decoder, self.idle_timeout, self.flight._lanes.call, self._siphon_ended)
        try:
            siphon.start(held)
        except OSError as e:  # (the connection is gone already)
            self.flight.siphon_ended()
            assert self.intake is not None
            self.intake.stop(f"upstream connection lost: {e}")
            return
        self.siphon = siphon

    def _siphon_ended(self, outcome: str, detail: str) -> None:
        """(On the reactor.) The Siphon stopped before the end of the body: the
        connection is closed, and connectionLost reports why."""
        assert self.intake is not None
        if outcome == "stalled":
            self.intake.stop(self.intake.idle_error.format(timeout=self.idle_timeout,
                                                           bytes=self.flight.written + self.flight.queued))
        elif outcome == "write":
            self.intake.stop(f"spool write failed: {self.flight.write_error or detail}")
        elif outcome == "stopped" and self.intake.error is None and not self.done.called:
            self.intake.stop("the production has ended")
        transport = self.transport
        if transport is not None:
            transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
            return
        if self.siphon is not None:
            if data:  # (never: the reactor does not read a siphoned connection)
                self.siphon.stop()
                assert self.intake is not None
                self.intake.stop("body bytes arrived outside the siphon")
            return
        assert self.intake is not None
        self.intake.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        intake = self.intake
        if self.held is not None:
            # (Over before it could be handed over: it went the reactor's way after all.)
            held, self.held = self.held, None
            self.flight.siphon_ended()
            self.flight._split = None
            for data in held:
                if intake is not None:
                    intake.write(data)
        if intake is not None:
            intake.close()
            intake.unregisterProducer()
        if self.done.called:
            return  # cancelled: nobody waits for this body any more
        f = self.flight
        if intake is not None and intake.error is not None:
            self.done.errback(BodyError(intake.error))
        elif reason.check(ResponseDone) or (reason.check(PotentialDataLoss) and f.total is None):
            # (A body delimited by connection close, HTTP/1.0 framing, has no
            # other end marker; accept it, digests still apply.)
            f.flushed().chainDeferred(self.done)
        else:
            self.done.errback(BodyError(f"upstream body ended early after {f.written + f.queued} bytes ({_reason(reason)})"))


def receive(response: IResponse, flight: Flight, clock: Any, idle_timeout: float) -> Deferred[None]:
    """Spool ``response``'s body into ``flight``; cancelling stops the upstream transfer."""

    def cancel(_: Deferred[None]) -> None:
        if receiver.siphon is not None:
            receiver.siphon.stop()
        if receiver.transport is not None:
            receiver.transport.stopProducing()  # type: ignore[attr-defined]

    done: Deferred[None] = Deferred(cancel)
    receiver = BodyReceiver(flight, clock, idle_timeout, done, getattr(response, "length", None))
    response.deliverBody(receiver)
    receiver.hand_over()
    return done


class ThreadWriter:
    """The spool as a file object for a worker thread that builds a body (an
    archive, a normalized upload): bytes go straight to the spool file, hashed
    as they go, and the reactor hears about them every PROGRESS_STEP bytes, so
    readers tail a build exactly as they tail a download."""

    def __init__(self, flight: Flight, reactor: Any) -> None:
        self.flight, self.reactor = flight, reactor
        self.pending = 0
        self.cancelled = False

    def write(self, data: bytes) -> int:
        if self.cancelled:
            raise BodyError("stopped while building")
        self.flight.spool.write(data)
        self.pending += len(data)
        if self.pending >= PROGRESS_STEP:
            self.flush()
        return len(data)

    def flush(self) -> None:
        n, self.pending = self.pending, 0
        if n:
            self.reactor.callFromThread(self.flight.advance, n)

    def cancel(self) -> None:
        """Called on the reactor: the thread's next write raises, ending the build."""
        self.cancelled = True


def _reason(reason: Failure) -> str:
    """One readable cause, not a repr of nested Failures."""
    inner = getattr(reason.value, "reasons", None)
    if inner:
        return "; ".join(type(r.value).__name__ for r in inner)
    return type(reason.value).__name__
