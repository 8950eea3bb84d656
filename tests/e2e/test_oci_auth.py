"""Upstream token auth and client auth on a ``type: oci`` remote.

The registry runs with ``auth: token`` behind a small token server that wants
basic credentials (tests/support/registry.py). The cache learns the Bearer
challenge from the first 401, gets a token with the remote's credentials
(from the environment), caches it per scope and retries once; skopeo pulls
through it. The client's own credentials (a sparkcache read token) are
checked here and never reach the upstream.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.support.registry import Front, build_image, build_index, oci_remote, running_registry, skopeo

CLIENT_TOKEN = "client-read-token-7f3a"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    work = tmp_path_factory.mktemp("oci-auth")
    with running_registry(work, token_auth=True, credentials=("puller", "s3cret")) as registry:
        layout = work / "layout"
        amd = build_image(layout, "amd", {"a": os.urandom(100_000)}, arch="amd64")
        arm = build_image(layout, "arm", {"a": os.urandom(100_000)}, arch="arm64")
        idx = build_index(layout, "multi", [amd, arm])
        registry.push(layout, "multi", "private/app:1")
        registry.push(layout, "amd", "private/other:1")
        yield SimpleNamespace(registry=registry, idx=idx, amd=amd)


def _remote(front: Front) -> dict[str, Any]:
    return {"priv": oci_remote(front.url, credentials={"username": "puller", "password_env": "REG_PASSWORD"})}


def test_token_flow_with_basic_credentials(daemon_factory: Any, front: Front, reg: SimpleNamespace,
                                           tmp_path: Path) -> None:
    tokens = reg.registry.tokens
    before = len(tokens.requests)
    cache = daemon_factory(_remote(front), env={"REG_PASSWORD": "s3cret"})
    src = f"docker://127.0.0.1:{cache.port}/priv/private/app:1"
    skopeo("copy", "--all", "--src-tls-verify=false", src, f"oci:{tmp_path / 'out'}:x")
    raw = skopeo("inspect", "--raw", "--tls-verify=false", src).stdout.encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == reg.idx.digest

    # One 401 taught the cache the challenge; one token (with our basic
    # credentials) then served every request of that scope.
    assert front.count(status=401) == 1, front.describe()
    mine = tokens.requests[before:]
    assert len(mine) == 1, mine
    query, auth = mine[0]
    assert query["scope"] == ["repository:private/app:pull"] and query["service"] == [tokens.service]
    assert auth == "Basic " + base64.b64encode(b"puller:s3cret").decode()
    served = [s for s in front.requests() if s.status == 200]
    assert served and all((s.authorization or "").startswith("Bearer ") for s in served), front.describe()
    for blob in {b.digest for b in reg.idx.blobs()}:
        assert front.count("GET", f"/blobs/{blob}", status=200) == 1, front.describe()


def test_client_credentials_checked_here_and_never_forwarded(daemon_factory: Any, front: Front,
                                                             reg: SimpleNamespace) -> None:
    cache = daemon_factory(_remote(front), auth={"anonymous_read": False},
                           env={"REG_PASSWORD": "s3cret", "SPARKCACHE_READ_TOKEN": CLIENT_TOKEN})
    resp = cache.get("/v2/")
    # The challenge sends registry clients to the cache's own token endpoint.
    assert resp.status == 401 and "/setup/token" in (resp.header("WWW-Authenticate") or ""), resp.describe()
    assert resp.json()["errors"][0]["code"] == "UNAUTHORIZED"
    denied = cache.get("/v2/priv/private/app/manifests/1")
    assert denied.status == 401 and "/setup/token" in (denied.header("WWW-Authenticate") or "")
    assert front.count() == 0
    src = f"docker://127.0.0.1:{cache.port}/priv/private/app:1"
    raw = skopeo("inspect", "--raw", "--tls-verify=false", "--creds", f"ci:{CLIENT_TOKEN}", src).stdout.encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == reg.idx.digest
    basic = base64.b64encode(f"ci:{CLIENT_TOKEN}".encode()).decode()
    for s in front.requests():
        assert CLIENT_TOKEN not in (s.authorization or "") and basic not in (s.authorization or ""), front.describe()
    assert front.count(status=200) >= 1


def test_wrong_upstream_credentials_are_denied(daemon_factory: Any, front: Front, reg: SimpleNamespace) -> None:
    cache = daemon_factory(_remote(front), env={"REG_PASSWORD": "wrong"})
    resp = cache.get("/v2/priv/private/app/manifests/1")
    assert resp.status == 403, resp.describe()
    assert resp.json()["errors"][0]["code"] == "DENIED"
    assert "wrong" not in resp.body.decode()


def test_known_realm_new_scope_costs_no_401(daemon_factory: Any, front: Front, reg: SimpleNamespace) -> None:
    tokens = reg.registry.tokens
    cache = daemon_factory(_remote(front), env={"REG_PASSWORD": "s3cret"})
    accept = {"Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"}
    before = len(tokens.requests)
    assert cache.get("/v2/priv/private/app/manifests/1", accept).status == 200
    assert front.count(status=401) == 1, front.describe()
    # Same registry, another repository: the token for its scope is fetched
    # up front, since the realm is known.
    resp = cache.get("/v2/priv/private/other/manifests/1", accept)
    assert resp.status == 200 and resp.header("Docker-Content-Digest") == reg.amd.digest, resp.describe()
    assert front.count(status=401) == 1, front.describe()
    scopes = [q["scope"][0] for q, _ in tokens.requests[before:]]
    assert scopes == ["repository:private/app:pull", "repository:private/other:pull"], scopes
