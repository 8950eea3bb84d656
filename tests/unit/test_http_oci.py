"""The /v2/ app over in-memory HTTP through the daemon's real root: the ping and its
challenge, the three ways of naming a remote (``?ns=``, path, Docker Hub default),
the allow-list, errors in OCI JSON, and pulls through an in-memory registry.
Pushes to ``type: oci-local`` are in test_oci_local.py."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import pytest_twisted

from tests.support.client import Response, bearer
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

READ, WRITE = "rd-4b1e", "wr-0aa7"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TOKENS = [{"name": "r", "token": READ, "scopes": ["read"]}, {"name": "w", "token": WRITE, "scopes": ["read", "write"]}]
CONFIG: dict[str, Any] = {
    "auth": {"anonymous_read": True, "tokens": TOKENS},
    "remotes": {
        "hub": {"type": "oci", "upstream": UPSTREAM, "registries": ["docker.io"],
                "repositories": ["^alpine$", "^team/"], "tag_ttl": "5m"},
        "ghcr": {"type": "oci", "upstream": UPSTREAM + "/ghcr", "registries": ["ghcr.io"]},
        "loc": {"type": "oci-local"},
    },
}


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_error(resp: Response, status: int) -> str:
    """The code of an OCI JSON error answer (and that it is one)."""
    assert resp.status == status, resp.describe()
    assert resp.header("Content-Type") == "application/json", resp.describe()
    assert resp.header("Docker-Distribution-API-Version") == "registry/2.0"
    return json.loads(resp.body)["errors"][0]["code"]


def publish(h: Harness, path: str, manifest: bytes) -> None:
    """A manifest in the in-memory registry, with the digest header registries send."""
    h.upstream.add(path, manifest, MANIFEST)
    h.upstream.behave(path, headers={"Docker-Content-Digest": digest(manifest)})


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


@pytest_twisted.ensureDeferred
async def test_ping_challenges_clients_that_have_not_logged_in(h: Harness) -> None:
    anonymous = await h.get("/v2/")
    assert oci_error(anonymous, 401) == "UNAUTHORIZED"
    assert anonymous.header("WWW-Authenticate") == 'Bearer realm="http://cache.test/setup/token",service="sparkcache"'
    # The token endpoint's marker for "no credentials" reads anonymously.
    for auth in (bearer("anonymous"), bearer(READ)):
        ok = await h.get("/v2/", auth)
        assert ok.status == 200 and ok.body == b"{}\n", ok.describe()
        assert ok.header("Docker-Distribution-API-Version") == "registry/2.0"
    assert oci_error(await h.get("/v2/", bearer("wrong")), 401) == "UNAUTHORIZED"
    assert oci_error(await h.post("/v2/", b"", bearer(READ)), 405) == "UNSUPPORTED"


@pytest_twisted.ensureDeferred
async def test_the_three_ways_of_naming_a_remote_share_one_cache_entry(h: Harness) -> None:
    manifest = b'{"schemaVersion": 2, "mediaType": "%s"}' % MANIFEST.encode()
    publish(h, "/v2/library/alpine/manifests/3.19", manifest)
    # containerd: ?ns= names the registry; Docker Hub's implicit library/ is added upstream.
    first = await h.get("/v2/alpine/manifests/3.19?ns=docker.io")
    assert first.status == 200 and first.body == manifest, first.describe()
    assert first.header("OCI-Namespace") == "docker.io"
    assert first.header("Docker-Content-Digest") == digest(manifest)
    assert first.header("X-Cache") == "MISS"
    await h.settle()
    # Path routing by remote name, by registry host, a rewrite on top of ?ns=, and
    # dockerd's plain /v2/<name> (the Docker Hub remote): all the same entry.
    for path in ("/v2/hub/alpine/manifests/3.19", "/v2/docker.io/alpine/manifests/3.19",
                 "/v2/hub/alpine/manifests/3.19?ns=docker.io", "/v2/alpine/manifests/3.19"):
        again = await h.get(path)
        assert again.status == 200 and again.body == manifest and again.header("X-Cache") == "HIT", path
    # By digest, the manifest fetched by tag is known too.
    by_digest = await h.get(f"/v2/hub/alpine/manifests/{digest(manifest)}")
    assert by_digest.status == 200 and by_digest.body == manifest
    assert h.upstream.count("/v2/library/alpine/manifests/3.19") == 1
    assert h.upstream.total() == 1
    # Another registry, another remote, its own upstream.
    publish(h, "/ghcr/v2/org/tool/manifests/v1", manifest)
    tool = await h.get("/v2/org/tool/manifests/v1?ns=ghcr.io")
    assert tool.status == 200 and tool.header("OCI-Namespace") == "ghcr.io"
    assert h.upstream.count("/ghcr/v2/org/tool/manifests/v1") == 1


@pytest_twisted.ensureDeferred
async def test_routing_errors_are_oci_json(h: Harness) -> None:
    assert oci_error(await h.get("/v2/alpine/manifests/1?ns=quay.io"), 404) == "NAME_UNKNOWN"
    assert oci_error(await h.get("/v2/hub/Alpine/manifests/1"), 400) == "NAME_INVALID"
    assert oci_error(await h.get("/v2/hub/alpine/nothing"), 404) == "NAME_UNKNOWN"
    assert oci_error(await h.get("/v2/hub/alpine/manifests/bad%20tag"), 404) == "MANIFEST_UNKNOWN"
    assert oci_error(await h.get("/v2/hub/alpine/blobs/sha256:abc"), 400) == "DIGEST_INVALID"
    # Outside the remote's repositories: refused before anything is asked upstream.
    assert oci_error(await h.get("/v2/hub/evil/thing/manifests/1"), 403) == "DENIED"
    # A pull-through mirror takes no pushes.
    push = await h.put("/v2/hub/alpine/manifests/1", b"{}", bearer(WRITE))
    assert oci_error(push, 405) == "UNSUPPORTED" and push.header("Allow") == "GET, HEAD"
    assert h.upstream.total() == 0


@pytest_twisted.ensureDeferred
async def test_anonymous_probes_learn_nothing_of_the_allow_list(harness_factory: MakeHarness) -> None:
    h = await harness_factory({**CONFIG, "auth": {"anonymous_read": False, "tokens": TOKENS}})
    probe = await h.get("/v2/hub/evil/thing/manifests/1")
    assert oci_error(probe, 401) == "UNAUTHORIZED"
    assert 'scope="repository:evil/thing:pull"' in (probe.header("WWW-Authenticate") or "")
    assert oci_error(await h.get("/v2/hub/evil/thing/manifests/1", bearer(READ)), 403) == "DENIED"


@pytest_twisted.ensureDeferred
async def test_upstream_failures_become_oci_errors(h: Harness) -> None:
    assert oci_error(await h.get("/v2/hub/alpine/manifests/none"), 404) == "MANIFEST_UNKNOWN"
    h.upstream.behave("/v2/library/alpine/manifests/down", status=503)
    assert oci_error(await h.get("/v2/hub/alpine/manifests/down"), 502) == "UNAVAILABLE"
    h.upstream.behave("/v2/library/alpine/manifests/private", status=403)
    assert oci_error(await h.get("/v2/hub/alpine/manifests/private"), 403) == "DENIED"


@pytest_twisted.ensureDeferred
async def test_blobs_are_verified_before_they_are_kept(h: Harness) -> None:
    layer = b"layer " * 10_000
    good = digest(layer)
    h.upstream.add(f"/v2/team/app/blobs/{good}", layer)
    got = await h.get(f"/v2/hub/team/app/blobs/{good}")
    assert got.status == 200 and got.body == layer and got.header("Docker-Content-Digest") == good
    await h.settle()
    hit = await h.get(f"/v2/hub/team/app/blobs/{good}", {"Range": "bytes=0-9"})
    assert hit.status == 206 and hit.body == layer[:10]
    assert h.upstream.count(f"/v2/team/app/blobs/{good}") == 1
    # Bytes that do not hash to the digest asked for: never served whole, never kept.
    lie = digest(b"something else")
    h.upstream.add(f"/v2/team/app/blobs/{lie}", layer)
    try:
        bad: Response | None = await h.get(f"/v2/hub/team/app/blobs/{lie}")
    except Exception:
        bad = None  # the transfer broke off before its last byte
    assert bad is None or bad.status == 502, bad.describe()
    await h.settle()
    assert await h.store.index.get(f"oci:hub:blob:{lie.split(':')[1]}") is None


@pytest_twisted.ensureDeferred
async def test_a_stale_tag_is_rechecked_with_a_head(h: Harness) -> None:
    manifest = b'{"schemaVersion": 2, "mediaType": "%s", "v": 1}' % MANIFEST.encode()
    publish(h, "/v2/team/app/manifests/latest", manifest)
    assert (await h.get("/v2/hub/team/app/manifests/latest")).status == 200
    await h.settle()
    h.clock.advance(301)
    same = await h.get("/v2/hub/team/app/manifests/latest")
    assert same.body == manifest and same.header("X-Cache") == "REVALIDATED"
    assert h.upstream.count("/v2/team/app/manifests/latest", "HEAD") == 1
    assert h.upstream.count("/v2/team/app/manifests/latest", "GET") == 1
    # The tag moved: the HEAD sees a new digest, and the manifest is fetched again.
    moved = manifest.replace(b'"v": 1', b'"v": 2')
    publish(h, "/v2/team/app/manifests/latest", moved)
    h.clock.advance(301)
    now = await h.get("/v2/hub/team/app/manifests/latest")
    assert now.body == moved and now.header("Docker-Content-Digest") == digest(moved)
    assert h.upstream.count("/v2/team/app/manifests/latest", "GET") == 2
