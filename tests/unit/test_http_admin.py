"""The management endpoints over in-memory HTTP through the daemon's real root:
``/``, ``/health``, ``/metrics``, ``/config`` (secrets redacted) and ``/admin/purge``."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted

from tests.support.client import assert_json_error, bearer
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

READ, ADMIN = "rd-7c00ffee", "ad-5ec2e7a9"
UPSTREAM_PASSWORD = "upstream-pw-31c4"
CONFIG: dict[str, Any] = {
    "auth": {"anonymous_read": False, "tokens": [{"name": "r", "token": READ, "scopes": ["read"]},
                                                 {"name": "a", "token": ADMIN, "scopes": ["read", "write", "admin"]}]},
    "remotes": {
        "files": {"type": "generic", "upstream": UPSTREAM,
                  "credentials": {"username": "bot", "password": UPSTREAM_PASSWORD}},
        "images": {"type": "oci", "upstream": UPSTREAM, "registries": ["docker.io"]},
    },
}


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


async def cache_two_files(h: Harness) -> None:
    for name in ("a", "b"):
        h.upstream.add(f"/{name}.bin", name.encode() * 100)
        assert (await h.get(f"/api/files/{name}.bin", bearer(READ))).status == 200
    await h.settle()


@pytest_twisted.ensureDeferred
async def test_index_and_health(h: Harness) -> None:
    index = await h.get("/")
    assert index.status == 200
    remotes = {r["name"]: r for r in index.json()["remotes"]}
    assert remotes["files"]["url"] == "/api/files/" and remotes["images"]["url"] == "/v2/images/"
    await cache_two_files(h)
    health = await h.get("/health")
    assert health.status == 200 and health.header("Content-Type") == "application/json"
    doc = health.json()
    assert doc["status"] == "ok" and doc["store_entries"] == 2 and doc["store_bytes"] == 200
    assert doc["inflight_fetches"] == 0


@pytest_twisted.ensureDeferred
async def test_metrics_count_what_was_served(h: Harness) -> None:
    await cache_two_files(h)
    assert (await h.get("/api/files/a.bin", bearer(READ))).header("X-Cache") == "HIT"
    metrics = await h.get("/metrics")
    assert metrics.status == 200 and (metrics.header("Content-Type") or "").startswith("text/plain; version=0.0.4")
    text = metrics.body.decode()
    assert 'sparkcache_requests_total{remote="files",result="miss"} 2.0' in text
    assert 'sparkcache_requests_total{remote="files",result="hit"} 1.0' in text
    assert "sparkcache_store_entries 2.0" in text
    # A wrong method is a JSON error (today the catch-all's 404, where 405 would be exact).
    assert_json_error(await h.post("/metrics"), (404, 405))


@pytest_twisted.ensureDeferred
async def test_config_is_for_readers_and_redacts_secrets(h: Harness) -> None:
    assert_json_error(await h.get("/config"), 401)
    assert_json_error(await h.get("/config", bearer("nobody")), 401)
    config = await h.get("/config", bearer(READ))
    assert config.status == 200
    for secret in (READ, ADMIN, UPSTREAM_PASSWORD):
        assert secret not in config.body.decode(), secret
    doc = config.json()
    assert [t["token"] for t in doc["auth"]["tokens"]] == ["***", "***"]
    assert doc["remotes"]["files"]["upstream"] == UPSTREAM
    assert json.dumps(doc["remotes"]["files"]["credentials"]).count("***") >= 1


@pytest_twisted.ensureDeferred
async def test_purge_is_for_admins(h: Harness) -> None:
    await cache_two_files(h)
    assert_json_error(await h.post("/admin/purge"), 401)
    assert_json_error(await h.post("/admin/purge", None, bearer(READ)), 403)
    assert h.store.entries == 2
    assert_json_error(await h.post("/admin/purge?remote=nope", None, bearer(ADMIN)), 404)
    assert_json_error(await h.post("/admin/purge?path=a.bin", None, bearer(ADMIN)), 400)
    one = await h.post("/admin/purge?remote=files&path=/a.bin", None, bearer(ADMIN))
    assert one.status == 200 and one.json() == {"purged": 1}
    assert await h.store.index.get("files:a.bin") is None
    everything = await h.post("/admin/purge", None, bearer(ADMIN))
    assert everything.json() == {"purged": 1} and h.store.entries == 0
    assert_json_error(await h.get("/admin/purge", bearer(ADMIN)), (404, 405))


@pytest_twisted.ensureDeferred
async def test_unknown_management_paths_are_json_404s(h: Harness) -> None:
    for path in ("/nothing", "/admin", "/health/extra"):
        assert_json_error(await h.get(path), 404)
