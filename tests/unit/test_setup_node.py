"""``/setup/node``: the node-local config chained to this daemon, over in-memory
HTTP through the daemon's real root. The YAML it prints must load as a config
(every remote of a type that pulls, its upstream this daemon's URL for it)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import yaml

from sparkcache.protocols import load_config_data
from tests.support.client import bearer
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

READ = "rd-5ee1d0"
CONFIG: dict[str, Any] = {
    "server": {"public_url": "https://central.example:8443/"},
    "auth": {"anonymous_read": False, "tokens": [{"name": "r", "token": READ, "scopes": ["read"]}]},
    "remotes": {
        "hub": {"type": "oci", "upstream": UPSTREAM, "registries": ["docker.io"], "tag_ttl": "1m"},
        "pushed": {"type": "oci-local"},
        "py": {"type": "pypi", "upstream": UPSTREAM, "cache": {"mutable_ttl": "30s", "negative_ttl": "30d"}},
        "py-own": {"type": "pypi-local"},
        "py-all": {"type": "pypi-group", "members": ["py-own", "py"]},
        "js-own": {"type": "npm-local"},
        "golang": {"type": "go", "upstream": UPSTREAM, "sumdb": ["sum.golang.org"]},
        "uploads": {"type": "local"},
        "debian": {"type": "deb", "upstream": UPSTREAM, "description": "Debian"},
        "cc": {"type": "kv"},
    },
    "git": {"repos": {"app": "https://forge.example/org/app.git"}, "allowed_hosts": ["forge.example"]},
}
BASE = "https://central.example:8443"


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


@pytest_twisted.ensureDeferred
async def test_node_config_chains_every_remote_and_loads(h: Harness) -> None:
    assert (await h.get("/setup/node")).status == 401  # reads need a token here
    resp = await h.get("/setup/node?listen=tcp:9000&data_dir=/srv/cache", headers=bearer(READ))
    assert resp.status == 200 and resp.header("Content-Type") == "application/yaml; charset=utf-8"
    assert resp.header("X-Install-Path") == "/etc/sparkcache/cache.yaml"
    text = resp.body.decode()
    doc = yaml.safe_load(text)
    assert doc["server"] == {"listen": ["tcp:9000"]} and doc["storage"] == {"data_dir": "/srv/cache"}
    remotes = doc["remotes"]
    token = {"token_env": "SPARKCACHE_CENTRAL_TOKEN"}
    assert remotes["hub"] == {"type": "oci", "upstream": f"{BASE}/v2/hub", "registries": ["docker.io"],
                              "tag_ttl": "60s", "credentials": token}
    assert remotes["pushed"] == {"type": "oci", "upstream": f"{BASE}/v2/pushed", "credentials": token}
    assert remotes["py"] == {"type": "pypi", "upstream": f"{BASE}/pypi/py/simple",
                             "cache": {"mutable_ttl": "30s", "negative_ttl": "2592000s"}, "credentials": token}
    assert remotes["py-own"]["type"] == remotes["py-all"]["type"] == "pypi"
    assert remotes["py-all"]["upstream"] == f"{BASE}/pypi/py-all/simple"
    assert remotes["js-own"] == {"type": "npm", "upstream": f"{BASE}/npm/js-own", "credentials": token}
    assert remotes["golang"]["sumdb"] == {"sum.golang.org": f"{BASE}/go/golang/sumdb/sum.golang.org"}
    # Uploaded files may be replaced: the node revalidates every one.
    assert remotes["uploads"] == {"type": "generic", "upstream": f"{BASE}/api/uploads", "mutable_patterns": ["."],
                                  "credentials": token}
    assert remotes["debian"] == {"type": "deb", "upstream": f"{BASE}/api/debian", "description": "Debian",
                                 "credentials": token}
    assert "cc" not in remotes and "cc (type: kv)" in text
    assert doc["git"] == {"repos": {"app": f"{BASE}/git/app"},
                          "credentials": {"central.example:8443": {"username": "token",
                                                                   "token_env": "SPARKCACHE_CENTRAL_TOKEN"}}}
    assert "SPARKCACHE_CENTRAL_TOKEN" in text.split("remotes:")[0] and "forge.example" in text.split("server:")[0]
    # What it prints is a configuration a node daemon loads as it is.
    loaded = load_config_data(doc, "node.yaml", environ={"SPARKCACHE_CENTRAL_TOKEN": "t"})
    assert loaded.remotes["pushed"].upstream == f"{BASE}/v2/pushed"
    assert loaded.remotes["py"].cache.negative_ttl == 30 * 86400 and loaded.remotes["hub"].options.tag_ttl == 60
    assert loaded.remotes["uploads"].credentials is not None and loaded.remotes["uploads"].credentials.token == "t"
    assert READ not in text


@pytest_twisted.ensureDeferred
async def test_node_is_listed_and_head_answers(h: Harness) -> None:
    listing = await h.get("/setup/", headers=bearer(READ))
    assert "/setup/node" in listing.body.decode()
    head = await h.request("HEAD", "/setup/node", headers=bearer(READ))
    assert head.status == 200 and head.body == b"" and int(head.header("Content-Length") or 0) > 0


# -- what a node's remotes need of the protocols ---------------------------------------------


@pytest.mark.parametrize("upstream, url", [
    ("https://registry.example", "https://registry.example/v2/library/x/manifests/1.0"),
    ("https://registry.example/v2", "https://registry.example/v2/library/x/manifests/1.0"),
    # Another sparkcache's remote: names go under its path, as its path routing expects.
    ("http://central.example:8090/v2/hub", "http://central.example:8090/v2/hub/library/x/manifests/1.0"),
])
def test_oci_upstream_urls_of_a_registry_and_of_a_central(upstream: str, url: str) -> None:
    from sparkcache.config import RemoteConfig
    from sparkcache.protocols.oci.mirror import Mirror

    assert Mirror.url(RemoteConfig("hub", "oci", upstream), "library/x", "manifests", "1.0") == url


def test_sumdb_credentials_go_only_to_the_goproxy_origin() -> None:
    from sparkcache.config import Credentials, RemoteConfig
    from sparkcache.protocols.go.sumdb import SumdbRequest, cache_request

    creds = Credentials(token="t")
    remote = RemoteConfig("golang", "go", "http://central.example:8090/go/golang", credentials=creds)
    req = SumdbRequest("sum.golang.org", "lookup", "lookup/example.com/m@v1.0.0")
    chained = cache_request(remote, req, "http://central.example:8090/go/golang/sumdb/sum.golang.org")
    assert chained.remote.credentials == creds
    assert chained.url == "http://central.example:8090/go/golang/sumdb/sum.golang.org/lookup/example.com/m@v1.0.0"
    elsewhere = cache_request(remote, req, "https://sum.golang.org")
    assert elsewhere.remote.credentials is None
