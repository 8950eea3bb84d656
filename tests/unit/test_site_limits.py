"""Connection bounds and request framing of the real SparkSite, in memory.

Each connection is the site's own protocol on a StringTransport, its timers
on a MemoryReactorClock: idle keep-alive timeout, the header deadline
(slowloris), the connection cap, and the Transfer-Encoding / Content-Length
checks that keep a body from being read two ways (request smuggling). The
resource behind the site records what it was asked, so a smuggled request
that ran would show.
"""

from __future__ import annotations

import hashlib
import http.client
import io
from http import HTTPStatus
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from sparkcache.config import ServerConfig
from sparkcache.protocols import load_config_data
from sparkcache.web.serve import Unsatisfiable, parse_range, range_spec
from sparkcache.web.site import SparkSite, TrackedRequest, connection_cap
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

IDLE, HEAD = 60.0, 30.0


class Recorder(Resource):
    """Answers every request with its method, path and body length; /slow is
    answered later, by the test, through ``held``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes]] = []
        self.held: list[Any] = []

    def render(self, request: Any) -> Any:
        self.seen.append((request.method, request.path))
        if request.path == b"/slow":
            self.held.append(request)
            return NOT_DONE_YET
        if request.path == b"/busy":
            request.setResponseCode(429)
            return b"slow down\n"
        body = request.content.read()
        return b"%s %s %d\n" % (request.method, request.path, len(body))


class HalfClosable(StringTransport):
    """A StringTransport that can close its write side, as a TCP one can."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class _Unclosable(io.BytesIO):
    def close(self) -> None:
        pass  # http.client closes its file after each response; more may follow


class Conn:
    def __init__(self, site: SparkSite, transport: StringTransport | None = None) -> None:
        self.proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = transport or StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    def responses(self) -> list[tuple[int, str, dict[str, str], bytes]]:
        """Every complete response written so far, parsed as a client would."""
        data = _Unclosable(self.transport.value())
        out = []

        class Wire:
            def makefile(self, *args: Any, **kw: Any) -> io.BytesIO:
                return data

        while data.tell() < len(data.getvalue()):
            resp = http.client.HTTPResponse(Wire())  # type: ignore[arg-type]
            resp.begin()
            out.append((resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()}, resp.read()))
        return out

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def make_site(clock: MemoryReactorClock, recorder: Recorder, **kw: Any) -> SparkSite:
    kw.setdefault("idle_timeout", IDLE)
    kw.setdefault("header_timeout", HEAD)
    return SparkSite(recorder, reactor=clock, **kw)


@pytest.fixture
def site(clock: MemoryReactorClock, recorder: Recorder) -> SparkSite:
    return make_site(clock, recorder)


GET = b"GET /a HTTP/1.1\r\nHost: cache.test\r\n\r\n"


# -- defaults ------------------------------------------------------------------------


def test_defaults_replace_twisted_12_hour_idle_timeout() -> None:
    cfg = load_config_data({}, source="cache.yaml", environ={})
    assert (cfg.server.idle_timeout, cfg.server.header_timeout, cfg.server.max_connections) == (60.0, 30.0, None)
    assert ServerConfig().idle_timeout == 60.0
    cfg = load_config_data({"server": {"idle_timeout": "2m", "header_timeout": 5, "max_connections": 100}},
                           source="cache.yaml", environ={})
    assert (cfg.server.idle_timeout, cfg.server.header_timeout, cfg.server.max_connections) == (120.0, 5.0, 100)
    assert cfg.redacted()["server"]["max_connections"] == 100


@pytest.mark.parametrize("bad", [0, -1, "many", True, 1.5])
def test_max_connections_must_be_a_positive_count(bad: Any) -> None:
    with pytest.raises(Exception, match=r"server\.max_connections"):
        load_config_data({"server": {"max_connections": bad}}, source="cache.yaml", environ={})


def test_default_cap_leaves_a_quarter_of_the_fd_limit_free() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(None) == max(16, soft * 3 // 4)
    assert connection_cap(7) == 7


# -- idle and header timeouts ----------------------------------------------------------


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(site: SparkSite, clock: MemoryReactorClock) -> None:
    c = Conn(site)
    c.send(GET)
    assert [r[0] for r in c.responses()] == [200]
    clock.advance(IDLE - 1)
    assert not c.closing
    c.send(GET)  # a second request on the same connection restarts the wait
    clock.advance(IDLE - 1)
    assert not c.closing
    clock.advance(2)
    assert c.closing
    assert len(c.responses()) == 2  # closed quietly: nothing more written


def test_silent_connection_is_closed_at_the_header_deadline(site: SparkSite, clock: MemoryReactorClock) -> None:
    c = Conn(site)
    clock.advance(HEAD - 0.5)
    assert not c.closing
    clock.advance(1)
    assert c.closing and c.transport.value() == b""
    c.lose()
    assert site.connections == 0


def test_slowloris_head_gets_408_however_it_trickles(site: SparkSite, clock: MemoryReactorClock,
                                                     recorder: Recorder) -> None:
    c = Conn(site)
    c.send(b"GET /a HTTP/1.1\r\n")
    for i in range(int(HEAD) // 5):  # a header line every 5 s keeps the idle timer happy
        assert not c.closing, f"cut after {i * 5}s"
        clock.advance(4.9)
        c.send(b"X-Pad-%d: x\r\n" % i)
    assert not c.closing
    clock.advance(1)
    assert c.closing
    [(status, reason, headers, body)] = c.responses()
    assert (status, reason) == (408, "Request Timeout") and b"header_timeout" in body
    assert headers["connection"] == "close"
    assert recorder.seen == []
    # A client that never reads its 408 does not keep the connection either.
    clock.advance(10)
    assert c.transport.disconnecting


def test_next_request_on_a_kept_alive_connection_has_its_own_deadline(site: SparkSite,
                                                                      clock: MemoryReactorClock) -> None:
    c = Conn(site)
    c.send(GET)
    clock.advance(HEAD + 5)  # idle between requests: the idle timeout applies, not the header one
    assert not c.closing
    c.send(b"GET /b HTTP/1.1\r\n")
    clock.advance(HEAD - 1)
    assert not c.closing
    c.send(b"Host: x\r\n")
    clock.advance(2)
    assert c.closing and c.responses()[-1][0] == 408


def test_a_response_streaming_to_a_slow_reader_is_never_cut(site: SparkSite, clock: MemoryReactorClock,
                                                            recorder: Recorder) -> None:
    c = Conn(site)
    c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    [request] = recorder.held
    for _ in range(60):  # ten minutes of a body trickling out
        request.write(b"x" * 100)
        clock.advance(10)
        assert not c.closing
    request.finish()
    [(status, _, _, body)] = c.responses()
    assert status == 200 and len(body) == 6000
    clock.advance(IDLE + 1)
    assert c.closing


def test_an_upload_making_progress_is_never_cut(site: SparkSite, clock: MemoryReactorClock) -> None:
    c = Conn(site)
    c.send(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n")
    for _ in range(40):  # 10 bytes every 20 s: 13 minutes, past every timeout but the idle one
        clock.advance(20)
        assert not c.closing
        c.send(b"y" * 10)
    [(status, _, _, body)] = c.responses()
    assert status == 200 and body == b"PUT /up 400\n"


def test_a_stalled_upload_is_cut_by_the_idle_timeout(site: SparkSite, clock: MemoryReactorClock) -> None:
    c = Conn(site)
    c.send(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n" + b"y" * 10)
    clock.advance(IDLE + 1)
    assert c.closing


# -- the connection cap ----------------------------------------------------------------


def test_connections_over_the_cap_get_503_and_are_closed(clock: MemoryReactorClock, recorder: Recorder) -> None:
    site = make_site(clock, recorder, max_connections=2)
    a, b = Conn(site), Conn(site)
    assert site.connections == 2
    over = Conn(site, HalfClosable())
    [(status, reason, headers, body)] = over.responses()
    assert (status, reason) == (503, "Service Unavailable")
    assert headers["retry-after"] == "1" and headers["connection"] == "close" and b"max_connections" in body
    assert over.transport.write_closed and site.shed_total == 1
    over.send(GET)  # its request, sent before it read the 503, is dropped
    assert recorder.seen == []
    clock.advance(3)
    assert over.transport.disconnecting  # cut once its linger is over
    over.lose()
    # The connections held are served as ever; a slot freed is taken again.
    a.send(GET)
    assert a.responses()[0][0] == 200
    b.lose()
    c = Conn(site)
    c.send(GET)
    assert c.responses()[0][0] == 200 and site.connections == 2


def test_a_flood_over_the_cap_is_closed_at_once_past_the_linger_budget(clock: MemoryReactorClock,
                                                                       recorder: Recorder) -> None:
    from sparkcache.web.site import SHED_MAX

    site = make_site(clock, recorder, max_connections=1)
    Conn(site)
    flood = [Conn(site, HalfClosable()) for _ in range(SHED_MAX)]
    assert all(f.transport.value().startswith(b"HTTP/1.1 503 ") for f in flood)
    assert site.shedding == SHED_MAX
    # Past the budget the listening port closes the socket itself, at once.
    assert site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001)) is None
    assert site.shed_total == SHED_MAX + 1
    clock.advance(3)
    for f in flood:
        assert f.transport.disconnecting
        f.lose()
    assert site.shedding == 0
    assert site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40002)) is not None


# -- framing (request smuggling) -------------------------------------------------------

PIPELINED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("head, status", [
    # chunked, then identity: twisted.web read the body as chunked and ran the next request
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", 400),
    (b"Transfer-Encoding: chunked, identity\r\n", 400),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
    (b"Transfer-Encoding: identity\r\n", 400),
    (b"Transfer-Encoding: gzip, chunked\r\n", 400),
    (b"Transfer-Encoding: xchunked\r\n", 400),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),
    (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
    (b"Content-Length: 5\r\nTransfer-Encoding: identity\r\n", 400),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
    (b"Content-Length: 5, 6\r\n", 400),
    (b"Content-Length: " + b"9" * 5000 + b"\r\n", 413),
], ids=["te-chunked-identity", "te-list-chunked-identity", "te-chunked-twice", "te-identity", "te-gzip",
        "te-unknown", "te-then-cl", "cl-then-te", "cl-then-te-identity", "cl-twice", "cl-list", "cl-5000-digits"])
def test_ambiguous_framing_is_refused_and_nothing_after_it_runs(site: SparkSite, recorder: Recorder,
                                                                head: bytes, status: int) -> None:
    c = Conn(site)
    c.send(b"POST /a HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n0\r\n\r\n" + PIPELINED)
    [(got, _, headers, body)] = c.responses()
    assert got == status, body
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert c.closing
    assert recorder.seen == []


def test_transfer_encoding_in_an_http_1_0_request_is_refused(site: SparkSite, recorder: Recorder) -> None:
    c = Conn(site)
    c.send(b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert c.responses()[0][0] == 400 and recorder.seen == []


def test_well_framed_chunked_and_pipelined_requests_still_work(site: SparkSite, recorder: Recorder) -> None:
    c = Conn(site)
    c.send(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
           + b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + PIPELINED)
    assert [(s, b) for s, _, _, b in c.responses()] == [
        (200, b"POST /a 5\n"), (200, b"POST /b 3\n"), (200, b"GET /smuggled 0\n")]
    assert not c.closing


# -- reason phrases ----------------------------------------------------------------------


def test_statuses_twisted_lacks_get_their_reason_phrase(site: SparkSite) -> None:
    c = Conn(site)
    c.send(b"GET /busy HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.responses()[0][:2] == (429, "Too Many Requests")
    request = TrackedRequest(c.proto._channel)
    for code, phrase in ((451, b"Unavailable For Legal Reasons"), (422, HTTPStatus(422).phrase.encode()),
                         (200, b"OK"), (507, b"Insufficient Storage Space")):
        request.setResponseCode(code)
        assert request.code_message == phrase


# -- Range parsing ---------------------------------------------------------------------

HUGE = "9" * 5000


@pytest.mark.parametrize("header, want", [
    (f"bytes={HUGE}-", Unsatisfiable),
    (f"bytes=0-{HUGE}", (0, 99)),
    (f"bytes=-{HUGE}", (0, 99)),
    (f"bytes={HUGE}-{HUGE}", Unsatisfiable),
    ("bytes=5-3", None),
    ("bytes=-0", Unsatisfiable),
    ("bytes=0-1,5-6", None),
    ("bytes=\u0663-", None),  # a non-ASCII digit is no digit
    ("items=0-5", None),
    ("bytes=90-200", (90, 99)),
])
def test_range_parsing_never_raises_but_unsatisfiable(header: str, want: Any) -> None:
    raw = header.encode("utf-8")
    if want is Unsatisfiable:
        with pytest.raises(Unsatisfiable):
            parse_range(raw, 100)
    else:
        assert parse_range(raw, 100) == want
    assert parse_range(raw, None) is None


def test_range_spec_of_an_unknown_length() -> None:
    assert range_spec(b"bytes=10-19") == (10, 19)
    assert range_spec(b"bytes=10-") == (10, None)
    assert range_spec(b"bytes=-10") == (None, 10)
    assert range_spec(b"bytes=-") is None
    assert range_spec(("bytes=1-" + HUGE).encode()) == (1, 10**18)


# -- through the apps: absurd Range on generic and OCI blobs, an upstream 429 ---------


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory({"remotes": {
        "files": {"type": "generic", "upstream": UPSTREAM},
        "hub": {"type": "oci", "upstream": UPSTREAM, "registries": ["docker.io"]},
    }}))


@pytest_twisted.ensureDeferred
async def test_absurd_ranges_on_generic_and_oci_blobs_are_never_5xx(h: Harness) -> None:
    body = b"0123456789" * 20_000
    blob = "sha256:" + hashlib.sha256(body).hexdigest()
    h.upstream.add("/a.bin", body)
    h.upstream.add(f"/v2/team/app/blobs/{blob}", body)
    for path in ("/api/files/a.bin", f"/v2/hub/team/app/blobs/{blob}"):
        assert (await h.get(path)).body == body
        await h.settle()
        for header, status in ((f"bytes={HUGE}-", 416), (f"bytes=0-{HUGE}", 206), (f"bytes=-{HUGE}", 206),
                               (f"bytes={HUGE}-{HUGE}", 416), (f"bytes=1-{HUGE}x", 200)):
            got = await h.get(path, {"Range": header})
            assert got.status == status, (path, header[:20], got.describe())
            if status == 206:
                assert got.body == body[-len(got.body):] and len(got.body) >= len(body) - 1


@pytest_twisted.ensureDeferred
async def test_upstream_429_keeps_its_retry_after_on_generic_and_oci(h: Harness) -> None:
    h.upstream.behave("/busy.bin", status=429, headers={"Retry-After": "42"})
    h.upstream.behave("/v2/library/alpine/manifests/busy", status=429, headers={"Retry-After": "43"})
    got = await h.get("/api/files/busy.bin")
    assert got.status == 429 and got.header("Retry-After") == "42", got.describe()
    got = await h.get("/v2/hub/alpine/manifests/busy")
    assert got.status == 429 and got.header("Retry-After") == "43", got.describe()
    assert b"TOOMANYREQUESTS" in got.body


@pytest_twisted.ensureDeferred
async def test_a_passed_through_429_keeps_its_retry_after(harness_factory: MakeHarness) -> None:
    h = await harness_factory({"remotes": {"npm": {"type": "npm", "upstream": UPSTREAM}}})
    h.upstream.behave("/-/v1/search", status=429, headers={"Retry-After": "44"})
    got = await h.get("/npm/npm/-/v1/search?text=x")
    assert got.status == 429 and got.header("Retry-After") == "44", got.describe()
