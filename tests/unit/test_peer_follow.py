"""The waiting host's side of peer streaming (fetch/peer.py ``PeerFollow``)
against a holder played by a small twisted.web resource on a real socket:
the production's clients get a Live over a local spool as the bytes
arrive; the flight ends with the published entry only when its length and
sha256 are those of the bytes streamed (a different entry aborts the
flight); a stream broken off short of its length aborts the flight at once
and frees the key; the spool goes either way."""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from sparkcache.fetch.cache import Hit, Live, Target
from sparkcache.fetch.peer import AUTH_HEADER, HEADERS_HEADER, PeerFollow, refusal
from sparkcache.fetch.produce import Shared
from sparkcache.metrics import Metrics, sample_values
from sparkcache.store import Entry, Store
from sparkcache.store.s3.lease import LeaseInfo

BODY = os.urandom(300_000)
KEY = b"p" * 32


class Holder(Resource):
    """Sends ``BODY`` (all of it, or only ``cut`` bytes, then drops the connection)."""

    isLeaf = True

    def __init__(self, cut: int | None = None) -> None:
        super().__init__()
        self.cut = cut
        self.asked: list[str | None] = []

    def render_GET(self, request: Any) -> Any:
        self.asked.append(refusal(KEY, b"GET", request.path, request.getHeader(AUTH_HEADER), reactor.seconds()))
        request.setHeader(HEADERS_HEADER, json.dumps({"content-type": "application/x-test"}).encode())
        request.setHeader(b"Content-Length", str(len(BODY)).encode())
        if self.cut is None:
            return BODY
        request.write(BODY[: self.cut])
        # (Once the head surely went: the waiter must see a broken body, not a failed request.)
        reactor.callLater(0.5, request.channel.transport.abortConnection)
        return NOT_DONE_YET


@pytest.fixture
def waiter(tmp_path: Any) -> Any:
    store = Store(str(tmp_path / "data"), reactor, max_size=1 << 30)
    pytest_twisted.blockon(Deferred.fromCoroutine(store.start()))
    store.leases = SimpleNamespace(peer_key=KEY, peer_client=None, streamed=0)
    metrics = Metrics(reactor)
    cache = SimpleNamespace(store=store, clock=reactor, metrics=metrics)
    ports: list[Any] = []

    def follow(holder: Holder) -> tuple[PeerFollow, Shared[Any], list[bool], LeaseInfo]:
        port = reactor.listenTCP(0, Site(holder), interface="127.0.0.1")
        ports.append(port)
        shared: Shared[Any] = Shared()
        left: list[bool] = []
        f = PeerFollow(cache, Target("r:x", "r", "x"), shared, lambda: left.append(True), 10.0)  # type: ignore[arg-type]
        info = LeaseInfo("them", "h", reactor.seconds() + 30, None, f"http://127.0.0.1:{port.getHost().port}")
        return f, shared, left, info

    def counted() -> tuple[dict[tuple[str, ...], float], float]:
        families = metrics.collect()
        return (sample_values(families, "sparkcache_peer_streams_total", "direction", "outcome"),
                sample_values(families, "sparkcache_peer_bytes_total", "direction").get(("followed",), 0.0))

    yield SimpleNamespace(store=store, follow=follow, counted=counted)
    for port in ports:
        pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(Deferred.fromCoroutine(store.stop()))


def entry(digest: str, size: int = len(BODY)) -> Entry:
    return Entry("r:x", "r", "x", 200, digest, size, "application/x-test")


async def until(cond: Any) -> None:
    for _ in range(6000):  # at least 30 s: the peer's thread pools may wait long for a loaded CPU
        if cond():
            return
        await deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("never")


@pytest.mark.parametrize("published, ok", [(hashlib.sha256(BODY).hexdigest(), True), ("0" * 64, False)],
                         ids=["its-entry", "another-entry"])
@pytest_twisted.ensureDeferred
async def test_streamed_then_ended_by_the_published_entry_only_if_it_matches(waiter: Any, published: str,
                                                                              ok: bool) -> None:
    holder = Holder()
    f, shared, left, info = waiter.follow(holder)
    await f.start(info)
    assert holder.asked == [None] and shared.settled  # signed with the shared key
    live = await shared.wait()
    assert isinstance(live, Live) and live.flight.total == len(BODY)
    assert live.flight.headers == {"content-type": "application/x-test"}
    await until(lambda: live.flight.written == len(BODY))
    spool = f.spool.path
    got = await f.conclude(Hit(entry(published), "HIT"))
    await f.close()
    assert isinstance(got, Hit) and live.flight.finished and left == [True]
    if ok:
        assert live.flight.error is None and live.flight.entry.digest == published
    else:
        assert live.flight.error is not None and "differs from its published entry" in str(live.flight.error)
    assert not os.path.exists(spool)
    streams, received = waiter.counted()
    assert streams == {("followed", "complete" if ok else "error"): 1.0} and received == len(BODY)


@pytest_twisted.ensureDeferred
async def test_a_stream_broken_off_aborts_the_flight_at_once(waiter: Any) -> None:
    f, shared, left, info = waiter.follow(Holder(cut=100_000))
    await f.start(info)
    assert shared.settled
    live = await shared.wait()
    await until(lambda: live.flight.finished)
    assert live.flight.error is not None and "broke off" in str(live.flight.error)
    assert f.broken and left == [True] and live.flight.written < len(BODY)
    spool = f.spool.path
    await f.close()
    assert not os.path.exists(spool)
    streams, received = waiter.counted()
    assert streams == {("followed", "error"): 1.0} and received == live.flight.written


@pytest_twisted.ensureDeferred
async def test_no_flight_there_means_waiting_as_before(waiter: Any) -> None:
    class NoFlight(Holder):
        def render_GET(self, request: Any) -> Any:
            request.setResponseCode(404)
            return b'{"error": "no flight", "status": 404}'

    f, shared, left, info = waiter.follow(NoFlight())
    await f.start(info)
    assert not shared.settled and f.flight is None
    await f.close()
    assert waiter.counted() == ({("followed", "fallback"): 1.0}, 0.0)
