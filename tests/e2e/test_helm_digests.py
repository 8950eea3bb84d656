"""Helm repositories: a chart archive listed in a cached index.yaml with a
``digest:`` is verified against it. Bytes that do not match are never cached
and never reach a client as a complete body; matching ones are cached."""

from __future__ import annotations

import http.client

import yaml

from tests.support.client import assert_json_error, eventually, get_until_hit, sha256


def helm_index(*charts: tuple[str, str, bytes, str]) -> bytes:
    """An index.yaml as a repository tool writes one: (name, version, archive, URL) each."""
    entries = {name: [{"name": name, "version": version, "digest": sha256(archive), "urls": [url]}]
               for name, version, archive, url in charts}
    return yaml.safe_dump({"apiVersion": "v1", "entries": entries}).encode()


def test_chart_not_matching_index_digest_is_refused_and_not_cached(upstream, daemon_factory):
    good = b"\x1f\x8b the chart the index describes" * 2000
    tampered = b"\x1f\x8b a chart swapped under the index" * 2000
    rel = b"\x1f\x8b relative chart" * 50
    index = helm_index(("demo", "1.0.0", good, f"{upstream.base_url}/charts/demo-1.0.0.tgz"),
                       ("rel", "0.1.0", rel, "rel-0.1.0.tgz"))
    upstream.add("/index.yaml", index, content_type="application/x-yaml")
    upstream.add("/charts/demo-1.0.0.tgz", tampered, content_type="application/gzip")
    upstream.add("/rel-0.1.0.tgz", rel, content_type="application/gzip")
    d = daemon_factory({"charts": {"type": "helm", "upstream": upstream.base_url}})

    resp = d.get("/api/charts/index.yaml")
    assert resp.status == 200, resp.describe()
    assert f"- {d.base_url}/api/charts/charts/demo-1.0.0.tgz" in resp.body.decode()

    chart = "/api/charts/charts/demo-1.0.0.tgz"
    try:
        resp = d.get(chart)
    except (http.client.IncompleteRead, ConnectionError):
        pass  # aborted after the headers: a client never sees a clean end of unverified bytes
    else:
        assert_json_error(resp, 502)  # refused before any byte was sent
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
