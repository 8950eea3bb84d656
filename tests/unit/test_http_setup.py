"""``/setup/<kind>`` over in-memory HTTP through the daemon's real root: the snippets
protocols add (OCI: containerd, rke2, docker) and the registry token endpoint."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted

from tests.support.client import assert_json_error, basic, bearer
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

READ = "rd-91aa5e"
TOKENS = [{"name": "r", "token": READ, "scopes": ["read"]}]
CONFIG: dict[str, Any] = {
    "auth": {"anonymous_read": True, "tokens": TOKENS},
    "remotes": {"hub": {"type": "oci", "upstream": UPSTREAM, "registries": ["docker.io"]},
                "gh": {"type": "oci", "upstream": UPSTREAM, "registries": ["ghcr.io"]}},
}


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


@pytest_twisted.ensureDeferred
async def test_snippets_point_nodes_at_this_cache(h: Harness) -> None:
    toml = await h.get("/setup/containerd?registry=ghcr.io")
    assert toml.status == 200 and toml.header("Content-Type") == "application/toml; charset=utf-8"
    assert toml.header("X-Install-Path") == "/etc/containerd/certs.d/ghcr.io/hosts.toml"
    assert '[host."http://cache.test"]' in toml.body.decode() and 'server = "https://ghcr.io"' in toml.body.decode()
    rke2 = (await h.get("/setup/rke2")).body.decode()
    assert '"docker.io":' in rke2 and '"^(.*)$": "hub/$1"' in rke2 and '"^(.*)$": "gh/$1"' in rke2
    docker = await h.get("/setup/docker")
    assert json.loads(docker.body) == {"registry-mirrors": ["http://cache.test"], "insecure-registries": ["cache.test"]}
    head = await h.head("/setup/docker")
    assert head.status == 200 and head.body == b"" and head.header("Content-Length") == str(len(docker.body))


@pytest_twisted.ensureDeferred
async def test_snippets_use_the_public_url(harness_factory: MakeHarness) -> None:
    h = await harness_factory({**CONFIG, "server": {"public_url": "https://cache.example:8443"}})
    toml = await h.get("/setup/containerd?registry=docker.io")
    assert '[host."https://cache.example:8443"]' in toml.body.decode()
    assert 'server = "https://registry-1.docker.io"' in toml.body.decode()


@pytest_twisted.ensureDeferred
async def test_errors_are_json(h: Harness) -> None:
    kinds = assert_json_error(await h.get("/setup/"), 404)
    assert "containerd, docker, rke2" in kinds["error"]
    assert_json_error(await h.get("/setup/nothing"), 404)
    assert "choose one registry" in assert_json_error(await h.get("/setup/containerd"), 400)["error"]
    assert_json_error(await h.get("/setup/containerd?registry=quay.io"), 404)
    assert_json_error(await h.get("/setup/docker?registry=ghcr.io"), 404)
    posted = await h.post("/setup/containerd?registry=docker.io")
    assert_json_error(posted, 405)
    assert posted.header("Allow") == "GET, HEAD"


@pytest_twisted.ensureDeferred
async def test_without_oci_remotes_there_is_nothing_to_set_up(harness_factory: MakeHarness) -> None:
    h = await harness_factory({"remotes": {"files": {"type": "generic", "upstream": UPSTREAM}}})
    assert "none" in assert_json_error(await h.get("/setup/"), 404)["error"]
    assert_json_error(await h.get("/setup/containerd?registry=docker.io"), 404)
    assert_json_error(await h.get("/setup/token"), 404)


@pytest_twisted.ensureDeferred
async def test_snippets_need_the_read_scope_when_anonymous_reads_are_off(harness_factory: MakeHarness) -> None:
    h = await harness_factory({**CONFIG, "auth": {"anonymous_read": False, "tokens": TOKENS}})
    assert_json_error(await h.get("/setup/rke2"), 401)
    assert (await h.get("/setup/rke2", bearer(READ))).status == 200


@pytest_twisted.ensureDeferred
async def test_the_token_endpoint_hands_back_what_the_client_may_use(h: Harness, harness_factory: MakeHarness) -> None:
    anonymous = await h.get("/setup/token")
    assert anonymous.status == 200 and anonymous.json()["token"] == "anonymous"
    assert anonymous.header("Cache-Control") == "no-store"
    assert (await h.get("/setup/token", basic("ci", READ))).json()["token"] == READ
    form = await h.post("/setup/token", f"grant_type=password&username=ci&password={READ}".encode(),
                        {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    assert form.status == 200 and form.json()["access_token"] == READ
    wrong = await h.get("/setup/token", basic("ci", "wrong"))
    assert_json_error(wrong, 401)
    assert wrong.header("WWW-Authenticate") == 'Basic realm="sparkcache"'
    closed = await harness_factory({**CONFIG, "auth": {"anonymous_read": False, "tokens": TOKENS}})
    assert_json_error(await closed.get("/setup/token"), 401)
    assert (await closed.get("/setup/token", basic("ci", READ))).json()["token"] == READ
