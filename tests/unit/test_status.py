"""The status page, ``/status.json`` and ``/ready`` over the daemon in memory
(tests/support/harness.py, a task.Clock driving the history's timer): the
figures agree with ``/metrics``, browsers get HTML and API clients JSON,
everything from config and upstreams is escaped, ``/ready`` says why not."""

from __future__ import annotations

import re
import shutil
from html import unescape
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from sparkcache.web import status_page
from sparkcache.web.status import SAMPLE_INTERVAL, History, Totals
from tests.support.git_upstream import FileUpstream
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
CONFIG: dict[str, Any] = {"remotes": {"files": {"type": "generic", "upstream": UPSTREAM},
                                      "other": {"type": "generic", "upstream": "http://other.test"}}}


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def traffic(h: Harness) -> None:
    """Two misses, one hit, one upstream 503 (an error) on ``files``."""
    h.upstream.add("/a.bin", b"a" * 1000)
    h.upstream.add("/b.bin", b"b" * 3000)
    h.upstream.behave("/broken", status=503)
    for path in ("/a.bin", "/b.bin"):
        assert (await h.get("/api/files" + path)).status == 200
    await h.settle()
    hit = await h.get("/api/files/a.bin")
    assert hit.header("X-Cache") == "HIT", hit.describe()
    assert (await h.get("/api/files/broken")).status >= 500
    await h.settle()


@pytest_twisted.ensureDeferred
async def test_status_json_agrees_with_metrics(h: Harness) -> None:
    await traffic(h)
    doc = (await h.get("/status.json")).json()
    m = metric_values((await h.get("/metrics")).body.decode())

    def requests(result: str) -> float:
        return m.get(("sparkcache_requests_total", (("remote", "files"), ("result", result))), 0.0)

    def served(source: str) -> float:
        return m.get(("sparkcache_served_bytes_total", (("remote", "files"), ("source", source))), 0.0)

    t = doc["totals"]
    assert (t["hits"], t["misses"], t["errors"]) == (requests("hit"), requests("miss"), requests("error")) == (1, 2, 1)
    assert t["requests"] == 4 and t["hit_ratio"] == pytest.approx(1 / 3)
    assert (t["bytes_cache"], t["bytes_upstream"]) == (served("cache"), served("upstream")) == (1000, 4000)
    assert doc["store"] == {"bytes": 4000, "entries": 2, "max_size": h.store.max_size,
                            "used_ratio": 4000 / h.store.max_size, "low_space": False}
    assert doc["store"]["bytes"] == m[("sparkcache_store_bytes", ())]
    assert doc["inflight_fetches"] == m[("sparkcache_inflight_fetches", ())] == 0

    rows = {r["name"]: r for r in doc["remotes"]}
    assert list(rows)[:2] == ["files", "other"]
    files = rows["files"]
    assert (files["type"], files["url"], files["upstreams"]) == ("generic", "/api/files/", [UPSTREAM])
    assert (files["hits"], files["misses"], files["requests"]) == (1, 2, 4)
    assert files["upstream"]["state"] == "failing"  # its last upstream answer was the 503
    assert files["upstream"]["last_error"] == f"HTTP 503 from {UPSTREAM}"
    assert rows["other"]["requests"] == 0 and rows["other"]["upstream"]["state"] == "unknown"

    ups = {u["origin"]: u for u in doc["upstreams"]}
    assert set(ups) == {UPSTREAM, "http://other.test"}
    assert ups[UPSTREAM]["remotes"] == ["files"] and ups[UPSTREAM]["last_error"] == f"HTTP 503 from {UPSTREAM}"
    assert ups[UPSTREAM]["last_failure"] == h.clock.seconds() == ups[UPSTREAM]["last_success"]
    assert m[("sparkcache_upstream_last_failure_timestamp_seconds", (("origin", UPSTREAM),))] == h.clock.seconds()
    assert ups[UPSTREAM]["state"] == "failing" and ups["http://other.test"]["state"] == "unknown"
    assert doc["ready"] is True and doc["not_ready"] == []
    assert doc["git"] is None  # no git configured: its apps (and pygit2) are not loaded


@pytest_twisted.ensureDeferred
async def test_upstream_state_follows_the_last_answer(h: Harness) -> None:
    h.upstream.behave("/down", status=502)
    await h.get("/api/files/down")
    h.clock.advance(5)
    doc = (await h.get("/status.json")).json()
    row = next(u for u in doc["upstreams"] if u["origin"] == UPSTREAM)
    assert row["state"] == "failing" and row["last_success"] is None
    assert next(r for r in doc["remotes"] if r["name"] == "files")["upstream"]["state"] == "failing"
    h.upstream.add("/up", b"fine")
    assert (await h.get("/api/files/up")).status == 200
    await h.settle()
    doc = (await h.get("/status.json")).json()
    row = next(u for u in doc["upstreams"] if u["origin"] == UPSTREAM)
    assert row["state"] == "ok" and row["last_success"] == row["last_failure"] + 5
    assert row["last_error"] == f"HTTP 502 from {UPSTREAM}"  # kept: when it last failed, and how


@pytest_twisted.ensureDeferred
async def test_history_is_sampled_by_the_clock(h: Harness) -> None:
    start = h.clock.seconds()
    doc = (await h.get("/status.json")).json()
    assert doc["history"]["interval"] == SAMPLE_INTERVAL and doc["history"]["size"] == 360
    assert doc["history"]["samples"] == [[start, 0, 0, 0, 0]]  # one at start
    await traffic(h)
    h.clock.advance(SAMPLE_INTERVAL)
    h.clock.advance(SAMPLE_INTERVAL)
    samples = (await h.get("/status.json")).json()["history"]["samples"]
    assert samples == [[start, 0, 0, 0, 0],
                       [start + SAMPLE_INTERVAL, 1, 2, 1000, 4000],
                       [start + 2 * SAMPLE_INTERVAL, 1, 2, 1000, 4000]]


def test_history_keeps_the_last_hour_only() -> None:
    history = History(interval=10, size=3)
    for i in range(5):
        history.add(10.0 * i, Totals(hits=i, misses=2 * i, bytes_cache=3 * i, bytes_upstream=4 * i))
    assert history.as_json()["samples"] == [[20.0, 2, 4, 6, 8], [30.0, 3, 6, 9, 12], [40.0, 4, 8, 12, 16]]


@pytest.mark.parametrize("accept, html", [
    (None, False), ("*/*", False), ("application/json", False), ("application/json, text/html", False),
    ("text/html;q=0.5, application/json", False), ("text/html;q=0", False), ("text/*", False),
    (BROWSER, True), ("text/html", True), ("text/html, */*", True), ("TEXT/HTML;Q=1", True),
    ("application/json;q=0.5, text/html", True),
])
def test_content_negotiation(accept: str | None, html: bool) -> None:
    request = SimpleNamespace(getHeader=lambda name: None if accept is None else accept.encode())
    assert status_page.wants_html(request) is html


@pytest_twisted.ensureDeferred
async def test_browsers_get_the_page_api_clients_json(h: Harness) -> None:
    await traffic(h)
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"}):
        r = await h.get("/", headers)
        assert r.status == 200 and r.header("Content-Type") == "application/json", headers
        assert r.json()["name"] == "sparkcache" and r.header("Vary") == "Accept"
    page = await h.get("/", {"Accept": BROWSER})
    assert page.status == 200 and page.header("Content-Type") == "text/html; charset=utf-8"
    assert page.header("Vary") == "Accept"
    csp = page.header("Content-Security-Policy") or ""
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    text = page.body.decode()
    # No external asset: every src/href is relative to the daemon.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert 'id="hit-ratio" data-field="totals.hit_ratio" data-kind="ratio"' in text
    assert re.search(r'id="bytes-cache"[^>]*data-value="1000">1000 B<', text)
    assert re.search(r'id="bytes-upstream"[^>]*data-value="4000">3.9 KiB<', text)
    assert '<tr data-row="files">' in text and "HTTP 503 from http://upstream.test (now)" in text
    head = await h.head("/", {"Accept": BROWSER})
    assert head.status == 200 and head.body == b""


@pytest_twisted.ensureDeferred
async def test_the_page_and_status_json_need_read_access(harness_factory: MakeHarness) -> None:
    token = "st-read-9a1f"
    h = await harness_factory({**CONFIG, "auth": {"anonymous_read": False,
                                                  "tokens": [{"name": "r", "token": token, "scopes": ["read"]}]}})
    assert (await h.get("/", {"Accept": BROWSER})).status == 401
    assert (await h.get("/status.json")).status == 401
    assert (await h.get("/status.json", {"Authorization": f"Bearer {token}"})).status == 200
    assert (await h.get("/")).status == 200  # the JSON index stays as it was
    assert (await h.get("/ready")).status == 200  # probes carry no token


def hostile_snapshot() -> dict[str, Any]:
    evil = '<script>alert("x")</script>&"\''
    outcome = {"state": "failing", "last_success": None, "last_failure": 90.0, "last_error": evil}
    totals = {**Totals(requests=1, misses=1).as_json()}
    return {
        "name": "sparkcache", "version": evil, "time": 100.0, "ready": False, "not_ready": [evil],
        "totals": totals, "store": {"bytes": 1, "entries": 1, "max_size": 10, "used_ratio": 0.1, "low_space": False},
        "inflight_fetches": 0,
        "remotes": [{"name": evil, "type": evil, "url": evil, "upstreams": [evil], **totals, "upstream": outcome}],
        "upstreams": [{"origin": evil, "remotes": [evil], **outcome}],
        "git": {"mirrors": [{"name": evil, "url": evil, "cloned": True, "fetching": False, "last_fetch": 90.0,
                             "last_change": None, "last_error": evil, "next_check": 130.0}], "error": None},
        "history": History().as_json(),
    }


def test_everything_from_config_and_upstreams_is_escaped() -> None:
    page = status_page.render(hostile_snapshot()).decode()
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, re.S)
    assert len(scripts) == 2  # the initial status (JSON) and the page's own script, nothing injected
    assert "alert" not in scripts[1]
    assert scripts[0].count("<") == 0 and "\\u003cscript\\u003e" in scripts[0]
    body = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    assert "<script>alert" not in body and 'alert("x")' not in body
    assert body.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&quot;&#x27;") >= 8
    # Attributes too: data-row and the readiness title.
    assert 'data-row="&lt;script&gt;' in body
    assert unescape(re.search(r'id="ready" class="badge failing" title="([^"]*)"', body)[1]).startswith("<script>")
    # Relative times against the snapshot's clock, never the wall clock.
    assert ">10s ago<" in body and ">in 30s<" in body and ">never<" in body


@pytest_twisted.ensureDeferred
async def test_ready_says_why_not(h: Harness, tmp_path: Path) -> None:
    ok = await h.get("/ready")
    assert ok.status == 200 and ok.json() == {"status": "ready", "ready": True, "reasons": []}
    assert (await h.head("/ready")).status == 200
    # A floor no disk reaches, so that a free-space check finishing in the I/O
    # pool meanwhile (start-up, the eviction tick) agrees instead of resetting it.
    h.store.min_free, floor = 1 << 62, h.store.min_free
    h.store.low_space = True
    low = await h.get("/ready")
    assert low.status == 503 and low.header("Content-Type") == "application/json"
    assert low.json()["ready"] is False
    assert low.json()["reasons"] == [f"free disk space in {h.store.data_dir} is below storage.min_free"]
    assert (await h.get("/health")).status == 200  # liveness is another question
    assert (await h.get("/status.json")).json()["store"]["low_space"] is True
    h.store.min_free = floor
    h.store.low_space = False
    assert (await h.get("/ready")).status == 200

    # Before the store is open and the listeners are up (a service built, not started).
    cold = Harness(tmp_path / "cold", CONFIG)
    r = await cold.get("/ready")
    assert r.status == 503 and r.json()["reasons"] == ["store not open yet", "listeners not up yet"]
    assert (await cold.get("/health")).status == 200


@pytest_twisted.ensureDeferred
async def test_not_ready_while_stopping(harness_factory: MakeHarness) -> None:
    h = await harness_factory(CONFIG)
    h.svc.status.stopping = True
    r = await h.get("/ready")
    assert r.status == 503 and r.json()["reasons"] == ["shutting down"]


@pytest_twisted.ensureDeferred
async def test_git_mirrors_show_their_last_fetch_and_error(harness_factory: MakeHarness, tmp_path: Path) -> None:
    good = FileUpstream(tmp_path / "good")
    gone = FileUpstream(tmp_path / "gone")
    h = await harness_factory({**CONFIG, "git": {"repos": {"good": good.url, "gone": gone.url}}})
    mirrors = h.svc.runtime.getServiceNamed("git").mirrors
    for name in ("good", "gone"):
        await mirrors.ensure(mirrors.lookup(name))
    shutil.rmtree(gone.bare)
    h.clock.advance(7)
    failed_at = h.clock.seconds()
    with pytest.raises(Exception):
        await mirrors.refresh(mirrors.lookup("gone"), False)
    doc = (await h.get("/status.json")).json()
    rows = {m["name"]: m for m in doc["git"]["mirrors"]}
    assert rows["good"]["url"] == good.url and rows["good"]["last_error"] is None
    assert rows["good"]["last_fetch"] is not None and rows["good"]["cloned"] is True
    # (the fetch loop, on the same clock, may have checked it again since: never earlier)
    assert rows["gone"]["last_fetch"] >= failed_at and "gone" in rows["gone"]["last_error"]
    page = (await h.get("/", {"Accept": BROWSER})).body.decode()
    row = re.search(r'<tr data-row="gone">(.*?)</tr>', page)
    assert row is not None and "gone" in row[1] and 'data-key="last_fetch" data-value="1' in row[1]
