"""Zero-copy bodies: ``os.sendfile`` from a stored file or a growing spool.

For a large body on a plain-TCP connection the kernel can move file pages
straight to the socket; Python then never touches the bytes. The copy runs
in a dedicated thread pool on a *duplicate* of the socket descriptor, so the
reactor closing its descriptor (client gone) can never make the thread write
into a descriptor number reused by another connection.

Two sources: a committed file (a cache hit), and an in-flight spool (a miss
being tailed), where the thread sends what has arrived and waits for more —
so 64 clients of one cold object cost the reactor nothing per byte.

Before handing over, the response headers are flushed from the transport's
buffer synchronously; if they cannot be (a congested socket), or the pool is
full, or the connection is TLS, the caller falls back to the producer path.
For a stored body the socket is corked (``TCP_CORK``, nginx's
``tcp_nopush``) from the headers until the last byte, so the headers leave in
the body's first full segment rather than in one of their own, and no partial
segment goes out between two sendfile calls; uncorking at the end pushes the
rest. (Not for a tail: it would hold back bytes while waiting for more.) It
matters: a 1 GiB hit without the cork ran at 0.81x nginx, 1/1.25 of the
corked one. The send buffer is left to the kernel's autotuning: a fixed
``SO_SNDBUF`` (4 MiB here, twice the autotuned maximum) measured no faster.

Two pools: a herd's tails beyond the first few run at a lower CPU priority
(see ``_lower_priority``) in a pool of their own, since a thread's priority
cannot be raised again without privilege; hits and a body's first tails run
at full priority in the other, so a lone cold miss and every hit relay at the
speed of their client, not of whatever else the machine runs.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from sparkcache.fetch.flight import Flight
from sparkcache.pools import DaemonThreadPool, stop_pool
from sparkcache.store import BodyRange
from sparkcache.web.serve import finish_safely

# Give up on a client that accepts nothing for this long (a stalled peer).
STALL_TIMEOUT = 120.0
# Most a sendfile call is asked for. A call also stops when the socket's buffer
# is full, but on a fast link the client drains it meanwhile and one call can
# carry the whole chunk. On a 1 GiB hit (bench/hit_large.py --baseline;
# docs/benchmarks.rst, "1 GiB hit, stable measurement") 2, 8 and 64 MiB ran
# at the same speed within the noise; 8 MiB makes a quarter of nginx's calls.
CHUNK = 8 * 1024 * 1024
# How long a stopping daemon waits for the tail senders (which end with their flights).
STOP_TIMEOUT = 5.0
SENDER_NICE = 10
# Tails of one body sent at full priority; those beyond run at SENDER_NICE.
FULL_PRIORITY_TAILS = 2


class SendfilePool:
    def __init__(self, reactor: Any, max_threads: int = 64, pool: ThreadPool | None = None) -> None:
        """``pool`` (of ``max_threads``) is started and stopped by its owner, the
        service tree; without one, start() and stop() run a pool of its own."""
        self.reactor = reactor
        # Threads here spend their time blocked in sendfile/poll, not on the GIL.
        self._own_pool = pool is None
        self.pool = pool if pool is not None else ThreadPool(minthreads=0, maxthreads=max_threads,
                                                             name="sparkcache-sendfile")
        self.max_threads = max_threads
        self.active = 0
        self._tails: dict[Flight, int] = {}  # tails running per in-flight body
        # Tails (misses) only: started with the first one, stopped with the
        # reactor (daemon threads, never joined on the reactor, as the service
        # tree's pools: a tail waiting on a stalled upstream cannot hold a stop).
        self.tail_pool = DaemonThreadPool(minthreads=0, maxthreads=max_threads, name="sparkcache-sendfile-tail")

    def start(self) -> None:
        if self._own_pool:
            self.pool.start()

    def stop(self) -> None:
        if self._own_pool:
            self.pool.stop()
        self._stop_tails()

    def _tail_pool(self) -> ThreadPool:
        if not self.tail_pool.started:
            self.tail_pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._stop_tails)
        return self.tail_pool

    def _stop_tails(self) -> Deferred[bool]:
        return stop_pool(self.tail_pool, self.reactor, STOP_TIMEOUT)

    def _handover(self, request: Any, cork: bool) -> tuple[Any, int] | None:
        """Flush the headers (into a corked socket if ``cork``) and hand back
        (transport, dup'd socket), or None (uncorked)."""
        if self.active >= self.max_threads or not self.pool.started:
            return None
        channel = getattr(request, "channel", None)
        transport = getattr(channel, "transport", None)
        if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
            return None
        request.write(b"")  # the headers, into the transport's buffer
        corked = cork and _cork(transport, True)
        try:
            transport.doWrite()  # flush them now so the body can follow them on the socket
            if not (len(transport.dataBuffer) - transport.offset or transport._tempDataBuffer):
                return transport, os.dup(transport.fileno())
            # (headers still queued: the producer path writes after them)
        except Exception:
            pass
        if corked:
            _cork(transport, False)
        return None

    def _run(self, request: Any, transport: Any, expected: int, on_bytes: Callable[[int], None],
             fn: Callable[..., int], pool: ThreadPool) -> Deferred[None]:
        cancelled = threading.Event()
        self.active += 1
        request.notifyFinish().addErrback(lambda _: cancelled.set())
        d: Deferred[Any] = deferToThreadPool(self.reactor, pool, fn, cancelled)

        def done(sent: int) -> None:
            on_bytes(sent)
            if sent == expected:
                request.sentLength = getattr(request, "sentLength", 0) + sent
                finish_safely(request)
            else:
                transport.abortConnection()  # never a clean end to an incomplete body

        def failed(f: Any) -> None:
            transport.abortConnection()

        def cleanup(r: object) -> None:
            self.active -= 1
            return None

        return d.addCallbacks(done, failed).addBoth(cleanup)

    def try_send(self, request: Any, body: BodyRange, on_bytes: Callable[[int], None]) -> Deferred[None] | None:
        """Start sending a stored body range, which is closed when done; None
        (the range still the caller's) if this connection can't."""
        # Corked: the whole body is there, so every segment can be a full one.
        got = self._handover(request, cork=True)
        if got is None:
            return None
        transport, sock = got
        fd, start, end = body.fileno(), body.start, body.end

        def copy(cancelled: threading.Event) -> int:
            return _copy(sock, fd, start, end, lambda: end, lambda: False, cancelled, None, lower=False, cork=True)

        def close(r: object) -> object:
            body.close()  # on the reactor thread, once the copy no longer reads it
            return r

        return self._run(request, transport, end - start, on_bytes, copy, self.pool).addBoth(close)

    def try_tail(self, request: Any, flight: Flight, start: int, end: int, on_bytes: Callable[[int], None]) -> Deferred[None] | None:
        """Send bytes [start, end) of an in-flight body as they land in its spool."""
        # Not corked: a tail that caught up would hold its last partial segment
        # back for the kernel's 200 ms (and the headers until the first bytes).
        got = self._handover(request, cork=False)
        if got is None:
            return None
        transport, sock = got
        flight.acquire()
        more = threading.Event()
        flight.listen(more.set, from_threads=True)  # (a Siphon wakes it without the reactor)
        # The first few tails of a body run at full priority (a lone miss
        # relays at the speed of its client); a herd's others are lowered.
        tails = self._tails[flight] = self._tails.get(flight, 0) + 1
        lower = tails > FULL_PRIORITY_TAILS

        def copy(cancelled: threading.Event) -> int:
            # Reading ``landed()``/``error`` from this thread is safe: they are
            # attribute loads, and only ever grow / get set once.
            return _copy(sock, flight.fileno(), start, end, flight.landed,
                         lambda: flight.error is not None, cancelled, more, lower=lower)

        def release(r: object) -> object:
            flight.unlisten(more.set)
            flight.release()
            left = self._tails[flight] - 1
            if left:
                self._tails[flight] = left
            else:
                del self._tails[flight]
            return r

        pool = self._tail_pool() if lower else self.pool
        return self._run(request, transport, end - start, on_bytes, copy, pool).addBoth(release)


_local = threading.local()


def _lower_priority() -> None:
    """Run this sender thread at a lower CPU priority than the reactor and the
    I/O pool: with dozens of clients tailing one cold body, fair scheduling
    would otherwise starve the one thread that reads upstream, and the shared
    fetch (which everyone waits on) would slow to a crawl. Linux niceness is
    per thread, and lowering it needs no privilege."""
    if getattr(_local, "niced", False):
        return
    _local.niced = True
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SENDER_NICE)
    except (AttributeError, OSError):
        pass


def _copy(
    sock: int,
    fd: int,
    start: int,
    end: int,
    available: Callable[[], int],
    failed: Callable[[], bool],
    cancelled: threading.Event,
    more: threading.Event | None,
    lower: bool = True,
    cork: bool = False,
) -> int:
    """Blocking (in the pool): sendfile until done, failed, cancelled or stalled;
    returns bytes sent. Closes ``sock`` at the end (uncorked first if ``cork``)."""
    if lower:
        _lower_priority()
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    offset = start
    idle = 0.0
    # The socket's buffer is full: wait until it has room. Known from a
    # short send as well as from EAGAIN, so a full buffer costs one
    # sendfile and one poll per refill, not a second, failing sendfile.
    full = False
    try:
        while offset < end and not cancelled.is_set():
            if full:
                full = False
                if not poller.poll(1000):
                    idle += 1.0
                    if idle >= STALL_TIMEOUT:
                        break
                    continue
            limit = min(end, available())
            if offset >= limit:
                if failed() or more is None:
                    break
                more.clear()
                if offset >= min(end, available()) and not failed():
                    more.wait(1.0)  # the flight sets it when bytes arrive or it ends
                continue
            want = min(CHUNK, limit - offset)
            try:
                n = os.sendfile(sock, fd, offset, want)
            except BlockingIOError:
                full = True
                continue
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN):
                    break
                raise
            if n == 0:
                break  # file shorter than expected
            offset += n
            idle = 0.0
            full = n < want
        return offset - start  # short of end - start means: abort the connection
    finally:
        try:
            if cork:
                _setcork(sock, False)
        finally:
            os.close(sock)


def _setcork(fd: int, on: bool) -> bool:
    """TCP_CORK on a socket descriptor (Linux); False where there is none."""
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None:
        return False
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        s.setsockopt(socket.IPPROTO_TCP, cork, 1 if on else 0)
        return True
    except OSError:
        return False
    finally:
        s.detach()  # the descriptor stays its owner's


def _cork(transport: Any, on: bool) -> bool:
    try:
        return _setcork(transport.fileno(), on)
    except Exception:
        return False
