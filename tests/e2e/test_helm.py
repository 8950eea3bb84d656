"""Helm repositories: index.yaml chart URLs on the upstream's host are pointed
at the cache (so `helm pull` goes through it), relative ones left alone, and
the stored bytes stay upstream's."""

from __future__ import annotations

import hashlib

from tests.support.client import get_until_hit

INDEX = """apiVersion: v1
entries:
  demo:
  - name: demo
    version: 1.0.0
    urls:
    - {up}/charts/demo-1.0.0.tgz
  rel:
  - name: rel
    version: 0.1.0
    urls:
    - rel-0.1.0.tgz
  elsewhere:
  - name: elsewhere
    version: 2.0.0
    urls:
    - https://other.example/elsewhere-2.0.0.tgz
"""


def test_index_rewritten_and_chart_cached(upstream, daemon_factory):
    index = INDEX.format(up=upstream.base_url).encode()
    chart = b"\x1f\x8b fake chart bytes" * 100
    upstream.add("/index.yaml", index, content_type="application/x-yaml")
    upstream.add("/charts/demo-1.0.0.tgz", chart, content_type="application/gzip")
    d = daemon_factory({"charts": {"type": "helm", "upstream": upstream.base_url}})

    resp = d.get("/api/charts/index.yaml")
    assert resp.status == 200, resp.describe()
    text = resp.body.decode()
    assert f"- {d.base_url}/api/charts/charts/demo-1.0.0.tgz" in text
    assert "- rel-0.1.0.tgz" in text
    assert "- https://other.example/elsewhere-2.0.0.tgz" in text
    assert upstream.base_url not in text
    assert int(resp.header("Content-Length")) == len(resp.body)

    # behind a proxy that sets X-Forwarded-*, the URLs follow what clients see
    resp = d.get("/api/charts/index.yaml", headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "cache.example"})
    assert "- https://cache.example/api/charts/charts/demo-1.0.0.tgz" in resp.body.decode()
    assert resp.header("X-Cache") == "HIT"

    # the stored body is upstream's exactly (listing shows its digest)
    listing = d.get("/api/charts/").json()
    digests = {e["path"]: e["digest"] for e in listing["entries"]}
    assert digests["index.yaml"] == hashlib.sha256(index).hexdigest()

    # the rewritten chart URL works and is cached
    url_path = "/api/charts/charts/demo-1.0.0.tgz"
    first = d.get(url_path)
    assert first.status == 200 and first.body == chart
    get_until_hit(d, url_path, chart)
    assert upstream.count("/charts/demo-1.0.0.tgz") == 1
