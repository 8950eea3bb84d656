"""The produce-once engine (fetch/cache.py, fetch/sources.py, fetch/produce.py).

A real store in a tmp dir (its I/O pool writes the spools), everything else in
memory: the upstream is a fake client whose responses the test feeds byte by
byte, a child process is a fake push producer, clients tailing a production
are fake requests that record what they received and how their connection
ended. Timers run on a task.Clock.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from sparkcache.config import CachePolicy, RemoteConfig
from sparkcache.fetch import Cache, CacheRequest, Failed, Hit, Live, Target
from sparkcache.fetch.flight import BodyError, Flight
from sparkcache.fetch.produce import Singleflight, shield
from sparkcache.fetch.sources import BodyTooLarge, Subprocess, ThreadBuild, Upload
from sparkcache.metrics import Metrics
from sparkcache.store import SpoolFile, Store
from sparkcache.web.serve import send_flight
from tests.support.waiting import eventually

BODY = bytes(range(256)) * 800  # 200 KiB, several spool writes


# -- fakes ----------------------------------------------------------------------------------------


class FakeResponse:
    """An upstream response whose body the test sends; its transport is the push
    producer the engine pauses and stops."""

    def __init__(self, code: int = 200, headers: dict[bytes, list[bytes]] | None = None,
                 length: int | None = None) -> None:
        self.code = code
        self.headers = Headers(headers or {})
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ResponseDone()))


class FakeUpstream:
    """UpstreamClient's request(), answered by the test."""

    def __init__(self) -> None:
        self.requests: list[Deferred[Any]] = []

    def request(self, remote: Any, method: bytes, url: str, headers: Any = None, report: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.requests.append(d)
        return d

    def open_ahead(self, remote: Any, url: str) -> None:
        self.opened_ahead = getattr(self, "opened_ahead", 0) + 1

    async def asked(self, n: int) -> None:
        """Wait for the n-th request (a miss looks the key up in the SQLite thread first)."""
        await eventually(lambda: len(self.requests) >= n)

    def answer(self, response: FakeResponse, i: int = -1) -> None:
        self.requests[i].callback((response, "http://up.invalid/x"))


class FakeChild:
    """A child process: a push producer writing its stdout into the consumer it is given."""

    def __init__(self) -> None:
        self.consumer: Any = None
        self.exited: Deferred[int] = Deferred()
        self.state = "producing"
        self.spawned = 0

    def spawn(self, consumer: Any) -> Deferred[int]:
        self.spawned += 1
        self.consumer = consumer
        consumer.registerProducer(self, True)
        return self.exited

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"

    async def started(self) -> None:
        await eventually(lambda: self.consumer is not None)

    def out(self, data: bytes) -> None:
        self.consumer.write(data)

    def exit(self, code: int) -> None:
        self.consumer.unregisterProducer()
        self.exited.callback(code)


class Reader:
    """A client tailing a flight (what twisted.web's Request offers a producer)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.code = 200
        self.finished = self.aborted = self.startedWriting = self._disconnected = False
        self.producer: Any = None
        self.responseHeaders = Headers()
        self.channel = SimpleNamespace(transport=SimpleNamespace(abortConnection=self._abort))
        self._gone: Deferred[None] = Deferred()

    def notifyFinish(self) -> Deferred[None]:
        return self._gone

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.startedWriting = True
        self.data += data

    def finish(self) -> None:
        self.finished = True

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def _abort(self) -> None:
        self.aborted = True

    def leave(self) -> None:
        """The client disconnects."""
        self._disconnected = True
        self._gone.errback(Failure(ConnectionLost()))

    def tail(self, flight: Flight) -> Deferred[None]:
        return send_flight(self, flight, 0, None, lambda n: None)

    def served_whole(self, body: bytes) -> bool:
        return self.finished and not self.aborted and self.code == 200 and bytes(self.data) == body

    def cut_off(self) -> bool:
        """Never given a clean end: its connection was aborted mid-body, or it was told 502."""
        if self.aborted:
            return not self.finished
        return self.code == 502 and b"broke off" in self.data


# -- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Any) -> Any:
    store = Store(str(tmp_path / "data"), reactor, max_size=1 << 30)
    pytest_twisted.blockon(Deferred.fromCoroutine(store.start()))
    clock = task.Clock()
    clock.advance(1000)
    up = FakeUpstream()
    cache = Cache(store, up, clock, Metrics())  # type: ignore[arg-type]
    remote = RemoteConfig("r", "generic", "http://up.invalid", cache=CachePolicy(0, 60, 30), read_timeout=5)
    yield SimpleNamespace(store=store, cache=cache, clock=clock, up=up, remote=remote)
    pytest_twisted.blockon(Deferred.fromCoroutine(store.stop()))


def creq(env: Any, path: str = "x", **kw: Any) -> CacheRequest:
    return CacheRequest(remote=env.remote, key=f"r:{path}", path=path, url=f"http://up.invalid/{path}", ttl=None, **kw)


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


async def settled(env: Any) -> None:
    """Every production over, clean-up included."""
    for d in env.cache.running():
        await d
    assert env.cache.inflight == 0


def spools(env: Any) -> list[str]:
    return os.listdir(env.store.spool_dir)


async def fetch(env: Any, req: CacheRequest, response: FakeResponse, n: int = 1) -> Live:
    """Start a production from the fake upstream (its n-th request), answered with ``response``."""
    pending = Deferred.fromCoroutine(env.cache.get(req))
    await env.up.asked(n)
    env.up.answer(response)
    live = await pending
    assert isinstance(live, Live)
    # Live comes as soon as there is a flight, just before the body is asked for.
    await eventually(lambda: response.protocol is not None)
    return live


async def committed(env: Any, key: str) -> Any:
    entry = await env.store.index.get(key)
    return entry if entry is not None and entry.status == 200 else None


async def not_kept(env: Any, flight: Flight, key: str, why: str, *readers: tuple[Reader, Deferred[None]]) -> None:
    """The production failed (``why`` matches its error), left nothing behind in the
    store or the spool, and the clients tailing it never saw a clean end."""
    with pytest.raises(BodyError, match=why):
        await flight.wait_done()
    for reader, tail in readers:
        await tail
        assert reader.cut_off()
    await settled(env)
    assert await committed(env, key) is None and spools(env) == []


# -- one production, many callers ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_share_one_production(env: Any) -> None:
    gets = [Deferred.fromCoroutine(env.cache.get(creq(env))) for _ in range(5)]
    await env.up.asked(1)
    assert env.cache.fetching("r:x")
    response = FakeResponse(length=len(BODY))
    env.up.answer(response)
    results = [await g for g in gets]
    assert all(isinstance(r, Live) for r in results)
    assert len({id(r.flight) for r in results}) == 1
    assert sorted(r.started for r in results) == [False, False, False, False, True]
    await eventually(lambda: response.protocol is not None)
    readers = [Reader() for _ in results]
    tails = [r.tail(results[0].flight) for r in readers]
    response.send(BODY[:100_000])
    response.send(BODY[100_000:])
    response.end()
    entry = (await results[0].flight.wait_done()).entry
    for t in tails:
        await t
    assert all(r.served_whole(BODY) for r in readers)
    assert entry.digest == sha(BODY) and entry.size == len(BODY)
    assert await env.store.read(entry, len(BODY)) == BODY
    await settled(env)
    assert len(env.up.requests) == 1 and spools(env) == []


@pytest_twisted.ensureDeferred
async def test_a_cancelled_waiter_cancels_nothing_shared(env: Any) -> None:
    first = Deferred.fromCoroutine(env.cache.get(creq(env)))
    await env.up.asked(1)  # the first caller started the production
    second = Deferred.fromCoroutine(env.cache.get(creq(env)))
    first.cancel()  # what Klein does when that client disconnects
    with pytest.raises(CancelledError):
        await first
    assert not env.up.requests[0].called, "the upstream request itself was cancelled"
    response = FakeResponse()
    env.up.answer(response)
    live = await second
    assert isinstance(live, Live)
    await eventually(lambda: response.protocol is not None)
    reader, leaver = Reader(), Reader()
    done, gone = reader.tail(live.flight), leaver.tail(live.flight)
    response.send(BODY[:1000])
    await eventually(lambda: len(leaver.data) == 1000)
    leaver.leave()  # a tailing client goes away mid-body
    await gone
    response.send(BODY[1000:])
    response.end()
    assert response.transport.producerState == "producing", "a departing client stopped the upstream"
    entry = (await live.flight.wait_done()).entry
    await done
    assert reader.served_whole(BODY) and entry.size == len(BODY)
    assert await committed(env, "r:x") is not None


@pytest_twisted.ensureDeferred
async def test_a_late_joiner_is_served_the_committed_entry(env: Any) -> None:
    response = FakeResponse()
    flight = (await fetch(env, creq(env), response)).flight
    response.send(b"hello")
    response.end()
    await flight.wait_done()
    late = await env.cache.get(creq(env))
    assert isinstance(late, Hit) and late.state == "HIT" and late.entry.digest == sha(b"hello")
    assert len(env.up.requests) == 1


@pytest_twisted.ensureDeferred
async def test_a_truncated_body_is_never_committed_and_its_readers_are_aborted(env: Any) -> None:
    response = FakeResponse(length=len(BODY))
    flight = (await fetch(env, creq(env), response)).flight
    reader = Reader()
    tail = reader.tail(flight)
    response.send(BODY[:5000])
    await eventually(lambda: len(reader.data) == 5000)
    response.end(ConnectionLost())
    await not_kept(env, flight, "r:x", "ended early", (reader, tail))
    # Nothing of it lingers: the next request produces afresh.
    response = FakeResponse()
    again = await fetch(env, creq(env), response, n=2)
    response.send(b"whole")
    response.end()
    assert (await again.flight.wait_done()).entry.size == 5


@pytest_twisted.ensureDeferred
async def test_a_short_body_is_not_committed_even_if_it_ends_cleanly(env: Any) -> None:
    response = FakeResponse(length=10)
    flight = (await fetch(env, creq(env), response)).flight
    response.send(b"12345")
    response.end()  # a clean end, 5 bytes short of Content-Length
    await not_kept(env, flight, "r:x", "5 of 10 bytes")


@pytest_twisted.ensureDeferred
async def test_a_digest_mismatch_is_never_committed(env: Any) -> None:
    response = FakeResponse(length=len(BODY))
    flight = (await fetch(env, creq(env, expected_digest="0" * 64), response)).flight
    reader = Reader()
    tail = reader.tail(flight)
    response.send(BODY)
    await eventually(lambda: len(reader.data) == len(BODY) - 1)  # all but the held last byte
    response.end()
    # (A client trusting Content-Length must not see a clean end of a bad body.)
    await not_kept(env, flight, "r:x", "digest mismatch", (reader, tail))


@pytest_twisted.ensureDeferred
async def test_a_body_its_validator_refuses_is_never_committed(env: Any) -> None:
    seen: list[bytes] = []

    def validate(f: Any) -> None:
        seen.append(f.read())
        if seen[-1] != b"good":
            raise BodyError("not a valid body")

    response = FakeResponse(length=len(BODY))
    flight = (await fetch(env, creq(env, validate=validate), response)).flight
    reader = Reader()
    tail = reader.tail(flight)
    response.send(BODY)
    await eventually(lambda: len(reader.data) == len(BODY) - 1)  # the last byte waits for the validator
    response.end()
    await not_kept(env, flight, "r:x", "not a valid body", (reader, tail))
    assert seen == [BODY]  # it saw the whole body, from the spool
    response = FakeResponse()
    flight = (await fetch(env, creq(env, validate=validate), response, n=2)).flight
    response.send(b"good")
    response.end()
    assert (await flight.wait_done()).entry.size == 4 and seen[-1] == b"good"


@pytest_twisted.ensureDeferred
async def test_a_full_disk_ends_the_production_cleanly(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: SpoolFile, chunks: list[bytes]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SpoolFile, "write_all", full)
    response = FakeResponse()
    flight = (await fetch(env, creq(env), response)).flight
    reader = Reader()
    tail = reader.tail(flight)
    response.send(b"a" * 1000)
    with pytest.raises(BodyError):
        await flight.flushed()
    response.send(b"b" * 1000)  # the next chunk finds the spool broken: the upstream is stopped
    assert response.transport.producerState == "stopped"
    response.end(ConnectionLost())  # what a stopped transport reports
    await not_kept(env, flight, "r:x", "spool write failed", (reader, tail))


@pytest_twisted.ensureDeferred
async def test_a_full_disk_stops_an_upstream_paused_for_it(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()

    def slow_then_full(self: SpoolFile, chunks: list[bytes]) -> int:
        assert gate.wait(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SpoolFile, "write_all", slow_then_full)
    response = FakeResponse()
    flight = (await fetch(env, creq(env), response)).flight
    for _ in range(12):
        response.send(b"z" * (256 << 10))  # 3 MiB waiting for the disk: past the high-water mark
    assert response.transport.producerState == "paused"
    gate.set()  # the disk answers: full. No more bytes will come to find that out.
    await eventually(lambda: response.transport.producerState == "stopped")
    response.end(ConnectionLost())
    await not_kept(env, flight, "r:x", "spool write failed")


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_goes_silent_is_stopped(env: Any) -> None:
    response = FakeResponse()
    flight = (await fetch(env, creq(env), response)).flight
    response.send(b"x" * 100)
    env.clock.advance(4)
    response.send(b"x" * 100)
    env.clock.advance(4)
    assert response.transport.producerState == "producing"
    env.clock.advance(2)  # 5 s (read_timeout) without a byte
    assert response.transport.producerState == "stopped"
    response.end(ConnectionLost())
    await not_kept(env, flight, "r:x", "stalled for 5s after 200 bytes")


# -- every source, the same commit path ------------------------------------------------------------------


class Kind:
    """Produces ``body`` through one kind of source; ``drive()`` feeds it once started."""

    def __init__(self, env: Any, name: str, body: bytes, gate: threading.Event) -> None:
        self.env, self.name, self.body, self.gate = env, name, body, gate
        self.child = FakeChild()

    def request(self, expected: str | None) -> tuple[Any, Any]:
        env, body, gate = self.env, self.body, self.gate
        target = Target(f"{self.name}:k", "@test", "k", None, expected)
        if self.name == "upstream":
            return creq(self.env, "k", expected_digest=expected), None
        if self.name == "subprocess":
            return target, Subprocess(self.child.spawn, {"content-type": "x/y"}, what="child", idle_timeout=60)
        if self.name == "thread":
            def build(out: Any) -> None:
                out.write(body[:1000])
                assert gate.wait(10)
                out.write(body[1000:])
            return target, ThreadBuild(build, {"content-type": "x/y"})

        class Gated(io.BytesIO):
            def read(self, n: int | None = -1) -> bytes:
                assert gate.wait(10)
                return super().read(n)

        return target, Upload(Gated(body), limit=len(body))

    async def drive(self) -> None:
        """Once asked: the upstream answers (the other sources start on their own)."""
        if self.name == "upstream":
            self.response = FakeResponse(length=len(self.body))
            await self.env.up.asked(1)
            self.env.up.answer(self.response)

    async def feed(self) -> None:
        """The body, whole."""
        if self.name == "upstream":
            await eventually(lambda: self.response.protocol is not None)
            self.response.send(self.body)
            self.response.end()
        elif self.name == "subprocess":
            await self.child.started()
            self.child.out(self.body)
            self.child.exit(0)
        else:
            self.gate.set()

    def key(self) -> str:
        return "r:k" if self.name == "upstream" else f"{self.name}:k"


KINDS = ["upstream", "subprocess", "thread", "upload"]


@pytest.mark.parametrize("name", KINDS)
@pytest_twisted.ensureDeferred
async def test_each_source_commits_through_the_same_path(env: Any, name: str) -> None:
    kind = Kind(env, name, BODY, threading.Event())
    req, source = kind.request(sha(BODY))
    pending = Deferred.fromCoroutine(env.cache.get(req, source))
    await kind.drive()
    live = await pending
    assert isinstance(live, Live) and live.started
    joined = await env.cache.get(req, source)
    assert isinstance(joined, Live) and joined.flight is live.flight and not joined.started
    reader = Reader()
    tail = reader.tail(live.flight)
    await kind.feed()
    entry = (await live.flight.wait_done()).entry
    await tail
    assert reader.served_whole(BODY)
    assert entry.key == kind.key() and entry.digest == sha(BODY) and entry.size == len(BODY)
    assert (await committed(env, kind.key())).digest == entry.digest
    assert await env.store.read(entry, len(BODY)) == BODY
    await settled(env)
    assert spools(env) == []
    hit = await env.cache.get(req, source)
    assert isinstance(hit, Hit) and hit.entry.digest == entry.digest


@pytest.mark.parametrize("name", KINDS)
@pytest_twisted.ensureDeferred
async def test_each_source_is_checked_against_its_digest(env: Any, name: str) -> None:
    kind = Kind(env, name, BODY, threading.Event())
    req, source = kind.request("0" * 64)
    pending = Deferred.fromCoroutine(env.cache.get(req, source))
    await kind.drive()
    live = await pending
    reader = Reader()
    tail = reader.tail(live.flight)
    await kind.feed()
    await not_kept(env, live.flight, kind.key(), "digest mismatch", (reader, tail))


# -- what each local source checks ---------------------------------------------------------------------


def child_source(child: FakeChild, ends_with: bytes = b"") -> Subprocess:
    return Subprocess(child.spawn, {}, what="child", idle_timeout=10, ends_with=ends_with)


@pytest.mark.parametrize("code, output, why", [
    (1, b"0008NAK\n0000", "exited with status 1"),
    (0, b"0008NAK\n", "did not end with b'0000'"),
])
@pytest_twisted.ensureDeferred
async def test_a_child_that_fails_or_stops_short_is_not_kept(env: Any, code: int, output: bytes, why: str) -> None:
    child = FakeChild()
    live = await env.cache.get(Target("c:k", "@test", "k"), child_source(child, b"0000"))
    await child.started()
    child.out(output)
    child.exit(code)
    await not_kept(env, live.flight, "c:k", why)


@pytest_twisted.ensureDeferred
async def test_a_silent_child_is_stopped(env: Any) -> None:
    child = FakeChild()
    live = await env.cache.get(Target("c:k", "@test", "k"), child_source(child))
    await child.started()
    child.out(b"some")
    env.clock.advance(9)
    assert child.state == "producing"
    env.clock.advance(1)
    assert child.state == "stopped"
    child.exit(-9)
    await not_kept(env, live.flight, "c:k", "child produced nothing for 10s")


@pytest_twisted.ensureDeferred
async def test_stopping_kills_a_child_and_waits_for_a_thread(env: Any) -> None:
    child = FakeChild()
    live_child = await env.cache.get(Target("c:k", "@test", "k"), child_source(child))
    await child.started()
    gate, wrote = threading.Event(), threading.Event()

    def build(out: Any) -> None:
        out.write(b"first")
        wrote.set()
        assert gate.wait(10)
        out.write(b"second")  # raises: the production was stopped

    live_thread = await env.cache.get(Target("t:k", "@test", "k"), ThreadBuild(build, {}))
    await eventually(wrote.is_set)
    await env.cache.stop()
    assert child.state == "stopped"
    with pytest.raises(BodyError):
        await live_child.flight.wait_done()
    # The thread still runs: its spool must not be closed or removed under it.
    assert not live_thread.flight.finished and len(spools(env)) == 1
    gate.set()
    with pytest.raises(BodyError):
        await live_thread.flight.wait_done()
    await settled(env)
    assert spools(env) == []
    assert await committed(env, "c:k") is None and await committed(env, "t:k") is None


@pytest_twisted.ensureDeferred
async def test_a_thread_build_that_fails_or_fills_the_disk_is_not_kept(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(out: Any) -> None:
        out.write(b"partial")
        raise RuntimeError("disk on fire")

    live = await env.cache.get(Target("t:a", "@test", "a"), ThreadBuild(broken, {}))
    with pytest.raises(BodyError, match="disk on fire"):
        await live.flight.wait_done()

    def full(self: SpoolFile, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SpoolFile, "write", full)
    live = await env.cache.get(Target("t:b", "@test", "b"), ThreadBuild(lambda out: out.write(b"x"), {}))
    with pytest.raises(BodyError, match="No space left"):
        await live.flight.wait_done()
    await settled(env)
    assert spools(env) == []
    assert await committed(env, "t:a") is None and await committed(env, "t:b") is None


@pytest_twisted.ensureDeferred
async def test_an_upload_past_its_limit_is_refused(env: Any) -> None:
    live = await env.cache.get(Target("u:k", "@test", "k"), Upload(io.BytesIO(b"x" * 101), limit=100))
    with pytest.raises(BodyTooLarge):
        await live.flight.wait_done()
    await not_kept(env, live.flight, "u:k", "larger than 100 bytes")


@pytest_twisted.ensureDeferred
async def test_a_source_that_breaks_before_any_byte_frees_its_key(env: Any) -> None:
    class Broken(ThreadBuild):
        async def open(self, cache: Any, target: Any, stale: Any) -> Any:
            raise RuntimeError("bug")

    result = await env.cache.get(Target("b:k", "@test", "k"), Broken(lambda out: None, {}))
    assert isinstance(result, Failed) and result.status == 502
    assert not env.cache.fetching("b:k")
    ok = await env.cache.get(Target("b:k", "@test", "k"), ThreadBuild(lambda out: out.write(b"fine"), {}))
    assert (await ok.flight.wait_done()).entry.size == 4


# -- the singleflight helper -----------------------------------------------------------------------------


def test_singleflight_runs_once_and_gives_each_caller_its_own_deferred() -> None:
    flights: Singleflight[str, int] = Singleflight()
    work: Deferred[int] = Deferred()
    calls: list[int] = []

    def start() -> Deferred[int]:
        calls.append(1)
        return work

    a, b, c = (flights.run("k", start) for _ in range(3))
    assert calls == [1] and "k" in flights and len(flights) == 1
    b.cancel()
    assert not work.called, "a cancelled caller cancelled the shared work"
    b.addErrback(lambda f: f.trap(CancelledError))
    ends = flights.ends()
    work.callback(7)
    got: list[Any] = []
    waits: list[Deferred[Any]] = [a, c, *ends]
    for d in waits:
        d.addCallback(got.append)
    assert got == [7, 7, None] and "k" not in flights
    late = flights.run("k", lambda: succeed(8))
    late.addCallback(got.append)
    assert got[-1] == 8 and "k" not in flights


def test_singleflight_failures_reach_every_caller_and_free_the_key() -> None:
    flights: Singleflight[str, int] = Singleflight()

    def broken() -> Deferred[int]:
        raise ValueError("synchronously")

    errors: list[Any] = []
    for _ in range(2):
        flights.run("k", broken).addErrback(lambda f: errors.append(f.type))
    assert errors == [ValueError, ValueError] and "k" not in flights


def test_singleflight_work_may_settle_before_it_ends() -> None:
    flights: Singleflight[str, str] = Singleflight()
    finish: Deferred[None] = Deferred()

    async def work(shared: Any) -> str:
        shared.settle("early")
        await finish
        flights.leave("k", shared)  # before announcing the end elsewhere
        return "ignored"

    shared = flights.start("k", work)
    got: list[str] = []
    shared.wait().addCallback(got.append)
    assert got == ["early"] and "k" in flights, "settled, but still running: joiners still join"
    finish.callback(None)
    assert "k" not in flights and got == ["early"]


def test_shield_keeps_the_work_running() -> None:
    work: Deferred[int] = Deferred()
    mine = shield(work)
    mine.cancel()
    mine.addErrback(lambda f: f.trap(CancelledError))
    assert not work.called
    work.callback(1)
