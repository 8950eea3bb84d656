"""The holder's side of peer streaming (web/peer.py) over a real socket,
with worker processes: two Caches over one data directory stand for two
workers of the holding host (as in test_across.py). Worker a fetches the key;
the peer request reaches worker b, which holds no lease: it tails a's spool
file through the flight marker and streams it, head first, to the end of a's
commit; and when a's body breaks off, the peer's connection is aborted, never
ended cleanly. Requests without a valid token get a JSON 403."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from sparkcache.fetch.flight import BodyError
from sparkcache.fetch.peer import AUTH_HEADER, FLIGHT_PATH, HEADERS_HEADER, sign
from sparkcache.metrics import sample_values
from sparkcache.store.s3.lease import key_hash
from sparkcache.web.peer import PeerFlights
from tests.unit.test_across import REMOTE, _asked, _until, creq, pair, pumped  # noqa: F401  (pair: a fixture)
from tests.unit.test_produce import BODY, FakeResponse

KEY = b"s" * 32


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.ended.callback(None)


async def _holder(pair: Any) -> tuple[FakeResponse, Any, Agent, HTTPConnectionPool]:
    """Worker a fetches (half the body arrived); worker b answers peers."""
    pair.got = Deferred.fromCoroutine(pair.a.cache.get(creq(REMOTE)))
    await pumped(Deferred.fromCoroutine(_asked(pair.a.up)), pair.clock)
    response = FakeResponse(length=len(BODY), headers={b"content-type": [b"application/x-test"]})
    pair.a.up.requests[0].callback((response, "http://up.invalid/x"))
    await pumped(Deferred.fromCoroutine(_until(lambda: response.protocol is not None)), pair.clock)
    response.send(BODY[: len(BODY) // 2])
    ctx = SimpleNamespace(store=SimpleNamespace(leases=SimpleNamespace(peer_key=KEY, held={})), cache=pair.b.cache,
                          clock=reactor)
    port = reactor.listenTCP(0, Site(PeerFlights(ctx)), interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    return response, port, Agent(reactor, pool=pool), pool


async def _ask(agent: Agent, port: Any, pair: Any, key: bytes = KEY, query: str = "?key=" + quote("r:x")) -> Any:
    path = FLIGHT_PATH + key_hash("r:x")
    url = f"http://127.0.0.1:{port.getHost().port}{path}{query}".encode()
    headers = Headers({AUTH_HEADER: [sign(key, b"GET", path.encode(), reactor.seconds())]})
    return await pumped(agent.request(b"GET", url, headers), pair.clock)


async def _ended(pair: Any) -> None:
    """Worker a's production is over (committed or not) before the stores stop."""
    live = await pumped(pair.got, pair.clock)
    try:
        await pumped(live.flight.wait_done(), pair.clock)
    except BodyError:
        pass


def _served(pair: Any) -> tuple[dict[tuple[str, ...], float], float]:
    """Worker b's peer streams by outcome, and the bytes it streamed."""
    families = pair.b.cache.metrics.collect()
    streams = sample_values(families, "sparkcache_peer_streams_total", "direction", "outcome")
    return ({k[1]: v for k, v in streams.items() if k[0] == "served"},  # type: ignore[misc]
            sample_values(families, "sparkcache_peer_bytes_total", "direction").get(("served",), 0.0))


async def _head(agent: Agent, port: Any, pair: Any) -> tuple[Any, Collect]:
    """The peer's response, once its first half (all that a has) arrived."""
    # The marker is written once the body flows (in a thread); ask until b
    # finds it, for up to 30 s on a loaded machine.
    for _ in range(600):
        got = await _ask(agent, port, pair)
        if got.code == 200:
            break
        await readBody(got)
        await deferLater(reactor, 0.05, lambda: None)
    assert got.code == 200
    body = Collect()
    got.deliverBody(body)
    await pumped(Deferred.fromCoroutine(_until(lambda: len(body.data) >= len(BODY) // 2)), pair.clock)
    return got, body


@pytest_twisted.ensureDeferred
async def test_a_sibling_worker_streams_the_holders_spool_to_its_commit(pair: Any) -> None:
    response, port, agent, pool = await _holder(pair)
    try:
        got, body = await _head(agent, port, pair)
        assert got.length == len(BODY)
        assert json.loads(got.headers.getRawHeaders(HEADERS_HEADER)[0]) == {"content-type": "application/x-test"}
        assert not body.ended.called  # the head, while the rest is still upstream
        response.send(BODY[len(BODY) // 2:])
        response.end()
        await pumped(body.ended, pair.clock)
        assert body.reason is not None and body.reason.check(ResponseDone) and body.data == BODY
        # Not for the wrong key, nor without a good token.
        wrong = await _ask(agent, port, pair, query="?key=other")
        assert wrong.code == 404 and json.loads(await readBody(wrong))["status"] == 404
        bad = await _ask(agent, port, pair, key=b"x" * 32)
        assert bad.code == 403 and json.loads(await readBody(bad))["error"] == "bad peer token"
        streams, sent = _served(pair)
        # (fallback: the 404s while b looked for a's marker, and the wrong key's)
        assert streams.pop("complete") == 1 and streams.pop("refused") == 1 and streams.pop("fallback") >= 1
        assert not streams and sent == len(BODY)
        await _ended(pair)
    finally:
        await port.stopListening()
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_the_holders_body_breaking_off_aborts_the_peer(pair: Any) -> None:
    response, port, agent, pool = await _holder(pair)
    try:
        _, body = await _head(agent, port, pair)
        response.end(BodyError("upstream reset"))
        await pumped(body.ended, pair.clock)
        assert body.reason is not None and not body.reason.check(ResponseDone) and len(body.data) < len(BODY)
        streams, sent = _served(pair)
        assert streams.get("error") == 1 and "complete" not in streams and len(BODY) // 2 <= sent < len(BODY)
        await _ended(pair)
    finally:
        await port.stopListening()
        await pool.closeCachedConnections()
