"""Helm repositories: a chart archive listed in a cached index.yaml with a
``digest:`` is verified against it. Bytes that do not match are never cached
and never reach a client as a complete body; matching ones are cached."""

from __future__ import annotations

import http.client

from tests.support.client import Response, assert_json_error, eventually, get_until_hit, sha256

INDEX = """apiVersion: v1
entries:
  demo:
  - name: demo
    version: 1.0.0
    digest: {demo}
    urls:
    - {up}/charts/demo-1.0.0.tgz
  rel:
  - name: rel
    version: 0.1.0
    digest: {rel}
    urls:
    - rel-0.1.0.tgz
"""


def _get_no_complete_body(port: int, path: str) -> BaseException | Response:
    """GET ``path``: a read error or an error status, never a complete 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        try:
            body = resp.read()
        except (http.client.IncompleteRead, ConnectionError) as e:
            return e
        result = Response(resp.status, resp.headers, body)
        assert resp.status >= 500, f"a chart not matching its index digest was served:\n{result.describe()}"
        return result
    finally:
        conn.close()


def test_chart_not_matching_index_digest_is_refused_and_not_cached(upstream, daemon_factory):
    good = b"\x1f\x8b the chart the index describes" * 2000
    tampered = b"\x1f\x8b a chart swapped under the index" * 2000
    rel = b"\x1f\x8b relative chart" * 50
    index = INDEX.format(up=upstream.base_url, demo=sha256(good), rel=sha256(rel)).encode()
    upstream.add("/index.yaml", index, content_type="application/x-yaml")
    upstream.add("/charts/demo-1.0.0.tgz", tampered, content_type="application/gzip")
    upstream.add("/rel-0.1.0.tgz", rel, content_type="application/gzip")
    d = daemon_factory({"charts": {"type": "helm", "upstream": upstream.base_url}})

    resp = d.get("/api/charts/index.yaml")
    assert resp.status == 200, resp.describe()
    assert f"- {d.base_url}/api/charts/charts/demo-1.0.0.tgz" in resp.body.decode()

    chart = "/api/charts/charts/demo-1.0.0.tgz"
    outcome = _get_no_complete_body(d.port, chart)
    if isinstance(outcome, http.client.IncompleteRead):
        assert len(outcome.partial) < len(tampered)
    elif isinstance(outcome, Response):
        assert_json_error(outcome, 502)
    eventually(lambda: d.spool_files() == [], message="spool file of the refused chart not removed")
    listing = d.get("/api/charts/").json()
    assert "charts/demo-1.0.0.tgz" not in {e["path"] for e in listing["entries"]}, listing

    # Nothing was kept: once upstream serves the right bytes, they are fetched, verified and cached.
    upstream.add("/charts/demo-1.0.0.tgz", good, content_type="application/gzip")
    resp = d.get(chart)
    assert resp.status == 200 and resp.header("X-Cache") == "MISS", resp.describe()
    assert sha256(resp.body) == sha256(good)
    get_until_hit(d, chart, good)
    assert upstream.count("/charts/demo-1.0.0.tgz") == 2, upstream.describe()

    # A chart listed by a relative URL, with a matching digest, is served and cached.
    get_until_hit(d, "/api/charts/rel-0.1.0.tgz", rel)
    assert upstream.count("/rel-0.1.0.tgz") == 1, upstream.describe()
    digests = {e["path"]: e["digest"] for e in d.get("/api/charts/").json()["entries"]}
    assert digests["charts/demo-1.0.0.tgz"] == sha256(good)
    assert digests["index.yaml"] == sha256(index)  # the store keeps upstream's index bytes
