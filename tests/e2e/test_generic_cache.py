"""Generic remotes end to end: hits, misses, freshness, revalidation, stale-on-error.

Each test runs a real daemon (``twistd -n sparkcache``) against the
controllable upstream in ``tests/support/upstream.py``; see docs/http-api.rst.
TTLs are 1-2 s; where a check is only meaningful while an entry is still
fresh, it is made only if the test got there in time, so a slow machine
cannot make the test flaky.
"""

from __future__ import annotations

import http.client
import os
import time

import pytest

from tests.support.client import assert_json_error, get_until_hit, sha256
from tests.support.remotes import generic_remote


def test_miss_then_hit(upstream, daemon_factory):
    data = os.urandom(300_000)
    upstream.add("/files/a.bin", data, content_type="application/x-test")
    d = daemon_factory({"r": generic_remote(upstream)})

    first = d.get("/api/r/files/a.bin")
    assert first.status == 200, first.describe()
    assert first.header("X-Cache") == "MISS", first.describe()
    assert first.header("X-Artifact-Source") == "remote", first.describe()
    assert sha256(first.body) == sha256(data)

    second = get_until_hit(d, "/api/r/files/a.bin", data)
    assert second.header("X-Artifact-Source") == "cache", second.describe()
    assert sha256(second.body) == sha256(data)
    assert second.header("Content-Length") == str(len(data))
    assert second.header("Content-Type") == "application/x-test"
    assert second.header("Accept-Ranges") == "bytes"
    assert second.header("ETag"), second.describe()

    assert upstream.count("/files/a.bin") == 1, upstream.describe()


def test_upstream_with_path_prefix_and_query(upstream, daemon_factory):
    upstream.add("/mirror/files/q.bin", b"with a query")
    d = daemon_factory({"r": generic_remote(upstream, prefix="/mirror")})

    resp = d.get("/api/r/files/q.bin?version=3&arch=x86_64")
    assert resp.status == 200, resp.describe()
    assert resp.body == b"with a query"
    assert [r.path for r in upstream.requests_for("/mirror/files/q.bin")] == ["/mirror/files/q.bin?version=3&arch=x86_64"]


def test_mutable_entry_expires(upstream, daemon_factory):
    upstream.add("/meta/index.json", b'{"v": 1}')
    d = daemon_factory({"r": generic_remote(upstream, cache={"mutable_ttl": "1s"})})

    t0 = time.monotonic()
    first = d.get("/api/r/meta/index.json")
    assert first.status == 200 and first.body == b'{"v": 1}', first.describe()
    assert first.header("X-Cache") == "MISS"
    again = d.get("/api/r/meta/index.json")
    # Every fetch so far began before this point: its entry's TTL runs from
    # then (t0 is earlier still, but a loaded daemon may take its time to
    # start the first fetch, so t0 + TTL is no bound on when it expires).
    served = time.monotonic()
    assert again.body == b'{"v": 1}'
    if served - t0 < 0.8:  # still fresh for sure
        assert again.header("X-Cache") in ("HIT", "MISS"), again.describe()  # MISS: joined the finishing fetch
        assert upstream.count("/meta/index.json") == 1

    upstream.add("/meta/index.json", b'{"v": 2}')
    time.sleep(max(0.0, 1.3 - (time.monotonic() - served)))
    n = upstream.count("/meta/index.json")
    later = d.get("/api/r/meta/index.json")
    assert later.status == 200, later.describe()
    assert later.body == b'{"v": 2}', "an expired mutable entry must be fetched again"
    assert later.header("X-Cache") != "HIT", later.describe()
    assert upstream.count("/meta/index.json") == n + 1, upstream.describe()


def test_revalidation_304_serves_cached_body(upstream, daemon_factory):
    body = os.urandom(50_000)
    upstream.add("/meta/index.json", body)
    d = daemon_factory({"r": generic_remote(upstream, check_mutable_updates=True, cache={"mutable_ttl": "1s"})})

    first = d.get("/api/r/meta/index.json")
    assert first.status == 200 and first.header("X-Cache") == "MISS", first.describe()
    time.sleep(1.3)

    # Taken before the request: the 304 renews the entry's TTL from a moment
    # after this, so the entry is fresh for sure until t_revalidated + TTL.
    t_revalidated = time.monotonic()
    second = d.get("/api/r/meta/index.json")
    assert second.status == 200, second.describe()
    assert second.header("X-Cache") == "REVALIDATED", second.describe()
    assert second.body == body

    reqs = upstream.requests_for("/meta/index.json")
    assert len(reqs) == 2, upstream.describe()
    cond = reqs[1]
    etag = upstream.files["/meta/index.json"].etag
    assert cond.header("If-None-Match") == etag or cond.header("If-Modified-Since"), (
        f"revalidation was not conditional: {cond.headers}"
    )
    assert cond.status == 304 and cond.body_sent == 0, upstream.describe()

    third = d.get("/api/r/meta/index.json")
    assert third.body == body
    if time.monotonic() - t_revalidated < 0.8:  # a 304 makes the entry fresh again
        assert upstream.count("/meta/index.json") == 2, upstream.describe()


def test_revalidation_picks_up_a_changed_body(upstream, daemon_factory):
    upstream.add("/meta/index.json", b"old contents")
    d = daemon_factory({"r": generic_remote(upstream, check_mutable_updates=True, cache={"mutable_ttl": "1s"})})
    assert d.get("/api/r/meta/index.json").body == b"old contents"
    upstream.add("/meta/index.json", b"new contents, longer than before")
    time.sleep(1.3)

    resp = d.get("/api/r/meta/index.json")
    assert resp.status == 200, resp.describe()
    assert resp.body == b"new contents, longer than before"
    assert resp.header("Content-Length") == str(len(resp.body))
    reqs = upstream.requests_for("/meta/index.json")
    assert len(reqs) == 2 and reqs[1].status == 200, upstream.describe()
    assert d.get("/api/r/meta/index.json").body == b"new contents, longer than before"


@pytest.mark.parametrize("failure", ["stopped", "stall", "503", "429", "reset"])
def test_stale_on_error(upstream, daemon_factory, failure):
    body = os.urandom(20_000)
    upstream.add("/meta/index.json", body)
    remote = generic_remote(
        upstream,
        check_mutable_updates=True,
        cache={"mutable_ttl": "1s"},
        # Short only where the test needs the timeout to fire (the first miss
        # runs under it too, and a loaded upstream may pause longer than 1 s).
        connect_timeout="10s",
        read_timeout="1s" if failure == "stall" else "10s",
    )
    d = daemon_factory({"r": remote})
    first = d.get("/api/r/meta/index.json")
    assert first.status == 200 and first.header("X-Cache") == "MISS", first.describe()
    time.sleep(1.3)

    if failure == "stopped":
        upstream.stop()  # connection refused
    elif failure == "stall":
        upstream.behave("/meta/index.json", stall=True)  # no answer past read_timeout
    elif failure == "reset":
        upstream.behave("/meta/index.json", reset=True)
    else:
        upstream.behave("/meta/index.json", status=int(failure))

    stale = d.get("/api/r/meta/index.json", timeout=20)
    assert stale.status == 200, stale.describe()
    assert stale.header("X-Cache") == "STALE", stale.describe()
    assert stale.header("X-Artifact-Source") == "cache", stale.describe()
    assert stale.body == body


def test_404_on_revalidation_evicts(upstream, daemon_factory):
    upstream.add("/meta/index.json", b"version one")
    remote = generic_remote(upstream, check_mutable_updates=True, cache={"mutable_ttl": "1s", "negative_ttl": "1s"})
    d = daemon_factory({"r": remote})
    assert d.get("/api/r/meta/index.json").body == b"version one"
    time.sleep(1.3)

    upstream.remove("/meta/index.json")
    gone = d.get("/api/r/meta/index.json")
    assert_json_error(gone, 404)
    assert gone.header("X-Cache") != "STALE", gone.describe()

    # Once the negative entry has expired, the next request goes upstream and,
    # the old entry being gone, it is a plain (unconditional) miss.
    upstream.add("/meta/index.json", b"version two")
    time.sleep(1.3)
    n = upstream.count("/meta/index.json")
    back = d.get("/api/r/meta/index.json")
    assert back.status == 200, back.describe()
    assert back.body == b"version two"
    assert back.header("X-Cache") == "MISS", back.describe()
    last = upstream.requests_for("/meta/index.json")[-1]
    assert upstream.count("/meta/index.json") == n + 1
    assert last.header("If-None-Match") is None and last.header("If-Modified-Since") is None, (
        f"the evicted entry was revalidated: {last.headers}"
    )


@pytest.mark.parametrize("upstream_status", [404, 410])
def test_negative_cache(upstream, daemon_factory, upstream_status):
    if upstream_status != 404:
        upstream.behave("/files/missing.bin", status=upstream_status, times=1)
    d = daemon_factory({"r": generic_remote(upstream, cache={"negative_ttl": "2s"})})

    t0 = time.monotonic()
    first = d.get("/api/r/files/missing.bin")
    assert_json_error(first, 404)
    assert upstream.count("/files/missing.bin") == 1

    second = d.get("/api/r/files/missing.bin")
    served = time.monotonic()  # the 404 was fetched before this (t0 + TTL is no bound: see above)
    assert_json_error(second, 404)
    if served - t0 < 1.5:
        assert upstream.count("/files/missing.bin") == 1, "a 404 must be cached for negative_ttl"

    upstream.add("/files/missing.bin", b"now it exists")
    time.sleep(max(0.0, 2.4 - (time.monotonic() - served)))
    later = d.get("/api/r/files/missing.bin")
    assert later.status == 200, later.describe()
    assert later.body == b"now it exists"
    assert upstream.count("/files/missing.bin") == 2, upstream.describe()


def test_path_outside_patterns_is_forbidden(upstream, daemon_factory):
    upstream.add("/other/x.bin", b"not for you")
    upstream.add("/files/x.bin", b"allowed")
    upstream.add("/meta/x.json", b"allowed too")
    d = daemon_factory({"r": generic_remote(upstream)})

    assert_json_error(d.get("/api/r/other/x.bin"), 403)
    assert upstream.total() == 0, upstream.describe()

    ok = d.get("/api/r/files/x.bin")
    assert ok.status == 200 and ok.body == b"allowed", ok.describe()
    ok = d.get("/api/r/meta/x.json")
    assert ok.status == 200 and ok.body == b"allowed too", ok.describe()


@pytest.mark.parametrize(
    "upstream_status,expected",
    [(500, 502), (503, 502), (403, 403), (429, 429)],
)
def test_upstream_errors_with_nothing_cached(upstream, daemon_factory, upstream_status, expected):
    upstream.behave("/files/e.bin", status=upstream_status)
    d = daemon_factory({"r": generic_remote(upstream)})
    assert_json_error(d.get("/api/r/files/e.bin"), expected)


def test_upstream_down_with_nothing_cached_is_502(upstream, daemon_factory):
    d = daemon_factory({"r": generic_remote(upstream, connect_timeout="1s")})
    upstream.stop()
    assert_json_error(d.get("/api/r/files/e.bin", timeout=20), 502)


def test_upstream_timeout_with_nothing_cached_is_504(upstream, daemon_factory):
    upstream.add("/files/slow.bin", b"too late")
    upstream.behave("/files/slow.bin", stall=True)
    d = daemon_factory({"r": generic_remote(upstream, read_timeout="1s")})
    assert_json_error(d.get("/api/r/files/slow.bin", timeout=20), 504)


def _head_then_get(port: int, path: str) -> tuple[http.client.HTTPResponse, bytes, http.client.HTTPResponse, bytes]:
    """HEAD then GET on one keep-alive connection: a body sent after HEAD breaks the GET."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("HEAD", path)
        head = conn.getresponse()
        head_body = head.read()
        conn.request("GET", path)
        get = conn.getresponse()
        get_body = get.read()
        return head, head_body, get, get_body
    finally:
        conn.close()


def test_head_on_miss_and_hit(upstream, daemon_factory):
    data = os.urandom(100_000)
    upstream.add("/files/h.bin", data, content_type="application/x-thing")
    d = daemon_factory({"r": generic_remote(upstream)})

    head, head_body, get, get_body = _head_then_get(d.port, "/api/r/files/h.bin")
    assert head.status == 200
    assert head_body == b""
    assert head.getheader("Content-Length") == str(len(data))
    assert get.status == 200
    assert sha256(get_body) == sha256(data), "GET after a HEAD miss returned the wrong body"

    get_until_hit(d, "/api/r/files/h.bin", data)
    head, head_body, get, get_body = _head_then_get(d.port, "/api/r/files/h.bin")
    assert head.status == 200 and head_body == b""
    assert head.getheader("X-Cache") == "HIT"
    assert head.getheader("Content-Length") == str(len(data))
    assert head.getheader("Content-Type") == "application/x-thing"
    assert get.status == 200 and get.getheader("X-Cache") == "HIT"
    assert sha256(get_body) == sha256(data)

    missing = d.head("/api/r/files/nope.bin")
    assert missing.status == 404 and missing.body == b""
