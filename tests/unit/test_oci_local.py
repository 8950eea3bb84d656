"""LocalRegistry (type: oci-local) over real HTTP on loopback, behind a tiny router.

The router here only splits ``/v2/<remote>/<repo>/<tail>`` the way the /v2/
app does, so the push protocol (monolithic and chunked uploads, mounts,
manifests, tags) is checked independently of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest
import pytest_twisted
import treq
from klein import Klein
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from sparkcache.auth import Authorizer
from sparkcache.config import RemoteConfig
from sparkcache.protocols import load_config_data
from sparkcache.context import Context
from sparkcache.fetch import Cache
from sparkcache.metrics import Metrics
from sparkcache.protocols.oci.errors import oci_errors
from sparkcache.protocols.oci.local import LocalRegistry
from sparkcache.store import Store

WRITE = "wr-5e1d0c9a"
READ = "rd-77a0b3f2"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


class Router:
    app = Klein()
    oci_errors(app)

    def __init__(self, local: LocalRegistry, remote: RemoteConfig) -> None:
        self.local, self.remote = local, remote

    @app.route("/v2/<path:rest>", methods=["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"])
    async def v2(self, request: Any, rest: str) -> Any:
        segs = rest.split("/")
        assert segs[0] == self.remote.name
        segs = segs[1:]
        for i, s in enumerate(segs):
            if s in ("manifests", "blobs", "tags") and i > 0:
                tail = segs[i:]
                if tail == ["blobs", "uploads"]:
                    tail.append("")
                return await self.local.dispatch(request, self.remote, "/".join(segs[:i]), tail)
        raise AssertionError(rest)

    @app.route("/v2/loc/_catalog", methods=["GET"])
    async def catalog(self, request: Any) -> Any:
        return await self.local.catalog(request, self.remote)


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Client:
    def __init__(self, base: str, pool: HTTPConnectionPool) -> None:
        self.base, self.pool = base, pool

    async def req(self, method: str, path: str, body: bytes | None = None, token: str | None = WRITE,
                  headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        url = path if path.startswith("http") else self.base + path
        resp = await treq.request(method, url, data=body, headers={k: [v] for k, v in h.items()}, pool=self.pool)
        return resp, await resp.content()


@pytest.fixture
def env(tmp_path):
    clock = task.Clock()
    clock.advance(1_000_000)
    store = Store(str(tmp_path / "data"), reactor, max_size=1 << 30)
    pytest_twisted.blockon(Deferred.fromCoroutine(store.start()))
    config = load_config_data({
        "storage": {"data_dir": str(tmp_path / "data")},
        "auth": {"anonymous_read": True, "tokens": [{"name": "w", "token": WRITE, "scopes": ["write"]},
                                                    {"name": "r", "token": READ, "scopes": ["read"]}]},
        "remotes": {"loc": {"type": "oci-local"}},
    })
    metrics = Metrics()
    cache = Cache(store, None, clock, metrics)  # type: ignore[arg-type]  # (no upstream: pushes only)
    ctx = Context(config, store, cache, None, metrics, Authorizer(config.auth), clock)  # type: ignore[arg-type]
    remote = config.remotes["loc"]
    local = LocalRegistry(ctx)
    port = reactor.listenTCP(0, Site(Router(local, remote).app.resource()), interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = Client(f"http://127.0.0.1:{port.getHost().port}", pool)
    yield client, local, store, clock
    pytest_twisted.blockon(pool.closeCachedConnections())
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(Deferred.fromCoroutine(store.stop()))


def h(resp: Any, name: str) -> str | None:
    v = resp.headers.getRawHeaders(name)
    return v[0].decode() if isinstance(v[0], bytes) else v[0] if v else None


def err(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


async def push_blob(c: Client, repo: str, data: bytes) -> str:
    d = sha(data)
    r, _ = await c.req("POST", f"/v2/loc/{repo}/blobs/uploads/?digest={d}", data)
    assert r.code == 201
    return d


def image_manifest(config: bytes, layers: list[bytes]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(x), "size": len(x)} for x in layers],
    }).encode()


@pytest_twisted.ensureDeferred
async def test_monolithic_blob_upload_then_get_head_range(env):
    c, _, _, _ = env
    data = b"layer bytes " * 1000
    d = sha(data)
    r, _ = await c.req("POST", f"/v2/loc/team/app/blobs/uploads/?digest={d}", data)
    assert r.code == 201
    assert h(r, "Location") == f"/v2/loc/team/app/blobs/{d}"
    assert h(r, "Docker-Content-Digest") == d
    r, body = await c.req("GET", f"/v2/loc/team/app/blobs/{d}", token=None)
    assert r.code == 200 and body == data and h(r, "Docker-Content-Digest") == d
    r, body = await c.req("HEAD", f"/v2/loc/team/app/blobs/{d}", token=None)
    assert r.code == 200 and body == b"" and h(r, "Content-Length") == str(len(data))
    r, body = await c.req("GET", f"/v2/loc/team/app/blobs/{d}", headers={"Range": "bytes=10-19"})
    assert r.code == 206 and body == data[10:20]
    # Blobs are linked per repository.
    r, body = await c.req("GET", f"/v2/loc/other/blobs/{d}")
    assert r.code == 404 and err(body) == "BLOB_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_chunked_upload_with_content_range(env):
    c, local, _, _ = env
    data = bytes(range(256)) * 4096  # 1 MiB
    r, _ = await c.req("POST", "/v2/loc/app/blobs/uploads/")
    assert r.code == 202
    loc = h(r, "Location")
    uuid = h(r, "Docker-Upload-UUID")
    assert loc == f"/v2/loc/app/blobs/uploads/{uuid}" and h(r, "Range") == "0-0"
    parts = [data[:300_000], data[300_000:700_000], data[700_000:]]
    off = 0
    for p in parts:
        r, _ = await c.req("PATCH", loc, p, headers={"Content-Range": f"{off}-{off + len(p) - 1}",
                                                     "Content-Type": "application/octet-stream"})
        assert r.code == 202, r.code
        off += len(p)
        assert h(r, "Range") == f"0-{off - 1}"
        loc = h(r, "Location")
    r, _ = await c.req("GET", loc)
    assert r.code == 204 and h(r, "Range") == f"0-{len(data) - 1}"
    # A chunk that does not continue the upload is refused with where it stands.
    r, body = await c.req("PATCH", loc, b"xx", headers={"Content-Range": "5-6"})
    assert r.code == 416 and err(body) == "RANGE_INVALID" and h(r, "Range") == f"0-{len(data) - 1}"
    r, _ = await c.req("PUT", f"{loc}?digest={sha(data)}")
    assert r.code == 201 and h(r, "Docker-Content-Digest") == sha(data)
    assert local.uploads == {}
    r, body = await c.req("GET", f"/v2/loc/app/blobs/{sha(data)}")
    assert body == data
    r, body = await c.req("GET", loc)
    assert r.code == 404 and err(body) == "BLOB_UPLOAD_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_streamed_patch_without_range_and_final_chunk_in_put(env):
    c, _, _, _ = env
    r, _ = await c.req("POST", "/v2/loc/app/blobs/uploads/")
    loc = h(r, "Location")
    r, _ = await c.req("PATCH", loc, b"hello ")
    assert r.code == 202 and h(r, "Range") == "0-5"
    r, _ = await c.req("PUT", f"{loc}?digest={sha(b'hello world')}", b"world")
    assert r.code == 201
    r, body = await c.req("GET", f"/v2/loc/app/blobs/{sha(b'hello world')}")
    assert body == b"hello world"


@pytest_twisted.ensureDeferred
async def test_digest_mismatch_keeps_nothing(env):
    c, local, store, _ = env
    wrong = sha(b"something else")
    r, body = await c.req("POST", f"/v2/loc/app/blobs/uploads/?digest={wrong}", b"actual")
    assert r.code == 400 and err(body) == "DIGEST_INVALID"
    r, _ = await c.req("POST", "/v2/loc/app/blobs/uploads/")
    loc = h(r, "Location")
    r, body = await c.req("PUT", f"{loc}?digest={wrong}", b"actual")
    assert r.code == 400 and err(body) == "DIGEST_INVALID"
    r, _ = await c.req("HEAD", f"/v2/loc/app/blobs/{wrong}")
    assert r.code == 404
    assert local.uploads == {} and store._spools == set()
    r, body = await c.req("POST", "/v2/loc/app/blobs/uploads/?digest=sha512:abcd", b"x")
    assert r.code == 400 and err(body) == "DIGEST_INVALID"


@pytest_twisted.ensureDeferred
async def test_writes_need_the_write_scope(env):
    c, _, _, _ = env
    r, body = await c.req("POST", "/v2/loc/app/blobs/uploads/", token=None)
    assert r.code == 401 and err(body) == "UNAUTHORIZED"
    assert h(r, "WWW-Authenticate") == ('Bearer realm="%s/setup/token",service="sparkcache",'
                                        'scope="repository:loc/app:pull,push"' % c.base)
    r, body = await c.req("POST", "/v2/loc/app/blobs/uploads/", token=READ)
    assert r.code == 403 and err(body) == "DENIED"
    r, body = await c.req("PUT", "/v2/loc/app/manifests/v1", b"{}", token="wrong")
    assert r.code == 401


@pytest_twisted.ensureDeferred
async def test_manifest_put_get_tags_and_delete(env):
    c, _, _, _ = env
    config, layer = b'{"architecture":"amd64"}', b"layer-1"
    man = image_manifest(config, [layer])
    # Blobs first: a manifest naming unknown blobs is refused.
    r, body = await c.req("PUT", "/v2/loc/app/manifests/v1", man, headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 404 and err(body) == "MANIFEST_BLOB_UNKNOWN"
    await push_blob(c, "app", config)
    await push_blob(c, "app", layer)
    for tag in ("v1", "latest"):
        r, _ = await c.req("PUT", f"/v2/loc/app/manifests/{tag}", man, headers={"Content-Type": OCI_MANIFEST})
        assert r.code == 201 and h(r, "Docker-Content-Digest") == sha(man)
        assert h(r, "Location") == f"/v2/loc/app/manifests/{sha(man)}"
    for ref in ("v1", sha(man)):
        r, body = await c.req("GET", f"/v2/loc/app/manifests/{ref}", token=None)
        assert r.code == 200 and body == man
        assert h(r, "Content-Type") == OCI_MANIFEST and h(r, "Docker-Content-Digest") == sha(man)
        r, body = await c.req("HEAD", f"/v2/loc/app/manifests/{ref}", token=None)
        assert r.code == 200 and body == b"" and h(r, "Content-Length") == str(len(man))
    r, body = await c.req("GET", "/v2/loc/app/tags/list")
    assert json.loads(body) == {"name": "loc/app", "tags": ["latest", "v1"]}
    r, body = await c.req("GET", "/v2/loc/app/tags/list?n=1")
    assert json.loads(body)["tags"] == ["latest"]
    assert h(r, "Link") == '</v2/loc/app/tags/list?n=1&last=latest>; rel="next"'
    r, body = await c.req("GET", "/v2/loc/app/tags/list?n=1&last=latest")
    assert json.loads(body)["tags"] == ["v1"] and not r.headers.hasHeader("Link")
    r, body = await c.req("GET", "/v2/loc/_catalog")
    assert json.loads(body) == {"repositories": ["loc/app"]}
    # Deleting a tag leaves the manifest; deleting by digest removes every tag.
    r, _ = await c.req("DELETE", "/v2/loc/app/manifests/latest")
    assert r.code == 202
    r, body = await c.req("GET", "/v2/loc/app/tags/list")
    assert json.loads(body)["tags"] == ["v1"]
    r, _ = await c.req("DELETE", f"/v2/loc/app/manifests/{sha(man)}")
    assert r.code == 202
    r, body = await c.req("GET", "/v2/loc/app/manifests/v1")
    assert r.code == 404 and err(body) == "MANIFEST_UNKNOWN"
    r, body = await c.req("GET", "/v2/loc/nope/tags/list")
    assert r.code == 404 and err(body) == "NAME_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_manifest_validation(env):
    c, _, _, _ = env
    ct = {"Content-Type": OCI_MANIFEST}
    r, body = await c.req("PUT", "/v2/loc/app/manifests/v1", b"not json", headers=ct)
    assert r.code == 400 and err(body) == "MANIFEST_INVALID"
    r, body = await c.req("PUT", "/v2/loc/app/manifests/v1", json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                                          "manifests": []}).encode(), headers=ct)
    assert r.code == 400 and err(body) == "MANIFEST_INVALID"  # Content-Type and mediaType disagree
    man = image_manifest(b"c", [])
    r, body = await c.req("PUT", f"/v2/loc/app/manifests/{sha(b'other')}", man, headers=ct)
    assert r.code == 400 and err(body) == "DIGEST_INVALID"
    r, body = await c.req("PUT", "/v2/loc/app/manifests/bad%20tag", man, headers=ct)
    assert r.code == 400
    r, body = await c.req("GET", "/v2/loc/Upper/manifests/v1")
    assert r.code == 400 and err(body) == "NAME_INVALID"


@pytest_twisted.ensureDeferred
async def test_index_may_reference_manifests_and_blobs(env):
    """BuildKit's registry cache pushes an index whose entries are layer blobs."""
    c, _, _, _ = env
    config, layer = b"{}", b"l"
    await push_blob(c, "cache", config)
    await push_blob(c, "cache", layer)
    man = image_manifest(config, [layer])
    r, _ = await c.req("PUT", f"/v2/loc/cache/manifests/{sha(man)}", man, headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 201
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha(man), "size": len(man)},
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer), "size": 1},
    ]}).encode()
    r, _ = await c.req("PUT", "/v2/loc/cache/manifests/buildcache", index, headers={"Content-Type": OCI_INDEX})
    assert r.code == 201
    r, body = await c.req("GET", "/v2/loc/cache/manifests/buildcache")
    assert body == index and h(r, "Content-Type") == OCI_INDEX


@pytest_twisted.ensureDeferred
async def test_cross_repo_mount(env):
    c, _, _, _ = env
    d = await push_blob(c, "base", b"shared layer")
    r, _ = await c.req("POST", f"/v2/loc/app/blobs/uploads/?mount={d}&from=loc/base")
    assert r.code == 201 and h(r, "Location") == f"/v2/loc/app/blobs/{d}"
    r, body = await c.req("GET", f"/v2/loc/app/blobs/{d}")
    assert body == b"shared layer"
    # Not mountable (unknown source): an ordinary upload session instead.
    r, _ = await c.req("POST", f"/v2/loc/app2/blobs/uploads/?mount={d}&from=loc/nothere")
    assert r.code == 202 and h(r, "Docker-Upload-UUID")


@pytest_twisted.ensureDeferred
async def test_cancel_and_idle_sessions_release_their_spools(env):
    c, local, store, clock = env
    r, _ = await c.req("POST", "/v2/loc/app/blobs/uploads/")
    loc = h(r, "Location")
    await c.req("PATCH", loc, b"abc")
    r, _ = await c.req("DELETE", loc)
    assert r.code == 204 and local.uploads == {} and store._spools == set()
    await c.req("POST", "/v2/loc/app/blobs/uploads/")
    assert len(local.uploads) == 1
    clock.advance(7200)
    await c.req("POST", "/v2/loc/app/blobs/uploads/")
    assert len(local.uploads) == 1  # the idle one was swept


@pytest_twisted.ensureDeferred
async def test_pushed_content_is_never_evicted(env):
    """Local content exists nowhere else: LRU eviction and cache purges pass over it, cached bodies go first."""
    c, _, store, _ = env
    pushed = await push_blob(c, "app", b"p" * 5000)
    spool = store.new_spool()
    spool.write(b"c" * 5000)
    from sparkcache.store import Entry

    await store.commit(spool, Entry("cache:x", "cache", "x", 200, spool.hexdigest(), 5000, None, {}, 0, None, None,
                                    None, 0))
    store.max_size = 1000
    assert await store.evict() == 1
    assert await store.index.get("cache:x") is None
    r, body = await c.req("GET", f"/v2/loc/app/blobs/{pushed}")
    assert r.code == 200 and body == b"p" * 5000
    assert await store.evict() == 0  # only kept content left: nothing more to do
    assert await store.purge_all() == 0 and await store.purge_remote("loc") == 0
    r, body = await c.req("GET", f"/v2/loc/app/blobs/{pushed}")
    assert r.code == 200 and body == b"p" * 5000
    # Deleting the blob by name is explicit: that does remove it.
    r, _ = await c.req("DELETE", f"/v2/loc/app/blobs/{pushed}")
    assert r.code == 202
    r, _ = await c.req("GET", f"/v2/loc/app/blobs/{pushed}")
    assert r.code == 404


@pytest_twisted.ensureDeferred
async def test_session_finished_by_one_put_with_the_whole_body(env):
    """containerd's pusher: POST for a session, then PUT the whole blob to its Location."""
    c, _, _, _ = env
    data = b"z" * 300_000
    r, _ = await c.req("POST", "/v2/loc/app/blobs/uploads")  # no trailing slash either
    assert r.code == 202 and h(r, "Location").startswith("/v2/loc/app/blobs/uploads/")
    r, _ = await c.req("PUT", f"{h(r, 'Location')}?digest={sha(data)}", data)
    assert r.code == 201 and h(r, "Location") == f"/v2/loc/app/blobs/{sha(data)}"
    r, body = await c.req("GET", f"/v2/loc/app/blobs/{sha(data)}")
    assert body == data


@pytest_twisted.ensureDeferred
async def test_head_and_accept_never_promise_what_get_would_not_give(env):
    c, _, store, _ = env
    config, layer = b'{"os":"linux"}', b"layer" * 100
    await push_blob(c, "team/app", config)
    await push_blob(c, "team/app", layer)
    manifest = image_manifest(config, [layer])
    r, _ = await c.req("PUT", "/v2/loc/team/app/manifests/v1", manifest, headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 201
    # A client that accepts only indexes is not handed an image manifest.
    r, body = await c.req("GET", "/v2/loc/team/app/manifests/v1", headers={"Accept": OCI_INDEX})
    assert r.code == 404 and err(body) == "MANIFEST_UNKNOWN"
    r, body = await c.req("GET", "/v2/loc/team/app/manifests/v1", headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"})
    assert r.code == 200 and body == manifest
    # The body is gone from disk: HEAD must not say 200; errors are OCI JSON.
    os.unlink(store.cas.local_path(sha(layer).split(":")[1]))
    r, _ = await c.req("HEAD", f"/v2/loc/team/app/blobs/{sha(layer)}")
    assert r.code == 503
    r, body = await c.req("GET", f"/v2/loc/team/app/blobs/{sha(config)}", headers={"Range": "bytes=500-"})
    assert r.code == 416 and err(body) == "RANGE_INVALID"


@pytest_twisted.ensureDeferred
async def test_manifest_json_is_parsed_off_the_reactor_thread(env, monkeypatch):
    import threading

    import sparkcache.protocols.oci.local as local_mod

    c, _, _, _ = env
    config = b'{"os":"linux"}'
    await push_blob(c, "team/app", config)
    threads = []
    real = local_mod.parse_manifest

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(local_mod, "parse_manifest", spy)
    r, _ = await c.req("PUT", "/v2/loc/team/app/manifests/v1", image_manifest(config, []),
                       headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 201 and threads == [False]
