"""A large upstream body read straight from its socket, in a thread of its flight's own.

The reactor path of a body costs Python on every read: Twisted's ``doRead``,
the HTTP client's parser and body decoder, the Response, our receiver, the
hand-off of a fresh ``bytes`` object to the write lane, then to the hash
lane, and GIL hand-offs between all of them. For a body of known length on
a plain TCP connection none of that is needed once the headers are parsed:
a Siphon stops the reactor reading the connection and reads the rest of the
body itself, from a duplicate of its descriptor, in one thread that
``recv_into``\\s a few reused buffers, writes each read to the spool and hands
each filled buffer to the flight's hash lane (taking it back once hashed).
That thread takes the flight's write lane's place, so everything downstream
is unchanged: readers hear of bytes once written (tails that listen from
their own thread straight from the siphon's, the reactor through ``_sync``),
``flushed()`` waits for the thread and the hash lane, a write error is the
flight's write error. A nearby upstream's socket gets a wider receive
window (``widen_receive_window``), so that a read fills a buffer.

When the last byte is in, the reactor tells Twisted's parser that the body
is complete (its decoder's remaining length set to 0), so the connection goes
back to the pool, as after any body, unless its window was widened
(``kept_wide``): the upstream client then closes it (see there). Anything
else (end of stream before the last byte, an error, a stall, a stop) ends
the transfer as on the reactor path: the connection is closed and the
receiver reports why.

Every guarantee holds as before: the body goes to the spool and is hashed;
only bytes on disk are announced; the thread reads at the speed the disk and
the hash allow (the reads wait for a buffer to come back), so upstream is
held back by TCP, never by memory (``RING`` x ``READ`` bytes per body).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.http import _IdentityTransferDecoder

from sparkcache.fetch import crew

if TYPE_CHECKING:
    from sparkcache.fetch.flight import Flight

log = Logger()

# Bodies shorter than this stay on the reactor path (a thread is not worth it).
SIPHON_MIN = 1 << 20
# Reads of up to READ bytes into RING reused buffers: a buffer is read into
# again only once the hash lane is done with it. (6 MiB per miss: 4 x 1 MiB
# cost 0.15-0.2 s more CPU per GB than 3 or 4 x 2 MiB in A/B runs here, one
# loop of Python, a wake-up of the hash lane and of the tails per buffer; and
# before, 4 x 512 KiB and 3 x 1 MiB 7-25 % more than 4 x 1 MiB.)
READ = 2 << 20
RING = 3
# With this many siphons already running, a new one gets RING_CROWDED buffers
# of READ_CROWDED: 16 misses at once then hold 48 MiB of buffers (the RSS goal).
CROWDED = 4
RING_CROWDED = 2
READ_CROWDED = 1 << 20
_running = 0  # siphons reading now, in this process (changed on the reactor only)
# Beyond this many, a new large body takes the reactor path: a thread and
# RING_CROWDED buffers per miss must not grow with a burst of misses (a cold
# CI fleet pulling hundreds of layers at once). 16 cost at most 48 MiB.
MAX_RUNNING = 16
# The receive buffer asked for a connection whose round trip is below
# LAN_RTT_US (see widen_receive_window): the kernel doubles it for its own
# bookkeeping, and upstream may then have ~4 MiB in flight, two reads' worth.
RCVBUF = 4 << 20
LAN_RTT_US = 1000
_TCPI_RTT = 68  # offset of tcpi_rtt (microseconds) in struct tcp_info
# How long one poll waits before the thread checks whether it must stop.
POLL_MS = 250


# Connections whose receive window a siphon widened (see ``kept_wide``).
_wide: "weakref.WeakSet[tcp.Connection]" = weakref.WeakSet()


def kept_wide(conn: Any) -> bool:
    """Whether a siphon widened ``conn``'s receive window. A window cannot be
    narrowed again (TCP never takes back what it offered), and a wide one on
    a connection that waits for its next response lets a nearby upstream
    send megabytes in one go at that response's start: on loopback measured
    ~1 ms later to the head (``bench/miss_ttfb.py``; docs/benchmarks.rst)."""
    return conn in _wide


def widen_receive_window(sock: socket.socket) -> bool:
    """A receive buffer of RCVBUF for a connection to a nearby upstream.

    Linux grows a socket's receive buffer by how much the reader takes per
    round trip, which at a loopback's or a LAN's round trip of microseconds
    never moves it off its 128 KiB start: the window then lets upstream send
    ~93 KiB at a time, and the siphon's 1 MiB reads come back with that
    (11 reads, writes and wake-ups per MiB). Setting the buffer turns that
    growth off for good, which a distant upstream needs (its window must cover
    its bandwidth times its round trip), so only below LAN_RTT_US, where
    RCVBUF covers any bandwidth this host could receive at."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        rtt_us = struct.unpack_from("I", info, _TCPI_RTT)[0]
        if 0 < rtt_us < LAN_RTT_US and sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < RCVBUF:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            return True
    except (OSError, AttributeError, struct.error):
        pass  # (no TCP_INFO here: the kernel's own sizing stays)
    return False


def siphonable(transport: Any, length: Any) -> tuple[tcp.Connection, _IdentityTransferDecoder] | None:
    """The connection and body decoder of a response body a Siphon can read
    (``transport`` is the body protocol's), or None: a body of unknown or small
    length, TLS, or a transport that is not Twisted's HTTP/1.1 client on TCP."""
    if not isinstance(length, int) or length < SIPHON_MIN or _running >= MAX_RUNNING:
        return None
    conn = getattr(transport, "_producer", None)
    if not isinstance(conn, tcp.Connection) or getattr(conn, "TLS", False) or conn.disconnecting:
        return None
    proto = getattr(conn, "protocol", None)
    proto = getattr(proto, "_wrappedProtocol", proto)  # (an endpoint's wrapper)
    parser = getattr(proto, "_parser", None) if isinstance(proto, HTTP11ClientProtocol) else None
    decoder = getattr(parser, "bodyDecoder", None)
    if not isinstance(decoder, _IdentityTransferDecoder) or not isinstance(decoder.contentLength, int):
        return None
    return conn, decoder


class Siphon:
    """Reads the rest of one response body (``decoder.contentLength`` bytes)
    into ``flight``. ``ended(outcome, detail)`` is called on the reactor once
    the thread is done: outcome ``"done"`` (every byte written; the parser has
    been told), ``"eof"`` (upstream closed early), ``"error"`` (a socket
    error), ``"stalled"`` (nothing for ``idle_timeout``), ``"write"`` (the
    spool could not be written) or ``"stopped"``."""

    def __init__(self, flight: "Flight", conn: tcp.Connection, decoder: _IdentityTransferDecoder,
                 idle_timeout: float, call: Callable[..., Any], ended: Callable[[str, str], None]) -> None:
        self.flight = flight
        self.conn = conn
        self.decoder = decoder
        self.remaining = int(decoder.contentLength)
        self.idle_timeout = idle_timeout
        self.call = call
        self.ended = ended
        self.stopped = False
        self.widened = False  # (set by the thread, read on the reactor once it ended)
        self.ring = RING
        self.read = READ
        self._sock: socket.socket | None = None
        self._closing = threading.Lock()  # (stop's shutdown never meets a reused descriptor number)

    def start(self, first: list[bytes]) -> None:
        """(On the reactor.) Take the connection over; ``first``: body bytes
        already received (written first)."""
        self.conn.stopReading()
        # A duplicate: the reactor may close its descriptor (stop, shutdown)
        # while the thread still reads; the socket then stays the same one.
        global _running
        sock = self._sock = socket.socket(fileno=os.dup(self.conn.fileno()))
        if _running >= CROWDED:
            self.ring, self.read = RING_CROWDED, READ_CROWDED
        _running += 1
        crew.streams.run(self._run, sock, first)

    def stop(self) -> None:
        """(On the reactor.) End the thread's reads now (cancelled)."""
        self.stopped = True
        with self._closing:
            sock, self._sock = self._sock, None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # (wakes its poll)
                except OSError:
                    pass

    def _run(self, sock: socket.socket, first: list[bytes]) -> None:
        outcome, detail = "stopped", ""
        try:
            outcome, detail = self._pump(sock, first)
        except BaseException as e:  # never leave the flight's write lane taken
            outcome, detail = "error", repr(e)
        finally:
            with self._closing:
                self._sock = None
                sock.close()
            self.flight.siphon_ended()
            self.call(self._finish, outcome, detail)

    def _pump(self, sock: socket.socket, first: list[bytes]) -> tuple[str, str]:
        flight, spool = self.flight, self.flight.spool
        for chunk in first:
            try:
                spool.write(chunk)
            except OSError as e:
                flight.siphon_failed(e)
                return "write", str(e)
            flight.siphon_wrote(len(chunk))
            flight.siphon_hash(chunk)
        self.widened = widen_receive_window(sock)
        size = min(self.read, self.remaining)
        ring = [bytearray(size) for _ in range(min(self.ring, 1 + (self.remaining - 1) // size))]
        ends = [0] * len(ring)  # the body offset each buffer's last handed-over bytes end at
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        left = self.remaining
        offset = flight.body_offset
        turn = 0
        # In the current buffer: bytes read into it, and how many of them went
        # to the hash lane. Reads fill a buffer before it is handed over, and
        # each read is written to the spool at once (readers wait for it).
        filled = handed = 0
        buf = memoryview(ring[0])
        last = time.monotonic()
        try:
            while left > 0:
                if self.stopped:
                    return "stopped", ""
                if filled == 0:
                    slot = turn % len(ring)
                    if turn >= len(ring) and not flight.siphon_wait(ends[slot]):
                        return ("write", "") if flight.write_error is not None else ("stopped", "")
                    buf = memoryview(ring[slot])
                try:
                    n = sock.recv_into(buf[filled:], min(len(buf) - filled, left))
                except BlockingIOError:
                    if handed < filled:  # (the hash lane works while upstream is silent)
                        flight.siphon_hash(buf[handed:filled])
                        handed = filled
                        ends[slot] = offset
                    flight.siphon_caught_up()
                    if not poller.poll(POLL_MS):
                        if time.monotonic() - last >= self.idle_timeout:
                            return "stalled", ""
                    continue
                except OSError as e:
                    return "error", f"{type(e).__name__}: {e}"
                if n == 0:
                    return ("stopped", "") if self.stopped else ("eof", "")
                last = time.monotonic()
                view = buf[filled:filled + n]
                try:
                    spool.write(view)  # type: ignore[arg-type]  # (a memoryview writes and hashes as bytes do)
                except OSError as e:
                    flight.siphon_failed(e)
                    return "write", str(e)
                offset += n
                left -= n
                filled += n
                flight.siphon_wrote(n)
                if filled == len(buf) or left == 0:
                    flight.siphon_hash(buf[handed:filled])
                    ends[slot] = offset
                    filled = handed = 0
                    turn += 1
        finally:
            if handed < filled:  # (bytes written before it ended are hashed all the same: flushed() waits for them)
                flight.siphon_hash(buf[handed:filled])
        return "done", ""

    def _finish(self, outcome: str, detail: str) -> None:
        """(On the reactor.) A complete body: the parser hears that it ended,
        and the connection goes back to the pool. Otherwise: ``ended`` says why."""
        global _running
        _running -= 1
        if outcome == "done" and not self.stopped:
            if self.widened:
                _wide.add(self.conn)
            self.decoder.contentLength = 0
            try:
                self.decoder.dataReceived(b"")  # (ends the body: the receiver's connectionLost)
                return
            except Exception:
                log.failure("ending a siphoned body")
                outcome, detail = "error", "the HTTP client rejected the body's end"
        self.ended(outcome, detail)
