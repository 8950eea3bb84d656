"""Hostile Maven coordinates against the real daemon, sent byte for byte: a
JSON 4xx, no request upstream, nothing stored, nothing written outside the
data dir; and HEAD/GET of a real file still work afterwards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.client import raw_request

HOSTILE = [
    b"/maven/central/org/../../../etc/passwd",
    b"/maven/central/org/%2e%2e/%2e%2e/escape.jar",
    b"/maven/central/org/%2E%2E%2Fescape.jar",
    b"/maven/central/org/x%00.jar",
    b"/maven/central/org/x%0d%0aSet-Cookie:%20a=b.jar",
    b"/maven/central/org/x\\..\\y.jar",
    b"/maven/central/org/%7Eroot/y.jar",
    b"/maven/central/" + b"a" * 300 + b"/x.jar",
    b"/maven/central/" + b"a/" * 3000 + b"x.jar",
]


@pytest.fixture
def served(upstream: Any, daemon_factory: Any) -> Any:
    upstream.add("/org/example/lib/1.0/lib-1.0.jar", b"PK a jar", content_type="application/java-archive")
    return daemon_factory({"central": {"type": "maven", "upstream": upstream.base_url}}), upstream


def files_under(root: Path) -> set[str]:
    return {str(Path(d, f)) for d, _, fs in os.walk(root) for f in fs}


def test_hostile_paths_are_refused_and_nothing_is_kept(served: Any, tmp_path: Path) -> None:
    d, upstream = served
    before = files_under(tmp_path)
    for path in HOSTILE:
        resp = raw_request(d.port, b"GET " + path + b" HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n\r\n")
        assert 400 <= resp.status < 500, (path[:80], resp.status, resp.body[:200])
        assert resp.headers.get("Content-Type") == "application/json", path[:80]
        assert b"Set-Cookie" not in b"".join(f"{k}: {v}".encode() for k, v in resp.headers.items())
    assert upstream.total() == 0
    new = {f for f in files_under(tmp_path) - before if not f.startswith(str(d.dir))}
    assert new == set(), new
    # The daemon is unharmed and serves real files, HEAD and GET.
    head = d.head("/maven/central/org/example/lib/1.0/lib-1.0.jar")
    assert head.status == 200 and head.body == b""
    get = d.get("/maven/central/org/example/lib/1.0/lib-1.0.jar")
    assert get.status == 200 and get.body == b"PK a jar"
