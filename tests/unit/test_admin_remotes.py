"""``/admin/remotes`` and live reconfiguration, over the daemon's real root in memory.

A remote given through the API meets exactly the file's checks (the same
messages, as JSON 400s), a remote the file defines is the file's (409), an
added remote serves at once, even of a protocol nothing was mounted for, a
deleted one stops, and the set survives in ``<data_dir>/remotes.d/api.json``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml

from sparkcache.config import ConfigError, RemoteConfig
from sparkcache.protocols import load_config_data
from sparkcache.store.settings import api_remotes_path, read_api_remotes
from tests.support.client import assert_json_error, bearer
from tests.support.harness import UPSTREAM, Harness, MakeHarness, app_of, harness_factory  # noqa: F401

READ, ADMIN = "rd-41d2c0de", "ad-77aa01e5"
CONFIG: dict[str, Any] = {
    "auth": {"anonymous_read": True, "tokens": [{"name": "r", "token": READ, "scopes": ["read"]},
                                                {"name": "a", "token": ADMIN, "scopes": ["admin"]}]},
    "remotes": {"files": {"type": "generic", "upstream": UPSTREAM}},
}
AS_ADMIN = {**bearer(ADMIN), "Content-Type": "application/json"}


def file_data(h: Harness, config: dict[str, Any] | None = None) -> dict[str, Any]:
    data = copy.deepcopy(config or CONFIG)
    data["storage"] = {"data_dir": h.store.data_dir}
    data["server"] = {"sendfile": False, "shutdown_timeout": "5s"}
    return data


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    h: Harness = pytest_twisted.blockon(harness_factory(CONFIG))
    # As if started from cache.yaml (the harness hands the daemon a Config).
    h.svc.live.use_file_data(file_data(h), "cache.yaml")
    return h


def put(h: Harness, name: str, body: Any, headers: dict[str, str] = AS_ADMIN) -> Any:
    return h.put(f"/admin/remotes/{name}", json.dumps(body).encode(), headers)


@pytest_twisted.ensureDeferred
async def test_a_bad_key_is_refused_with_the_file_loaders_words(h: Harness) -> None:
    body = {"type": "generic", "upstream": UPSTREAM, "colour": "blue"}
    with pytest.raises(ConfigError) as loaded:
        load_config_data({"remotes": {"extra": body}}, "cache.yaml", {})
    resp = await put(h, "extra", body)
    doc = assert_json_error(resp, 400)
    assert doc["error"] == f"{loaded.value.path}: {loaded.value.problem}"
    assert str(loaded.value) == f"cache.yaml: {doc['error']}"
    # Nothing applied, nothing persisted.
    assert "extra" not in h.ctx.config.remotes
    assert not os.path.exists(api_remotes_path(h.store.data_dir))
    for bad in ({"type": "nope", "upstream": UPSTREAM}, {"type": "generic"}, {"upstream": "ftp://x"}):
        doc = assert_json_error(await put(h, "extra", bad), 400)
        assert doc["error"].startswith("remotes.extra")
    assert_json_error(await h.put("/admin/remotes/extra", b"{not json", AS_ADMIN), 400)
    assert_json_error(await put(h, "extra", ["a", "list"]), 400)
    assert_json_error(await put(h, "_x", {"type": "generic", "upstream": UPSTREAM}), 400)


@pytest_twisted.ensureDeferred
async def test_a_file_remote_cannot_be_changed_or_deleted(h: Harness) -> None:
    doc = assert_json_error(await put(h, "files", {"type": "generic", "upstream": UPSTREAM + "/other"}), 409)
    assert "cache.yaml" in doc["error"]
    doc = assert_json_error(await h.delete("/admin/remotes/files", AS_ADMIN), 409)
    assert "cache.yaml" in doc["error"]
    assert h.ctx.config.remotes["files"].upstream == UPSTREAM


@pytest_twisted.ensureDeferred
async def test_admin_scope_is_needed(h: Harness) -> None:
    assert_json_error(await h.get("/admin/remotes"), 401)
    assert_json_error(await h.get("/admin/remotes", bearer(READ)), 403)
    assert_json_error(await put(h, "x", {"upstream": UPSTREAM}, bearer(READ)), 403)
    assert_json_error(await h.delete("/admin/remotes/files", bearer(READ)), 403)


@pytest_twisted.ensureDeferred
async def test_an_added_remote_serves_at_once_and_a_deleted_one_stops(h: Harness) -> None:
    h.upstream.add("/more/a.bin", b"more" * 1000)
    assert_json_error(await h.get("/api/more/a.bin"), 404)
    resp = await put(h, "more", {"type": "generic", "upstream": UPSTREAM + "/more"})
    assert resp.status == 201, resp.describe()
    assert resp.json()["origin"] == "api" and resp.json()["url"] == "/api/more/"
    got = await h.get("/api/more/a.bin")
    assert got.status == 200 and got.body == b"more" * 1000
    listing = (await h.get("/admin/remotes", AS_ADMIN)).json()
    assert {r["name"]: r["origin"] for r in listing["remotes"]} == {"files": "file", "more": "api"}
    assert (await h.get("/admin/remotes/more", AS_ADMIN)).json()["upstream"] == UPSTREAM + "/more"
    assert read_api_remotes(h.store.data_dir) == {"more": {"type": "generic", "upstream": UPSTREAM + "/more"}}
    assert os.stat(api_remotes_path(h.store.data_dir)).st_mode & 0o777 == 0o600
    # Replacing it: 200, the new settings apply.
    resp = await put(h, "more", {"type": "generic", "upstream": UPSTREAM + "/more", "cache": {"mutable_ttl": 5}})
    assert resp.status == 200 and h.ctx.config.remotes["more"].cache.mutable_ttl == 5
    resp = await h.delete("/admin/remotes/more", AS_ADMIN)
    assert resp.status == 200 and resp.json() == {"deleted": "more"}
    assert_json_error(await h.get("/api/more/a.bin"), 404)
    assert_json_error(await h.get("/admin/remotes/more", AS_ADMIN), 404)
    assert_json_error(await h.delete("/admin/remotes/more", AS_ADMIN), 404)
    assert read_api_remotes(h.store.data_dir) == {}


@pytest_twisted.ensureDeferred
async def test_a_remote_of_a_protocol_not_mounted_at_start_is_mounted(h: Harness) -> None:
    jar = "/m2/com/example/lib/1.0/lib-1.0.jar"
    h.upstream.add(jar, b"PK" + b"j" * 500)
    assert b"maven" not in h.svc.root.apps
    resp = await put(h, "m2", {"type": "maven", "upstream": UPSTREAM + "/m2"})
    assert resp.status == 201, resp.describe()
    got = await h.get("/maven/m2/com/example/lib/1.0/lib-1.0.jar")
    assert got.status == 200 and got.body == b"PK" + b"j" * 500
    # Its /setup kind is there too.
    assert (await h.get("/setup/maven")).status == 200


@pytest_twisted.ensureDeferred
async def test_a_download_in_flight_keeps_its_remote_across_a_change(h: Harness) -> None:
    body = bytes(range(256)) * 400
    h.upstream.add("/big.bin", body)
    h.upstream.behave("/big.bin", pause_at=1000)
    pending = h.get("/api/files/big.bin")
    await h.upstream.until_paused("/big.bin")
    assert (await put(h, "more", {"type": "generic", "upstream": UPSTREAM})).status == 201
    h.upstream.resume("/big.bin")
    got = await pending
    assert got.status == 200 and got.body == body


@pytest_twisted.ensureDeferred
async def test_reload_applies_the_file_and_keeps_api_remotes(h: Harness, tmp_path: Path) -> None:
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(file_data(h)))
    h.svc.live.path = str(path)
    assert (await put(h, "api1", {"type": "generic", "upstream": UPSTREAM})).status == 201
    changed = file_data(h)
    changed["remotes"]["second"] = {"type": "generic", "upstream": UPSTREAM + "/two"}
    changed["auth"]["tokens"].append({"name": "n", "token": "new-token-9f", "scopes": ["admin"]})
    path.write_text(yaml.safe_dump(changed))
    assert await h.svc.live.reload() is True
    assert set(h.ctx.config.remotes) == {"files", "second", "api1"}
    assert (await h.get("/admin/remotes", bearer("new-token-9f"))).status == 200
    # The file now defines the API's name too: the file wins, the API entry is kept on disk.
    changed["remotes"]["api1"] = {"type": "generic", "upstream": UPSTREAM + "/file"}
    path.write_text(yaml.safe_dump(changed))
    assert await h.svc.live.reload() is True
    assert h.ctx.config.remotes["api1"].upstream == UPSTREAM + "/file"
    assert "api1" in h.svc.live.skipped and "api1" in read_api_remotes(h.store.data_dir)
    listing = (await h.get("/admin/remotes", AS_ADMIN)).json()
    assert {r["name"]: r["origin"] for r in listing["remotes"]}["api1"] == "file"
    # An invalid file changes nothing.
    path.write_text("remotes:\n  broken: {type: generic, upstream: 12}\n")
    assert await h.svc.live.reload() is False
    assert set(h.ctx.config.remotes) == {"files", "second", "api1"}
    path.write_text("remotes: [unclosed\n")
    assert await h.svc.live.reload() is False
    assert (await h.get("/api/files/x")).status in (404, 502)  # still routed to the files remote


# A remote of each type an app keeps a table of, and where that table is.
TABLES = [
    ("bazel", b"bazel", "blobs", {"type": "bazel"}),
    ("cargo", b"cargo", "indexes", {"type": "cargo", "upstream": UPSTREAM}),
    ("dagger", b"dagger", "remotes", {"type": "dagger"}),
    ("gha", b"gha", "remotes", {"type": "gha"}),
    ("kv", b"kv", "blobs", {"type": "kv"}),
    ("maven", b"maven", "remotes", {"type": "maven", "upstream": UPSTREAM}),
    ("nx", b"nx", "blobs", {"type": "nx"}),
    ("oci", b"v2", "remotes", {"type": "oci", "upstream": UPSTREAM}),
    ("pypi", b"pypi", "indexes", {"type": "pypi", "upstream": UPSTREAM}),
    ("turborepo", b"turborepo", "blobs", {"type": "turborepo"}),
    ("helm", b"api", "indexes", {"type": "helm", "upstream": UPSTREAM}),
]


@pytest.mark.parametrize("kind, segment, table, body", TABLES, ids=[t[0] for t in TABLES])
@pytest_twisted.ensureDeferred
async def test_each_app_follows_its_remotes(h: Harness, kind: str, segment: bytes, table: str,
                                            body: dict[str, Any]) -> None:
    for name in ("first", "second"):
        resp = await put(h, name, body)
        assert resp.status == 201, resp.describe()
    resource = h.svc.root.apps[segment]
    while hasattr(resource, "inner") and not hasattr(resource, "routed"):  # Remount, Guarded
        resource = resource.inner
    app = app_of(resource)
    first = getattr(app, table)["first"]
    changed = {**body, "description": "changed"}  # a key every type takes
    assert (await put(h, "second", changed)).status == 200
    tables = getattr(app, table)
    assert set(tables) == {"first", "second"}
    if isinstance(first, RemoteConfig):
        assert tables["first"] == first and tables["second"].description == "changed"
    else:
        assert tables["first"] is first, "an unchanged remote lost its object (and its state)"
    assert (await h.delete("/admin/remotes/first", AS_ADMIN)).status == 200
    assert set(getattr(app, table)) == {"second"}


def test_start_up_loads_api_remotes_and_leaves_out_the_bad_and_the_shadowed(tmp_path: Path) -> None:
    from sparkcache.protocols import load_config
    from sparkcache.reload import LiveConfig
    from sparkcache.store.settings import write_api_remotes

    data_dir = str(tmp_path / "data")
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump({"storage": {"data_dir": data_dir},
                                    "remotes": {"files": {"upstream": UPSTREAM}}}))
    write_api_remotes(data_dir, {
        "good": {"upstream": UPSTREAM},
        "files": {"upstream": UPSTREAM + "/api"},                    # the file defines it
        "gone": {"upstream": UPSTREAM, "credentials": {"password_env": "NOT_SET_HERE"}},
    })
    live = LiveConfig(str(path), {}, data_dir, apply=lambda config: None)
    config = live.start(load_config(str(path), {}))
    assert set(config.remotes) == {"files", "good"}
    assert config.remotes["files"].upstream == UPSTREAM
    assert set(live.skipped) == {"files", "gone"}
    assert "NOT_SET_HERE" in live.skipped["gone"] and "remotes.gone.credentials" in live.skipped["gone"]
    assert live.origin("good") == "api" and live.origin("files") == "file"
    # Kept on disk: a restart with the variable set brings it back.
    assert set(read_api_remotes(data_dir)) == {"good", "files", "gone"}
