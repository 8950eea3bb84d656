"""A Siphon reads a large upstream body off its socket in a thread (fetch/siphon.py).

Against a real upstream on 127.0.0.1 (a few lines of Twisted that answer
every request on a connection with one scripted response), through
Twisted's Agent and ``receive`` exactly as a miss does: the whole body is
spooled and hashed, the connection goes back to the pool; a body cut short,
a stalled upstream and a cancelled fetch each end the transfer with the
flight's write lane given back (``flushed`` fires), nothing left reading.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from sparkcache.fetch.flight import BodyError, Flight, Lanes, receive
from sparkcache.fetch import siphon
from sparkcache.fetch.siphon import SIPHON_MIN
from sparkcache.store import SpoolFile

MiB = 1 << 20


class Script(Protocol):
    """Answers each request with the factory's body: whole, cut at ``cut``
    bytes (then closed), or held at ``cut`` bytes (a stall)."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.factory.open.append(self)
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            f = self.factory
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(f.body))
            if f.mode == "whole":
                self.transport.write(f.body)
            else:
                self.transport.write(f.body[:f.cut])
                if f.mode == "cut":
                    self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open.remove(self)
        for d in self.factory.lost:
            if not d.called:
                d.callback(None)


class Upstream(Factory):
    protocol = Script

    def __init__(self, body: bytes, mode: str = "whole", cut: int = 0) -> None:
        self.body, self.mode, self.cut = body, mode, cut
        self.connections = 0
        self.open: list[Script] = []
        self.lost: list[Deferred[None]] = []


@pytest.fixture
def served(request: Any) -> Any:
    made: list[Any] = []

    def serve(upstream: Upstream) -> tuple[Agent, HTTPConnectionPool, str]:
        port = reactor.listenTCP(0, upstream, interface="127.0.0.1")
        pool = HTTPConnectionPool(reactor, persistent=True)
        made.append((port, pool))
        return Agent(reactor, pool=pool), pool, f"http://127.0.0.1:{port.getHost().port}/body"

    yield serve
    for port, pool in made:
        pytest_twisted.blockon(pool.closeCachedConnections())
        pytest_twisted.blockon(port.stopListening())


def new_flight(tmp_path: Any, total: int) -> Flight:
    return Flight("k", SpoolFile(str(tmp_path)), total, {}, Lanes(reactor))


@pytest_twisted.ensureDeferred
async def test_a_large_body_is_siphoned_and_the_connection_reused(tmp_path: Any, served: Any) -> None:
    body = os.urandom(3 * MiB + 12345)
    up = Upstream(body)
    agent, _pool, url = served(up)
    for n in (1, 2):
        response = await agent.request(b"GET", url.encode())
        f = new_flight(tmp_path, len(body))
        await receive(response, f, reactor, 10.0)
        assert f._siphoned > len(body) - SIPHON_MIN  # (all but what came with the headers)
        assert f.written == len(body) and f.queued == 0
        assert f.spool.hexdigest() == hashlib.sha256(body).hexdigest()
        with open(f.spool.path, "rb") as spooled:
            assert spooled.read() == body
        f.release()
        f.spool.discard()
        assert up.connections == 1, f"request {n}: the siphoned connection was not reused"


@pytest.mark.parametrize("nearby", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_widened_connection_is_replaced_not_kept(tmp_path: Any, monkeypatch: Any, nearby: bool) -> None:
    """sparkcache's pool closes a connection whose window a siphon widened
    once its body ends, and opens another to the same origin in its place,
    which the next request takes; a connection left as it was is kept."""
    from sparkcache.fetch.upstream import _QuietPool

    monkeypatch.setattr(siphon, "LAN_RTT_US", 10 ** 9 if nearby else 0)
    body = os.urandom(2 * MiB)
    up = Upstream(body)
    port = reactor.listenTCP(0, up, interface="127.0.0.1")
    pool = _QuietPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool)
    url = f"http://127.0.0.1:{port.getHost().port}/body".encode()
    try:
        for n in (1, 2):
            response = await agent.request(b"GET", url)
            f = new_flight(tmp_path, len(body))
            first = response._transport._producer  # (the connection the body comes on)
            lost: Deferred[None] = Deferred()
            up.lost.append(lost)
            await receive(response, f, reactor, 10.0)
            assert f._siphoned > 0 and f.spool.hexdigest() == hashlib.sha256(body).hexdigest()
            f.release()
            f.spool.discard()
            assert siphon.kept_wide(first) is nearby
            if nearby:
                await lost.addTimeout(5, reactor)  # closed by the pool, not by upstream
                assert not first.connected
                while up.connections < n + 1:  # its replacement, opened ahead
                    await deferLater(reactor, 0.01)
                assert len(up.open) == 1
            else:
                assert first.connected and up.connections == 1 and len(up.open) == 1
        # The second request took the replacement: no third connection was made for it.
        assert up.connections == (3 if nearby else 1)
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()


async def _spooled_on_the_reactor(tmp_path: Any, served: Any, body: bytes) -> None:
    agent, _pool, url = served(Upstream(body))
    response = await agent.request(b"GET", url.encode())
    f = new_flight(tmp_path, len(body))
    await receive(response, f, reactor, 10.0)
    assert f._siphoned == 0 and f.written == len(body)
    assert f.spool.hexdigest() == hashlib.sha256(body).hexdigest()
    f.release()
    f.spool.discard()


@pytest_twisted.ensureDeferred
async def test_a_small_body_stays_on_the_reactor(tmp_path: Any, served: Any) -> None:
    await _spooled_on_the_reactor(tmp_path, served, os.urandom(SIPHON_MIN // 4))


@pytest_twisted.ensureDeferred
async def test_past_the_cap_a_large_body_takes_the_reactor_path(tmp_path: Any, served: Any,
                                                                monkeypatch: Any) -> None:
    # As if MAX_RUNNING siphons were reading: a burst of misses gets no more threads.
    monkeypatch.setattr(siphon, "_running", siphon.MAX_RUNNING)
    await _spooled_on_the_reactor(tmp_path, served, os.urandom(2 * SIPHON_MIN))


@pytest.mark.parametrize("mode", ["cut", "stall"])
@pytest_twisted.ensureDeferred
async def test_a_body_cut_short_or_stalled_fails(tmp_path: Any, served: Any, mode: str) -> None:
    body = os.urandom(4 * MiB)
    up = Upstream(body, mode, cut=2 * MiB + 7)
    agent, _pool, url = served(up)
    response = await agent.request(b"GET", url.encode())
    f = new_flight(tmp_path, len(body))
    with pytest.raises(BodyError) as caught:
        await receive(response, f, reactor, 0.5)
    assert ("ended early" if mode == "cut" else "stalled") in str(caught.value)
    await f.flushed()  # the siphon gave the write lane back
    assert f.written == 2 * MiB + 7
    if up.open:  # (the stalled upstream hears that we hung up)
        gone: Deferred[None] = Deferred()
        up.lost.append(gone)
        await gone
    f.release()
    f.spool.discard()


@pytest_twisted.ensureDeferred
async def test_cancelling_stops_the_siphon(tmp_path: Any, served: Any) -> None:
    body = os.urandom(4 * MiB)
    up = Upstream(body, "stall", cut=2 * MiB)
    agent, _pool, url = served(up)
    response = await agent.request(b"GET", url.encode())
    f = new_flight(tmp_path, len(body))
    receiving = receive(response, f, reactor, 30.0)
    while f.written < 2 * MiB:  # (all that upstream sends is in)
        wait: Deferred[None] = Deferred()
        f.listen(lambda: wait.called or wait.callback(None))
        await wait
    gone: Deferred[None] = Deferred()
    up.lost.append(gone)
    receiving.cancel()
    with pytest.raises(CancelledError):
        await receiving
    await f.flushed()  # the thread ended: no one writes the spool any more
    await gone  # and the upstream connection is closed
    f.release()
    f.spool.discard()


@pytest_twisted.ensureDeferred
async def test_the_siphon_wakes_thread_readers_itself_and_hashes_every_byte_once(
        tmp_path: Any, served: Any) -> None:
    # A sendfile tail listens from its own thread: the siphon wakes it as bytes
    # land (landed() ahead of the reactor's ``written``), not through the reactor.
    body = os.urandom(3 * MiB + 4321)
    agent, _pool, url = served(Upstream(body))
    response = await agent.request(b"GET", url.encode())
    f = new_flight(tmp_path, len(body))
    woken: list[tuple[int, int]] = []
    f.listen(lambda: woken.append((threading.get_ident(), f.landed())), from_threads=True)
    handed: list[int] = []
    hand = f.siphon_hash
    f.siphon_hash = lambda chunk: (handed.append(len(chunk)), hand(chunk))[1]  # type: ignore[method-assign]
    await receive(response, f, reactor, 10.0)
    reactor_thread = threading.get_ident()
    assert any(t != reactor_thread and n > 0 for t, n in woken)
    assert f.landed() == f.written == len(body)
    # Every siphoned byte went to the hash lane once, in hand-overs of at most
    # one ring buffer (and the body hashes right).
    assert sum(handed) == len(body) and max(handed) <= siphon.READ
    assert f.spool.hexdigest() == hashlib.sha256(body).hexdigest()
    f.release()
    f.spool.discard()


def test_only_a_nearby_upstream_gets_a_wider_receive_window(monkeypatch: Any) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    try:
        for threshold, widened in ((10 ** 9, True), (0, False)):
            monkeypatch.setattr(siphon, "LAN_RTT_US", threshold)
            sock = socket.create_connection(server.getsockname())
            peer, _ = server.accept()
            try:
                before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                if before >= siphon.RCVBUF:
                    pytest.skip("this kernel's default receive buffer is as large already")
                siphon.widen_receive_window(sock)
                after = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                assert (after >= siphon.RCVBUF) is widened and (after == before) is not widened
            finally:
                peer.close()
                sock.close()
    finally:
        server.close()


@pytest_twisted.ensureDeferred
async def test_a_body_to_verify_is_siphoned_and_hashed_as_written(tmp_path: Any, served: Any) -> None:
    # (hold_last: no hash lane; each read is hashed as it is written, and a
    # ring buffer is reused at once.)
    body = os.urandom(9 * MiB + 99)
    agent, _pool, url = served(Upstream(body))
    response = await agent.request(b"GET", url.encode())
    f = new_flight(tmp_path, len(body))
    f.hold_last = True
    await receive(response, f, reactor, 10.0)
    assert f._siphoned > len(body) - SIPHON_MIN and f._split is False
    assert f.written == len(body) and f.queued == 0
    assert f.spool.hexdigest() == hashlib.sha256(body).hexdigest()
    f.release()
    f.spool.discard()


@pytest_twisted.ensureDeferred
async def test_a_spool_write_error_ends_a_siphoned_fetch(tmp_path: Any, served: Any) -> None:
    body = os.urandom(6 * MiB)
    up = Upstream(body)
    agent, _pool, url = served(up)
    response = await agent.request(b"GET", url.encode())
    f = new_flight(tmp_path, len(body))
    write = f.spool.write

    def disk_full_after_2_mib(data: Any) -> None:
        if f.spool.size >= 2 * MiB:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(data)

    f.spool.write = disk_full_after_2_mib  # type: ignore[method-assign]
    with pytest.raises(BodyError) as caught:
        await receive(response, f, reactor, 10.0)
    assert "spool write failed" in str(caught.value)
    with pytest.raises(BodyError):
        await f.flushed()  # (fails once no thread writes the spool any more)
    assert f.write_error is not None and f.written <= f.spool.size < len(body)
    f.release()
    f.spool.discard()
