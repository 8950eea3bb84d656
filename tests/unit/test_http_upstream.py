"""UpstreamClient over in-memory agents: credentials stay with their origin across
redirects, unsupported or endless redirects fail, and the read timeout runs on the
clock it is given. Production builds it without an agent (one pooled Agent per
connect timeout); tests hand it one, as here."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from treq.testing import RequestTraversalAgent
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from sparkcache.config import Credentials, RemoteConfig
from sparkcache.fetch.upstream import UpstreamClient, UpstreamError
from tests.support.memory import REQUEST_DEADLINE, read_body
from tests.support.memory_upstream import MemoryUpstream

REMOTE = RemoteConfig("files", "generic", "http://upstream.test", credentials=Credentials("bot", "pw", None),
                      read_timeout=10)
BASIC = "Basic Ym90OnB3"  # bot:pw


@pytest.fixture
def up() -> MemoryUpstream:
    return MemoryUpstream()


def client(up: MemoryUpstream, clock: Clock | None = None) -> UpstreamClient:
    return UpstreamClient(clock or Clock(), agent=up.agent)


def get(c: UpstreamClient, url: str, headers: dict[bytes, bytes] | None = None) -> Deferred[tuple[Any, str]]:
    """The request, started at once; with a test clock no timeout fires, so a deadline
    on the real reactor makes a broken case fail instead of hang."""
    return Deferred.fromCoroutine(c.request(REMOTE, b"GET", url, headers)).addTimeout(REQUEST_DEADLINE, reactor)


@pytest_twisted.ensureDeferred
async def test_credentials_stay_with_the_configured_upstream(up: MemoryUpstream) -> None:
    up.add("/signed", b"object")
    up.behave("/dl", redirect="http://objects.test/signed?X-Signature=abc")
    response, final = await get(client(up), "http://upstream.test/dl")
    assert response.code == 200 and await read_body(response) == b"object"
    assert final == "http://objects.test/signed?X-Signature=abc"
    first, second = up.requests
    assert first.header("Authorization") == BASIC and first.header("Host") == "upstream.test"
    assert second.header("Authorization") is None and second.header("Host") == "objects.test"


@pytest_twisted.ensureDeferred
async def test_a_callers_authorization_replaces_the_credentials_on_the_first_origin_only(up: MemoryUpstream) -> None:
    up.add("/blob", b"b")
    up.behave("/v2/x/blobs/d", redirect="http://objects.test/blob")
    await get(client(up), "http://upstream.test/v2/x/blobs/d", {b"Authorization": b"Bearer t0k"})
    assert [r.header("Authorization") for r in up.requests] == ["Bearer t0k", None]


@pytest_twisted.ensureDeferred
async def test_bad_and_endless_redirects_fail(up: MemoryUpstream) -> None:
    up.behave("/ftp", redirect="ftp://upstream.test/file")
    with pytest.raises(UpstreamError, match="unsupported URL"):
        await get(client(up), "http://upstream.test/ftp")
    up.behave("/loop", redirect="/loop")
    c = client(up)
    c.max_redirects = 3
    with pytest.raises(UpstreamError, match="more than 3 redirects"):
        await get(c, "http://upstream.test/loop")
    assert up.count("/loop") == 4


@pytest_twisted.ensureDeferred
async def test_no_answer_times_out_on_the_given_clock(up: MemoryUpstream) -> None:
    clock = Clock()
    up.behave("/slow", stall=True)
    pending = Deferred.fromCoroutine(client(up, clock).request(REMOTE, b"GET", "http://upstream.test/slow"))
    await up.until_paused("/slow")
    clock.advance(9.9)
    assert not pending.called
    clock.advance(0.1)
    assert pending.called  # at once: the clock alone ends the wait
    with pytest.raises(UpstreamError) as e:
        await pending
    assert e.value.kind == "timeout"


@pytest_twisted.ensureDeferred
async def test_a_held_answer_goes_on_after_resume(up: MemoryUpstream) -> None:
    up.add("/file", b"x" * 5000)
    for path, behaviour in (("/file", {"pause_at": 100}), ("/file", {"stall": True}), ("/gone", {"stall": True})):
        up.behave(path, **behaviour)
        pending = get(client(up), f"http://upstream.test{path}")
        await up.until_paused(path)
        up.resume(path)
        response, _ = await pending
        body = await read_body(response).addTimeout(REQUEST_DEADLINE, reactor)
        assert (response.code, body) == ((200, b"x" * 5000) if path == "/file" else (404, b"not found\n"))


@pytest_twisted.ensureDeferred
async def test_a_reset_is_unreachable(up: MemoryUpstream) -> None:
    up.behave("/reset", reset=True)
    with pytest.raises(UpstreamError) as e:
        await get(client(up), "http://upstream.test/reset")
    assert e.value.kind == "unreachable"


class _Origin(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/old":
            request.setResponseCode(301)
            request.setHeader(b"Location", b"/new")
            return b""
        return request.getHeader(b"authorization") or b"none"


def test_treqs_request_traversal_agent_drives_it_too() -> None:
    agent = RequestTraversalAgent(_Origin())
    got: list[tuple[Any, str]] = []
    Deferred.fromCoroutine(UpstreamClient(Clock(), agent=agent).request(REMOTE, b"GET", "http://upstream.test/old")
                           ).addCallback(got.append)
    for _ in range(10):  # one flush per hop: treq's agent moves bytes only when told
        agent.flush()
    response, final = got[0]
    assert response.code == 200 and final == "http://upstream.test/new"
    body: list[bytes] = []
    read_body(response).addCallback(body.append)
    agent.flush()
    assert body == [BASIC.encode()]


def test_production_builds_one_pooled_agent_per_connect_timeout() -> None:
    from twisted.internet import reactor

    c = UpstreamClient(reactor)
    assert c.pool is not None and c.pool.persistent
    assert c.agent(5.0) is c.agent(5.0) and c.agent(5.0) is not c.agent(2.0)
    given = MemoryUpstream().agent
    injected = UpstreamClient(Clock(), agent=given)
    assert injected.agent(5.0) is given and injected.pool is None
    assert injected.close().called


class _ClosedThenAnswers:
    """An agent whose first ``failures`` requests find their pooled connection
    closed by the server (nothing received), then passes requests on."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner, self.failures, self.calls = inner, failures, 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Deferred[Any]:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseNeverReceived

        self.calls += 1
        if self.calls <= self.failures:
            return fail(ResponseNeverReceived([Failure(ConnectionDone())]))
        return self.inner.request(method, uri, headers, body)


@pytest_twisted.ensureDeferred
async def test_a_get_whose_connection_was_closed_unanswered_is_sent_again(up: MemoryUpstream) -> None:
    up.add("/page", b"page")
    agent = _ClosedThenAnswers(up.agent, failures=2)
    c = UpstreamClient(Clock(), agent=agent)
    response, _ = await Deferred.fromCoroutine(c.request(REMOTE, b"GET", "http://upstream.test/page"))
    assert response.code == 200 and await read_body(response) == b"page" and agent.calls == 3
    # Bounded: a server that never answers is unreachable after three attempts.
    agent = _ClosedThenAnswers(up.agent, failures=10)
    c = UpstreamClient(Clock(), agent=agent)
    with pytest.raises(UpstreamError, match="ConnectionDone"):
        await Deferred.fromCoroutine(c.request(REMOTE, b"GET", "http://upstream.test/page"))
    assert agent.calls == 3
