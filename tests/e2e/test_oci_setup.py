"""/setup/{containerd,rke2,docker}: node configuration snippets that point at the daemon."""

from __future__ import annotations

import json
import tomllib

import pytest
import yaml

from tests.support.client import assert_json_error

REMOTES = {
    "hub": {"type": "oci", "upstream": "http://127.0.0.1:9", "registries": ["docker.io"]},
    "gh": {"type": "oci", "upstream": "http://127.0.0.1:9", "registries": ["ghcr.io", "quay.io"]},
    "loc": {"type": "oci-local"},
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from tests.support.daemon import Daemon

    d = Daemon(tmp_path_factory.mktemp("setup"), REMOTES)
    d.start()
    yield d
    d.close()


def test_containerd_hosts_toml_points_at_the_daemon(daemon):
    resp = daemon.get("/setup/containerd?registry=docker.io")
    assert resp.status == 200, resp.describe()
    assert resp.header("Content-Type").startswith("application/toml")
    assert resp.header("X-Install-Path") == "/etc/containerd/certs.d/docker.io/hosts.toml"
    doc = tomllib.loads(resp.body.decode())
    assert doc["server"] == "https://registry-1.docker.io"
    assert doc["host"] == {daemon.base_url: {"capabilities": ["pull", "resolve"]}}
    ghcr = tomllib.loads(daemon.get("/setup/containerd?registry=ghcr.io").body.decode())
    assert ghcr["server"] == "https://ghcr.io" and list(ghcr["host"]) == [daemon.base_url]


def test_containerd_mirror_host_answers_with_the_namespace(daemon):
    """What containerd will send to the host the snippet names: /v2/... with ?ns=<registry>."""
    doc = tomllib.loads(daemon.get("/setup/containerd?registry=quay.io").body.decode())
    (host,) = doc["host"]
    assert host == daemon.base_url
    resp = daemon.get("/v2/?ns=quay.io")
    assert resp.status == 200 and resp.header("Docker-Distribution-API-Version") == "registry/2.0", resp.describe()
    assert resp.header("OCI-Namespace") == "quay.io"


def test_public_url_from_forwarded_headers(daemon):
    resp = daemon.get("/setup/containerd?registry=docker.io",
                      headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "cache.ci.example"})
    assert list(tomllib.loads(resp.body.decode())["host"]) == ["https://cache.ci.example"]


def test_rke2_registries_yaml(daemon):
    resp = daemon.get("/setup/rke2")
    assert resp.status == 200, resp.describe()
    doc = yaml.safe_load(resp.body)
    assert set(doc["mirrors"]) == {"docker.io", "ghcr.io", "quay.io"}
    assert doc["mirrors"]["docker.io"] == {"endpoint": [daemon.base_url], "rewrite": {"^(.*)$": "hub/$1"}}
    assert doc["mirrors"]["quay.io"]["rewrite"] == {"^(.*)$": "gh/$1"}
    one = yaml.safe_load(daemon.get("/setup/rke2?registry=ghcr.io").body)
    assert list(one["mirrors"]) == ["ghcr.io"]


def test_docker_daemon_json(daemon):
    resp = daemon.get("/setup/docker")
    assert resp.status == 200, resp.describe()
    doc = json.loads(resp.body)
    assert doc["registry-mirrors"] == [daemon.base_url]
    assert doc["insecure-registries"] == [f"127.0.0.1:{daemon.port}"]  # plain HTTP needs it
    assert_json_error(daemon.get("/setup/docker?registry=ghcr.io"), 404)


def test_unknown_registry_lists_the_configured_ones(daemon):
    resp = daemon.get("/setup/containerd?registry=gcr.io")
    assert_json_error(resp, 404)
    assert "docker.io, ghcr.io, quay.io" in resp.json()["error"]
    assert_json_error(daemon.get("/setup/containerd"), 400)
    assert_json_error(daemon.get("/setup/podman"), 404)
