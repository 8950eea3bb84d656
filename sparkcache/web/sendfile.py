"""Zero-copy large hits: ``os.sendfile`` from the content store to the socket.

For a large body on a plain-TCP connection the kernel can move file pages
straight to the socket; Python then never touches the bytes. The copy runs
in a small dedicated thread pool on a *duplicate* of the socket descriptor,
so the reactor closing its descriptor (client gone) can never make the
thread write into a descriptor number reused by another connection.

Before handing over, the response headers are flushed from the transport's
buffer synchronously; if they cannot be (a congested socket), or the pool is
full, or the connection is TLS, the caller falls back to the producer path.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from sparkcache.web.serve import finish_safely

# Give up on a client that accepts nothing for this long (a stalled peer).
STALL_TIMEOUT = 120.0
CHUNK = 8 * 1024 * 1024


class SendfilePool:
    def __init__(self, reactor: Any, max_threads: int = 16) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="sparkcache-sendfile")
        self.max_threads = max_threads
        self.active = 0

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def try_send(self, request: Any, path: str, start: int, end: int, on_bytes: Callable[[int], None]) -> Deferred[None] | None:
        """Start sending bytes [start, end) of ``path``; None if this connection can't."""
        if self.active >= self.max_threads or not self.pool.started:
            return None
        channel = getattr(request, "channel", None)
        transport = getattr(channel, "transport", None)
        if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
            return None
        fd = os.open(path, os.O_RDONLY)  # before any header is sent: a missing body can still be a 503
        request.write(b"")  # the headers, into the transport's buffer
        try:
            transport.doWrite()  # flush them now so the body can follow them on the socket
            if len(transport.dataBuffer) - transport.offset or transport._tempDataBuffer:
                raise BlockingIOError  # headers still queued: the producer path writes after them
            sock = os.dup(transport.fileno())
        except Exception:
            os.close(fd)
            return None
        cancelled = threading.Event()
        self.active += 1
        request.notifyFinish().addErrback(lambda _: cancelled.set())
        d: Deferred[Any] = deferToThreadPool(self.reactor, self.pool, _copy, sock, fd, start, end, cancelled)

        def done(sent: int) -> None:
            on_bytes(sent)
            if sent == end - start:
                request.sentLength = getattr(request, "sentLength", 0) + sent
                finish_safely(request)
            else:
                transport.abortConnection()

        def failed(f: Any) -> None:
            transport.abortConnection()

        def cleanup(r: object) -> None:
            self.active -= 1
            return None

        return d.addCallbacks(done, failed).addBoth(cleanup)


def _copy(sock: int, fd: int, start: int, end: int, cancelled: threading.Event) -> int:
    """Blocking (in the pool): sendfile until done, cancelled or stalled; returns bytes sent."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    offset = start
    idle = 0.0
    try:
        while offset < end and not cancelled.is_set():
            try:
                n = os.sendfile(sock, fd, offset, min(CHUNK, end - offset))
            except BlockingIOError:
                if not poller.poll(1000):
                    idle += 1.0
                    if idle >= STALL_TIMEOUT:
                        break
                continue
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN):
                    break
                raise
            if n == 0:
                break  # file shorter than expected
            offset += n
            idle = 0.0
        return offset - start
    finally:
        os.close(fd)
        os.close(sock)
