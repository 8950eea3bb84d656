"""The PyPI app in memory: pages in both forms from an HTML-only and a JSON
upstream, links rewritten, files verified against the page, freshness,
names, and errors."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from sparkcache.protocols.pypi.pages import HTML_TYPE, JSON_TYPE
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.memory_upstream import MemoryUpstream
from tests.support.pypi_packages import Dist, html_page, json_page, sdist, sha256, wheel

PIP_ACCEPT = f"{JSON_TYPE}, {HTML_TYPE}; q=0.1, text/html; q=0.01"


class NegotiatingUpstream(MemoryUpstream):
    """A memory upstream that answers JSON pages to clients asking for them (PEP 691)."""

    def __init__(self) -> None:
        super().__init__()
        self.json_pages: dict[str, bytes] = {}

    def _answer(self, request: Any, rec: Any, b: Any, gate: Any, paused: Any) -> Any:
        page = self.json_pages.get(rec.path)
        if page is None or "json" not in rec.headers.get("accept", ""):
            return super()._answer(request, rec, b, gate, paused)
        saved = self.files
        self.files = dict(saved)
        try:
            self.add(rec.path, page, JSON_TYPE, etag='"json-' + sha256(page)[:16] + '"')
            return super()._answer(request, rec, b, gate, paused)
        finally:
            self.files = saved


def publish(up: MemoryUpstream, project: str, dists: list[Dist], links: str = "absolute",
            json_too: bool = False) -> None:
    """``project`` on ``up``: its page at /simple/<project>/, files under /packages/."""
    def href(d: Dist) -> str:
        if links == "absolute":
            return f"{UPSTREAM}/packages/{d.filename}"
        if links == "root":
            return f"/packages/{d.filename}"
        return f"../../packages/{d.filename}"

    up.add(f"/simple/{project}/", html_page(project, dists, href), "text/html")
    if json_too:
        assert isinstance(up, NegotiatingUpstream)
        up.json_pages[f"/simple/{project}/"] = json_page(project, dists, href)
    for d in dists:
        up.add(f"/packages/{d.filename}", d.data)
        if d.metadata is not None:
            up.add(f"/packages/{d.filename}.metadata", d.metadata)


CONFIG = {"remotes": {"py": {"type": "pypi", "upstream": f"{UPSTREAM}/simple"}}}


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG, upstream=NegotiatingUpstream()))


def files_of(page: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["filename"]: f for f in page["files"]}


@pytest_twisted.ensureDeferred
async def test_html_upstream_served_as_html_and_json(h: Harness) -> None:
    a1, a2 = wheel("demo", "1.0", requires_python=">=3.8"), wheel("demo", "2.0", yanked="broken build")
    src = sdist("demo", "1.0")
    publish(h.upstream, "demo", [a1, a2, src], links="relative")

    resp = await h.get("/pypi/py/simple/demo/", {"Accept": PIP_ACCEPT})
    assert resp.status == 200, resp.describe()
    assert resp.header("Content-Type") == JSON_TYPE and resp.header("Vary") == "Accept"
    page = resp.json()
    assert page["meta"]["api-version"] == "1.0" and page["name"] == "demo"
    f = files_of(page)
    assert f[a1.filename]["url"] == f"http://cache.test/pypi/py/files/demo/{a1.filename}"
    assert f[a1.filename]["hashes"] == {"sha256": a1.sha256}
    assert f[a1.filename]["requires-python"] == ">=3.8"
    assert f[a1.filename]["core-metadata"] == {"sha256": sha256(a1.metadata or b"")}
    assert "dist-info-metadata" not in f[a1.filename]
    assert f[a2.filename]["yanked"] == "broken build"
    assert "core-metadata" not in f[src.filename]
    # The JSON entry was asked of upstream as JSON (it had none: HTML came back, converted).
    accepts = [r.headers.get("accept", "") for r in h.upstream.requests_for("/simple/demo/")]
    assert any(a.startswith(JSON_TYPE) for a in accepts)

    html = await h.get("/pypi/py/simple/demo/", {"Accept": "text/html"})
    assert html.status == 200 and html.header("Content-Type").startswith("text/html")
    text = html.body.decode()
    assert f'href="http://cache.test/pypi/py/files/demo/{a1.filename}#sha256={a1.sha256}"' in text
    assert 'data-requires-python="&gt;=3.8"' in text
    assert 'data-yanked="broken build"' in text
    meta = sha256(a1.metadata or b"")
    assert f'data-core-metadata="sha256={meta}"' in text and f'data-dist-info-metadata="sha256={meta}"' in text
    assert UPSTREAM not in text
    # Two entries, one per form, each fetched once; the new HTML body had the
    # JSON one revalidated with it (refreshed together: a conditional request).
    await h.settle()
    asked = h.upstream.requests_for("/simple/demo/")
    assert len(asked) == 3 and asked[2].headers.get("if-none-match")
    again = await h.get("/pypi/py/simple/demo/", {"Accept": "text/html"})
    assert again.body == html.body and again.header("X-Cache") == "HIT"
    assert h.upstream.count("/simple/demo/") == 3


@pytest_twisted.ensureDeferred
async def test_json_upstream_keeps_its_keys(h: Harness) -> None:
    a1 = wheel("Json_Thing", "1.0")
    publish(h.upstream, "json-thing", [a1], json_too=True)
    resp = await h.get("/pypi/py/simple/json-thing/", {"Accept": JSON_TYPE})
    assert resp.status == 200, resp.describe()
    page = resp.json()
    assert page["meta"]["api-version"] == "1.1" and page["versions"] == ["1.0"]
    f = files_of(page)[a1.filename]
    assert f["size"] == len(a1.data) and f["upload-time"] == "2024-01-02T03:04:05.000000Z"
    assert f["url"].startswith("http://cache.test/pypi/py/files/json-thing/")
    # The HTML form, from upstream's HTML.
    html = await h.get("/pypi/py/simple/json-thing/")
    assert html.status == 200 and html.header("Content-Type").startswith("text/html")


@pytest_twisted.ensureDeferred
async def test_files_verified_and_cached(h: Harness) -> None:
    good = wheel("demo", "1.0")
    publish(h.upstream, "demo", [good])
    await h.get("/pypi/py/simple/demo/", {"Accept": PIP_ACCEPT})
    url = f"/pypi/py/files/demo/{good.filename}"
    resp = await h.get(url)
    assert resp.status == 200 and resp.body == good.data
    assert "immutable" in resp.header("Cache-Control")
    meta = await h.get(url + ".metadata")
    assert meta.status == 200 and meta.body == good.metadata
    await h.settle()
    h.upstream.clear()
    h.upstream.files.clear()
    again = await h.get(url)
    assert again.status == 200 and again.body == good.data and again.header("X-Cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_tampered_file_refused_and_not_kept(h: Harness) -> None:
    good = wheel("demo", "1.0")
    publish(h.upstream, "demo", [good])
    h.upstream.add(f"/packages/{good.filename}", good.data[:-1] + b"X")
    url = f"/pypi/py/files/demo/{good.filename}"
    resp = await h.get(url)
    assert resp.status != 200 or resp.body != good.data
    await h.settle()
    assert await h.store.index.get(f"py:files/demo/{good.filename}") is None
    h.upstream.add(f"/packages/{good.filename}", good.data)
    resp = await h.get(url)
    assert resp.status == 200 and resp.body == good.data


@pytest_twisted.ensureDeferred
async def test_unlisted_file_never_fetched(h: Harness) -> None:
    publish(h.upstream, "demo", [wheel("demo", "1.0")])
    h.upstream.add("/packages/demo-9.0-py3-none-any.whl", b"made up")
    resp = await h.get("/pypi/py/files/demo/demo-9.0-py3-none-any.whl")
    assert resp.status == 404 and resp.json()["error"]
    assert h.upstream.count("/packages/demo-9.0-py3-none-any.whl") == 0


@pytest_twisted.ensureDeferred
async def test_names_normalized_and_bad_input(h: Harness) -> None:
    resp = await h.get("/pypi/py/simple/Demo_Thing/")
    assert resp.status == 301 and resp.header("Location") == "http://cache.test/pypi/py/simple/demo-thing/"
    resp = await h.get("/pypi/py/simple/demo")
    assert resp.status == 301 and resp.header("Location").endswith("/pypi/py/simple/demo/")
    resp = await h.get("/pypi/py/simple/Demo/?format=application/vnd.pypi.simple.v1%2Bjson")
    assert resp.header("Location").endswith("/pypi/py/simple/demo/?format=application/vnd.pypi.simple.v1%2Bjson")
    for bad in ("/pypi/py/simple/-bad-/", "/pypi/py/simple/a%2fb/", "/pypi/py/simple/../x/",
                "/pypi/py/files/demo/..%2f..%2fetc", "/pypi/py/files/demo/.hidden", "/pypi/nope/simple/"):
        resp = await h.get(bad)
        assert 400 <= resp.status < 500, (bad, resp.describe())
        assert resp.header("Content-Type") == "application/json", bad
    resp = await h.get("/pypi/py/simple/demo/", {"Accept": "image/png"})
    assert resp.status == 406
    assert h.upstream.total() == 0


@pytest_twisted.ensureDeferred
async def test_unknown_project_negatively_cached(h: Harness) -> None:
    resp = await h.get("/pypi/py/simple/nothing/")
    assert resp.status == 404 and resp.json()["error"]
    await h.get("/pypi/py/simple/nothing/")
    assert h.upstream.count("/simple/nothing/") == 1
    h.clock.advance(3600)
    await h.get("/pypi/py/simple/nothing/")
    assert h.upstream.count("/simple/nothing/") == 2


@pytest_twisted.ensureDeferred
async def test_pages_revalidate_and_go_stale(h: Harness) -> None:
    publish(h.upstream, "demo", [wheel("demo", "1.0")])
    first = await h.get("/pypi/py/simple/demo/")
    assert first.status == 200
    h.clock.advance(601)
    resp = await h.get("/pypi/py/simple/demo/")
    assert resp.header("X-Cache") == "REVALIDATED" and resp.body == first.body
    assert h.upstream.requests_for("/simple/demo/")[-1].headers.get("if-none-match")
    h.clock.advance(601)
    h.upstream.behave("/simple/demo/", status=503)
    resp = await h.get("/pypi/py/simple/demo/")
    assert resp.status == 200 and resp.header("X-Cache") == "STALE"
    h.upstream.behave("/simple/demo/", status=429)
    resp = await h.get("/pypi/py/simple/demo/")
    assert resp.status == 200 and resp.header("X-Cache") == "STALE"


@pytest_twisted.ensureDeferred
async def test_a_page_that_is_not_a_page_is_never_kept(h: Harness) -> None:
    publish(h.upstream, "demo", [wheel("demo", "1.0")])
    h.upstream.add("/simple/broken/", b"\x00\x01 not html", "text/html")
    resp = await h.get("/pypi/py/simple/broken/")
    assert resp.status == 502 and "not" in resp.json()["error"]
    assert await h.store.index.get("py:simple/broken/") is None
    h.upstream.add("/simple/junk/", b'{"files": 3}', "application/json")
    resp = await h.get("/pypi/py/simple/junk/", {"Accept": JSON_TYPE})
    assert resp.status == 502
    # A good page, later turned to junk: the good one is served stale.
    good = await h.get("/pypi/py/simple/demo/")
    h.clock.advance(601)
    h.upstream.add("/simple/demo/", b"<<<>>> \x00", "text/html")
    resp = await h.get("/pypi/py/simple/demo/")
    assert resp.status == 200 and resp.body == good.body and resp.header("X-Cache") == "STALE"


@pytest_twisted.ensureDeferred
async def test_root_index_streamed_as_stored(h: Harness) -> None:
    root = b'<!DOCTYPE html><html><body><a href="demo/">demo</a></body></html>'
    h.upstream.add("/simple/", root, "text/html")
    resp = await h.get("/pypi/py/simple/")
    assert resp.status == 200 and resp.body == root and resp.header("Vary") == "Accept"
    resp = await h.get("/pypi/py/simple")
    assert resp.status == 301


@pytest_twisted.ensureDeferred
async def test_metrics_per_form(h: Harness) -> None:
    publish(h.upstream, "demo", [wheel("demo", "1.0")])
    await h.get("/pypi/py/simple/demo/")
    await h.get("/pypi/py/simple/demo/")
    text = (await h.get("/metrics")).body.decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("sparkcache_registry_requests") and 'form="page"' in ln]
    assert any('result="miss"' in ln for ln in lines) and any('result="hit"' in ln for ln in lines), lines



@pytest_twisted.ensureDeferred
async def test_both_forms_refreshed_together(h: Harness) -> None:
    one, two = wheel("demo", "1.0"), wheel("demo", "2.0")
    publish(h.upstream, "demo", [one], json_too=True)
    assert (await h.get("/pypi/py/simple/demo/", {"Accept": JSON_TYPE})).status == 200
    assert two.filename not in (await h.get("/pypi/py/simple/demo/")).body.decode()
    await h.settle()
    # Upstream publishes 2.0; once the JSON page is fetched again, the HTML one follows at once.
    h.clock.advance(601)
    publish(h.upstream, "demo", [one, two], json_too=True)
    page = (await h.get("/pypi/py/simple/demo/", {"Accept": JSON_TYPE})).json()
    assert two.filename in files_of(page)
    await h.settle()
    html = await h.get("/pypi/py/simple/demo/")
    assert html.header("X-Cache") == "HIT" and two.filename in html.body.decode()


@pytest_twisted.ensureDeferred
async def test_credentials_go_to_the_index_host_only(harness_factory: MakeHarness) -> None:
    config = {"remotes": {"py": {"type": "pypi", "upstream": f"{UPSTREAM}/simple",
                                 "credentials": {"username": "u", "password": "p"}}}}
    h = await harness_factory(config)
    here, there = wheel("demo", "1.0"), wheel("demo", "2.0")
    links = {here.filename: f"{UPSTREAM}/packages/{here.filename}",
             there.filename: f"http://files.test/packages/{there.filename}"}
    h.upstream.add("/simple/demo/", html_page("demo", [here, there], lambda d: links[d.filename]), "text/html")
    for d in (here, there):
        h.upstream.add(f"/packages/{d.filename}", d.data)
    assert (await h.get("/pypi/py/simple/demo/")).status == 200
    assert (await h.get(f"/pypi/py/files/demo/{here.filename}")).body == here.data
    assert (await h.get(f"/pypi/py/files/demo/{there.filename}")).body == there.data
    auth = {r.path: r.headers.get("authorization") for r in h.upstream.requests}
    assert auth["/simple/demo/"] and auth["/simple/demo/"].startswith("Basic ")
    assert auth[f"/packages/{here.filename}"] == auth["/simple/demo/"]
    file_host = h.upstream.requests_for(f"/packages/{there.filename}")[0]
    assert file_host.headers.get("host") == "files.test" and "authorization" not in file_host.headers


@pytest_twisted.ensureDeferred
async def test_upstream_list_falls_back_in_order(harness_factory: MakeHarness) -> None:
    config = {"remotes": {"py": {"type": "pypi", "upstream": [f"{UPSTREAM}/one", f"{UPSTREAM}/two"]}}}
    h = await harness_factory(config)
    w = wheel("demo", "1.0")
    for root in ("/one", "/two"):
        h.upstream.add(f"{root}/demo/", html_page("demo", [w], lambda d: f"../../files/{d.filename}"), "text/html")
    h.upstream.add(f"/files/{w.filename}", w.data)
    h.upstream.behave("/one/demo/", status=503)
    resp = await h.get("/pypi/py/simple/demo/")
    assert resp.status == 200 and w.filename in resp.body.decode()
    assert h.upstream.count("/one/demo/") == 1 and h.upstream.count("/two/demo/") == 1
    assert (await h.get(f"/pypi/py/files/demo/{w.filename}")).body == w.data


@pytest_twisted.ensureDeferred
async def test_oversize_upload_refused(harness_factory: MakeHarness) -> None:
    config = {"server": {"max_body_size": "64KiB"},
              "auth": {"tokens": [{"name": "ci", "token": "t0k", "scopes": ["write"]}]},
              "remotes": {"internal": {"type": "pypi-local"}}}
    h = await harness_factory(config)
    body = b"--b\r\n" + b"x" * (128 << 10)
    resp = await h.post("/pypi/internal/", body, {"Content-Type": "multipart/form-data; boundary=b",
                                                   "Authorization": "Bearer t0k"})
    assert resp.status == 413 and resp.header("Content-Type") == "application/json"
    assert await h.store.list("internal") == []


@pytest_twisted.ensureDeferred
async def test_pages_answer_conditional_requests(h: Harness) -> None:
    publish(h.upstream, "demo", [wheel("demo", "1.0")])
    first = await h.get("/pypi/py/simple/demo/", {"Accept": JSON_TYPE})
    etag = first.header("ETag")
    assert etag and first.header("Vary") == "Accept"
    again = await h.get("/pypi/py/simple/demo/", {"Accept": JSON_TYPE, "If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    html = await h.get("/pypi/py/simple/demo/", {"If-None-Match": etag})
    assert html.status == 200 and html.header("ETag") != etag
    head = await h.head("/pypi/py/simple/demo/")
    assert head.status == 200 and head.body == b"" and int(head.header("Content-Length")) == len(html.body)


@pytest_twisted.ensureDeferred
async def test_a_file_whose_page_is_unavailable_is_a_502(h: Harness) -> None:
    h.upstream.behave("/simple/demo/", status=503)
    resp = await h.get("/pypi/py/files/demo/demo-1.0-py3-none-any.whl")
    assert resp.status == 502 and resp.header("Content-Type") == "application/json"
    assert h.upstream.count("/packages/demo-1.0-py3-none-any.whl") == 0


@pytest_twisted.ensureDeferred
async def test_tampered_metadata_refused(h: Harness) -> None:
    w = wheel("demo", "1.0")
    publish(h.upstream, "demo", [w])
    h.upstream.add(f"/packages/{w.filename}.metadata", b"Metadata-Version: 2.1\nName: evil\n")
    resp = await h.get(f"/pypi/py/files/demo/{w.filename}.metadata")
    assert resp.status != 200 or resp.body != w.metadata
    await h.settle()
    assert await h.store.index.get(f"py:files/demo/{w.filename}.metadata") is None
    # A file whose page offers no metadata has none here either.
    publish(h.upstream, "plain", [Dist("plain-1.0.tar.gz", b"sdist bytes")])
    resp = await h.get("/pypi/py/files/plain/plain-1.0.tar.gz.metadata")
    assert resp.status == 404 and h.upstream.count("/packages/plain-1.0.tar.gz.metadata") == 0


@pytest_twisted.ensureDeferred
async def test_index_remote_hooks_name_the_digests(h: Harness) -> None:
    w = wheel("demo", "1.0")
    publish(h.upstream, "demo", [w], links="root")
    assert (await h.get("/pypi/py/simple/demo/", {"Accept": JSON_TYPE})).status == 200
    index = h.app(b"pypi").indexes["py"]
    # The IndexRemote base finds them through indexes_listing/key/parse_digests, in either form.
    assert await index.expected_digest(f"files/demo/{w.filename}") == w.sha256
    assert await index.expected_digest(f"files/demo/{w.filename}.metadata") == sha256(w.metadata or b"")
    assert await index.expected_digest("files/demo/other-1.0.tar.gz") is None
