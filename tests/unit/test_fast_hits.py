"""Fresh small hits answered by the connection itself (sparkcache.web.hits).

The daemon's real site, one connection on a StringTransport: every request
the connection answers must read exactly as twisted.web's answer would
(headers, body, HEAD), requests it must not answer (Range, conditionals,
HTTP/1.0, Connection: close, a body, a refused token) go through twisted.web on
the same connection in order, and a purge or a replaced entry is never
answered from a kept block.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from sparkcache.web.hits import FastHits
from sparkcache.web.site import parse_head
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.npm_packages import NpmMemoryUpstream
from tests.unit.test_site_limits import Conn

READER = "rd-7a1c"
CONFIG: dict[str, Any] = {
    "auth": {"anonymous_read": True, "tokens": [{"name": "reader", "token": READER, "scopes": ["read"]}]},
    "remotes": {"files": {"type": "generic", "upstream": UPSTREAM, "immutable_patterns": ["^/releases/"]}},
}
PATH = "/api/files/releases/a.bin"
DATA = os.urandom(4096)


def get(path: str = PATH, *headers: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    return f"{method} {path} {version}\r\nHost: cache.test\r\n".encode() + b"".join(
        h.encode() + b"\r\n" for h in headers) + b"\r\n"


async def warm(h: Harness, path: str = PATH, data: bytes = DATA) -> FastHits:
    h.upstream.add(path.removeprefix("/api/files"), data)
    assert (await h.get(path)).header("X-Cache") == "MISS"
    await h.settle()
    assert (await h.get(path)).header("X-Cache") == "HIT"  # now in the index's memory
    fast = h.svc.root.apps[b"api"]
    assert isinstance(fast, FastHits)
    return fast


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


async def responses(h: Harness, conn: Conn, n: int) -> list[tuple[int, str, dict[str, str], bytes]]:
    """The connection's responses once there are ``n`` (those answered after an
    upstream fetch are written a few reactor turns after it settles). Up to 30 s:
    the store's thread pools may wait long for a loaded CPU."""
    for _ in range(3000):
        await h.settle()
        out = conn.responses()
        if len(out) >= n:
            return out
        await deferLater(reactor, 0.01)
    return conn.responses()


@pytest_twisted.ensureDeferred
async def test_a_hit_reads_as_twisted_web_would_answer_it(h: Harness) -> None:
    fast = await warm(h)
    # What twisted.web answers: If-Match is never a fast hit, and a hit ignores it.
    slow = Conn(h.svc.site)
    slow.send(get(PATH, "If-Match: *"))
    [(status, _r, slow_headers, slow_body)] = slow.responses()
    assert status == 200 and slow_body == DATA and fast.blocks.size == 0
    conn = Conn(h.svc.site)
    conn.send(get())
    [(status, reason, headers, body)] = conn.responses()
    assert fast.blocks.size > 0, "the connection answered it"
    assert (status, reason, body) == (200, "OK", DATA)
    assert {**headers, "date": ""} == {**slow_headers, "date": ""}
    assert headers["x-cache"] == "HIT" and headers["content-length"] == "4096"
    # HEAD: the same headers, no body.
    conn.transport.clear()
    conn.send(get(method="HEAD"))
    assert conn.transport.value().endswith(b"\r\n\r\n")
    assert b"Content-Length: 4096\r\n" in conn.transport.value()
    assert not conn.closing


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order_on_one_connection(h: Harness) -> None:
    await warm(h)
    conn = Conn(h.svc.site)
    conn.send(get() + get(PATH, "Range: bytes=0-9") + get() + get("/api/files/releases/none") + get())
    out = await responses(h, conn, 5)
    assert [r[0] for r in out] == [200, 206, 200, 404, 200]
    assert out[0][3] == out[2][3] == out[4][3] == DATA
    assert out[1][3] == DATA[:10] and out[1][2]["content-range"] == "bytes 0-9/4096"


@pytest.mark.parametrize("extra, version", [
    (("If-None-Match: \"x\"",), "HTTP/1.1"),
    (("Connection: close",), "HTTP/1.1"),
    ((), "HTTP/1.0"),
    (("Content-Length: 0",), "HTTP/1.1"),
    (("Authorization: Bearer wrong",), "HTTP/1.1"),
])
@pytest_twisted.ensureDeferred
async def test_requests_the_connection_leaves_to_twisted_web(h: Harness, extra: tuple[str, ...],
                                                             version: str) -> None:
    fast = await warm(h)
    conn = Conn(h.svc.site)
    conn.send(get(PATH, *extra, version=version))
    [(status, _r, headers, _body)] = await responses(h, conn, 1)
    assert fast.blocks.size == 0
    assert status in (200, 304, 401)
    if version == "HTTP/1.0" or "Connection: close" in extra:
        assert conn.closing
    if "Authorization: Bearer wrong" in extra:
        assert status == 401


@pytest_twisted.ensureDeferred
async def test_a_token_when_reads_need_one(harness_factory: MakeHarness) -> None:
    h = await harness_factory({**CONFIG, "auth": {**CONFIG["auth"], "anonymous_read": False}})
    h.upstream.add("/releases/a.bin", DATA)
    auth = {"Authorization": f"Bearer {READER}"}
    assert (await h.get(PATH, auth)).status == 200
    await h.settle()
    assert (await h.get(PATH, auth)).header("X-Cache") == "HIT"
    fast = h.svc.root.apps[b"api"]
    conn = Conn(h.svc.site)
    conn.send(get())
    assert conn.responses()[0][0] == 401 and fast.blocks.size == 0
    conn = Conn(h.svc.site)
    conn.send(get(PATH, f"authorization:  Bearer {READER} "))
    [(status, _r, _h, body)] = conn.responses()
    assert status == 200 and body == DATA and fast.blocks.size > 0


@pytest_twisted.ensureDeferred
async def test_a_purge_or_a_new_body_is_never_answered_from_a_kept_block(h: Harness) -> None:
    await warm(h)
    conn = Conn(h.svc.site)
    conn.send(get())
    assert conn.responses()[-1][3] == DATA
    await h.store.purge_key("files:releases/a.bin")
    new = os.urandom(4096)
    h.upstream.add("/releases/a.bin", new)
    conn.send(get())
    status, _r, headers, body = (await responses(h, conn, 2))[-1]
    assert (status, headers["x-cache"], body) == (200, "MISS", new)
    conn.send(get())
    assert (await responses(h, conn, 3))[-1][3] == new


def test_parse_head_takes_only_what_twisted_web_parses_the_same_way() -> None:
    ok = parse_head(b"GET /a/b?c=d HTTP/1.1\r\nHost: x\r\nAuthorization:  Bearer t \r\nConnection: Keep-Alive")
    assert ok is not None and (ok.method, ok.uri) == (b"GET", b"/a/b?c=d")
    assert ok.getHeader(b"AUTHORIZATION") == b"Bearer t" and ok.getHeader(b"host") == b"x"
    assert ok.getHeader(b"accept") is None
    last = parse_head(b"HEAD / HTTP/1.1\r\nX-A: 1\r\nx-a: 2")
    assert last is not None and last.getHeader(b"x-a") == b"2"  # getHeader's last value
    for bad in [b"POST /a HTTP/1.1", b"GET /a HTTP/1.0", b"GET a HTTP/1.1", b"GET /a b HTTP/1.1",
                b"GET /a HTTP/1.1\r\nA : b", b"GET /a HTTP/1.1\r\n folded", b"GET /a HTTP/1.1\r\nA: b\nc",
                b"GET /a HTTP/1.1\r\nA: \x00", b"GET /a HTTP/1.1\r\nRange: bytes=0-1",
                b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked", b"GET /a HTTP/1.1\r\nconnection: close",
                b"GET /a HTTP/1.1\r\nIf-Modified-Since: x", b"GET /\xff HTTP/1.1"]:
        assert parse_head(bad) is None, bad


@pytest_twisted.ensureDeferred
async def test_npm_tarball_hits_are_answered_by_the_connection(harness_factory: MakeHarness) -> None:
    up = NpmMemoryUpstream()
    up.publish("@team/util", "2.0.0")
    h = await harness_factory({"remotes": {"npm": {"type": "npm", "upstream": UPSTREAM}}}, upstream=up)
    path = "/npm/npm/@team/util/-/util-2.0.0.tgz"
    assert (await h.get(path)).header("X-Cache") == "MISS"
    await h.settle()
    assert (await h.get(path)).header("X-Cache") == "HIT"
    fast = h.svc.root.apps[b"npm"]
    assert isinstance(fast, FastHits) and fast.blocks.size == 0
    conn = Conn(h.svc.site)
    conn.send(get(path) + get("/npm/npm/@team%2futil"))  # the packument: twisted.web's
    [(status, _r, headers, body), (packument, _r2, _h2, _b2)] = await responses(h, conn, 2)
    assert (status, headers["x-cache"], body) == (200, "HIT", up.tarballs[("@team/util", "2.0.0")])
    assert fast.blocks.size > 0 and packument == 200
    m = h.metrics.render().decode()
    assert 'sparkcache_registry_requests_total{form="tarball",remote="npm",result="hit"} 2.0' in m
    # A path no registry has is still refused in JSON before anything is looked up.
    conn = Conn(h.svc.site)
    conn.send(get("/npm/npm/a%2f..%2fb/-/x.tgz"))
    assert (await responses(h, conn, 1))[0][0] == 400


@pytest_twisted.ensureDeferred
async def test_hits_answered_by_the_connection_are_counted_exactly_when_read(h: Harness) -> None:
    await warm(h)
    conn = Conn(h.svc.site)
    conn.send(get() * 3)
    assert len(conn.responses()) == 3
    conn.transport.clear()
    conn.send(get(method="HEAD"))
    assert conn.transport.value().endswith(b"\r\n\r\n")
    conn.transport.clear()
    m = h.metrics.render().decode()
    # warm()'s one hit through twisted.web, then three GETs and a HEAD at the connection
    assert 'sparkcache_requests_total{remote="files",result="hit"} 5.0' in m
    assert f'sparkcache_served_bytes_total{{remote="files",source="cache"}} {4.0 * len(DATA)}' in m
    conn.send(get())
    assert conn.transport.value().endswith(DATA)
    assert 'sparkcache_requests_total{remote="files",result="hit"} 6.0' in h.metrics.render().decode()


def test_hits_are_batched_until_published(monkeypatch: Any) -> None:
    from sparkcache.metrics import Metrics

    m = Metrics()
    batch = m.hit_batch("r")
    batch.hits, batch.bytes = 2, 10
    assert m.registry.get_sample_value("sparkcache_requests_total", {"remote": "r", "result": "hit"}) == 0
    m.publish()
    assert m.registry.get_sample_value("sparkcache_requests_total", {"remote": "r", "result": "hit"}) == 2
    assert m.registry.get_sample_value("sparkcache_served_bytes_total", {"remote": "r", "source": "cache"}) == 10
    assert (batch.hits, batch.bytes) == (0, 0)
    # Worker processes batch too (each publishes every second and before it reads the aggregate).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
    assert Metrics().hit_batch("r") is not None


def test_collected_publishes_the_batches_before_the_pool_reads() -> None:
    """With workers, /health and the status read the aggregate in the I/O
    pool, where a batch is never flushed (the reactor adds to it): ``collected``
    publishes on the calling thread first."""
    from sparkcache.metrics import Metrics

    m = Metrics()
    m.hit_batch("r").hits = 3
    seen: list[float | None] = []

    def in_io(f: Any) -> Any:  # what the pool would run, after what ran before it
        seen.append(m.registry.get_sample_value("sparkcache_requests_total", {"remote": "r", "result": "hit"}))
        return f()

    families = m.collected(in_io)
    assert seen == [3.0]
    assert m.totals(families)[0][("r", "hit")] == 3.0


def test_parse_head_keeps_what_it_parsed() -> None:
    head = b"GET /x/y HTTP/1.1\r\nHost: a\r\nUser-Agent: t"
    first = parse_head(head)
    assert first is not None and parse_head(bytes(head)) is first
    assert (first.mount, first.anonymous) == (b"x", True)
    again = parse_head(b"GET /x/z HTTP/1.1\r\nHost: a\r\nUser-Agent: t")
    assert again is not None and again.fields is first.fields  # the header block was kept too
    assert parse_head(b"GET /x/y HTTP/1.1\r\nHost: \xff\xfe") is None  # the app refuses it
    assert parse_head(b"GET /x/y HTTP/1.1\r\nHost: \xff\xfe") is None
    token = parse_head(b"GET /x/y HTTP/1.1\r\nAuthorization: Bearer t")
    assert token is not None and not token.anonymous


def test_one_hit_batch_per_remote_however_often_apps_are_rebuilt() -> None:
    from sparkcache.metrics import Metrics

    m = Metrics()
    assert m.hit_batch("r") is m.hit_batch("r") is not m.hit_batch("s")


def test_kept_heads_stay_bounded() -> None:
    from sparkcache.web import site

    for i in range(site.HEADS_MAX + 10):
        parse_head(b"GET /x/%d HTTP/1.1\r\nX-Id: %d" % (i, i))
    assert len(site._heads) <= site.HEADS_MAX and len(site._fields) <= site.FIELDS_MAX
    long = b"GET /x HTTP/1.1\r\nX-Pad: " + b"a" * site.HEAD_KEEP_MAX
    assert parse_head(long) is not None and long not in site._heads  # parsed, not kept
