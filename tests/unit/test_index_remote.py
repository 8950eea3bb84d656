"""Index remotes (sparkcache.protocols._index) and Helm on top of them.

The base is driven directly with a real store in a tmp dir and a gated
"thread pool" (the test decides when a rewrite runs), so sharing and
cancellation are checked by counting, never by timing. Helm is driven over
HTTP: the generic app on loopback in front of tests/support's upstream.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.web.client import HTTPConnectionPool, ResponseFailed
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from sparkcache.auth import Authorizer
from sparkcache.config import CachePolicy, RemoteConfig
from sparkcache.context import Context
from sparkcache.fetch import Cache, Hit, UpstreamClient
from sparkcache.metrics import Metrics
from sparkcache.protocols import load_config_data
from sparkcache.protocols._index import (
    DerivedCache, Immutable, IndexRemote, Mutable, Never, TooLarge, classify_by_patterns,
)
from sparkcache.protocols.generic.app import GenericApp
from sparkcache.protocols.generic.helm import HelmIndex
from sparkcache.store import Entry, Store
from tests.support.upstream import Upstream
from tests.support.waiting import eventually


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def settled(d: Any) -> Deferred[Any]:
    """``d`` (a Deferred or coroutine), failing instead of hanging the suite if it
    never fires: a safety net for a broken build, not a timing check."""
    return ensureDeferred(d).addTimeout(30, reactor)


class Gate:
    """A stand-in for a thread pool: runs each job only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self.called: Deferred[None] = Deferred()

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((d, fn, args))
        if not self.called.called:
            self.called.callback(None)
        return d

    def release(self) -> None:
        jobs, self.jobs = self.jobs, []
        for d, fn, args in jobs:
            d.callback(fn(*args))


class Toy(IndexRemote):
    """An index remote in a few lines: ``list`` files name ``UP`` URLs and digests."""

    content_type = "text/x-list"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rewrites = 0

    def is_index(self, path: str) -> bool:
        return path.endswith("list")

    def rewrite(self, body: bytes, public_base: str) -> bytes:
        self.rewrites += 1
        return body.replace(b"UP", public_base.encode())

    def indexes_listing(self, path: str) -> list[str]:
        return ["list"]

    def parse_digests(self, body: bytes, index_path: str) -> dict[str, str]:
        out = {}
        for line in body.decode().splitlines():
            name, _, digest = line.partition(" ")
            out[name.removeprefix("UP/")] = digest
        return out


async def put(store: Store, key: str, body: bytes, remote: str = "toy") -> Entry:
    spool = store.new_spool()
    spool.write(body)
    entry = Entry(key, remote, key.split(":", 1)[1], 200, sha(body), len(body), None, {}, 1.0)
    return await store.commit(spool, entry)


@pytest.fixture
def base(tmp_path):
    store = Store(str(tmp_path / "data"), reactor, max_size=1 << 30)
    pytest_twisted.blockon(ensureDeferred(store.start()))
    config = load_config_data({"storage": {"data_dir": str(tmp_path / "data")},
                               "remotes": {"toy": {"type": "generic", "upstream": "http://up.invalid"}}})
    ctx = Context(config, store, None, None, Metrics(), Authorizer(config.auth), task.Clock())  # type: ignore[arg-type]
    gate = Gate()
    idx = Toy(config.remotes["toy"], ctx, DerivedCache(store, gate))
    yield idx, store, gate
    pytest_twisted.blockon(ensureDeferred(store.stop()))


# -- freshness --------------------------------------------------------------------------


def test_classify_is_typed_by_patterns():
    import re

    remote = RemoteConfig("r", "generic", "http://up", immutable_patterns=(re.compile(r"/files/"),),
                          mutable_patterns=(re.compile(r"index\.yaml$"),), cache=CachePolicy(0, 300, 30))
    assert classify_by_patterns(remote, "index.yaml") == Mutable(300)
    assert classify_by_patterns(remote, "files/a.tgz") == Immutable(None)
    assert classify_by_patterns(remote, "elsewhere/a.tgz") is None  # policy refuses it
    rechecked = RemoteConfig("r", "generic", "http://up", cache=CachePolicy(86400, 300, 30))
    assert classify_by_patterns(rechecked, "anything") == Immutable(86400)
    assert Never().ttl == 0  # stored already stale: never answered from the cache


def test_helm_classifies_its_index_as_mutable(tmp_path):
    config = load_config_data({"storage": {"data_dir": str(tmp_path)},
                               "remotes": {"charts": {"type": "helm", "upstream": "http://up"}}})
    ctx = Context(config, None, None, None, Metrics(), Authorizer(config.auth), task.Clock())  # type: ignore[arg-type]
    helm = HelmIndex(config.remotes["charts"], ctx, None)  # type: ignore[arg-type]
    assert isinstance(helm.classify("stable/index.yaml"), Mutable)
    assert helm.classify("stable/demo-1.0.0.tgz") == Immutable(None)
    assert helm.is_index("stable/index.yaml") and not helm.is_index("stable/index.yaml.tgz")
    assert helm.indexes_listing("a/b/demo.tgz") == ["a/b/index.yaml", "a/index.yaml", "index.yaml"]
    assert helm.indexes_listing("index.yaml") == ()


# -- rewrite: shared, bounded, cancellable -------------------------------------------------


async def two_waiting(idx: Toy, store: Store, gate: Gate, public_base: str) -> tuple[Entry, Deferred[bytes], Deferred[bytes]]:
    """A stored index and two requests for its rewrite, waiting on the one job."""
    entry = await put(store, "toy:list", b"UP/a.bin 00\n")
    first, second = idx.rewritten(entry, public_base), idx.rewritten(entry, public_base)
    await settled(gate.called)
    assert len(gate.jobs) == 1
    return entry, first, second


@pytest_twisted.ensureDeferred
async def test_concurrent_rewrites_of_one_entry_run_once(base):
    idx, store, gate = base
    entry, first, second = await two_waiting(idx, store, gate, "http://cache/api/toy")
    gate.release()
    assert await settled(first) == await settled(second) == b"http://cache/api/toy/a.bin 00\n"
    assert idx.rewrites == 1
    # Later requests are answered from memory ...
    assert await idx.rewritten(entry, "http://cache/api/toy") == b"http://cache/api/toy/a.bin 00\n"
    assert idx.rewrites == 1 and idx.derived.computed == 1
    # ... per public base: a client that sees another host gets its own URLs.
    other = idx.rewritten(entry, "https://proxy/api/toy")
    await eventually(lambda: bool(gate.jobs))  # once the body read in the I/O pool is done
    gate.release()
    assert await settled(other) == b"https://proxy/api/toy/a.bin 00\n"
    assert idx.rewrites == 2


@pytest_twisted.ensureDeferred
async def test_a_departing_waiter_cancels_nothing_shared(base):
    idx, store, gate = base
    entry, leaving, staying = await two_waiting(idx, store, gate, "http://c")
    leaving.cancel()
    with pytest.raises(CancelledError):
        await settled(leaving)
    gate.release()
    assert await settled(staying) == b"http://c/a.bin 00\n"
    # The work finished and was kept, though its first requester left.
    assert await idx.rewritten(entry, "http://c") == b"http://c/a.bin 00\n"
    assert idx.rewrites == 1


@pytest_twisted.ensureDeferred
async def test_over_the_cap_is_served_as_stored(base):
    idx, store, gate = base
    body = b"UP/a.bin 00\n" * 10
    entry = await put(store, "toy:list", body)
    idx.max_body = len(body) - 1
    with pytest.raises(TooLarge):
        await idx.rewritten(entry, "http://c")
    assert await idx.expected_digest("a.bin") is None  # an index over the cap lists nothing
    request = DummyRequest([b"list"])
    out = await idx.serve(request, Hit(entry, "HIT"), "list", "http://c")
    assert out == body  # upstream's bytes, unrewritten
    assert gate.jobs == [] and idx.rewrites == 0
    assert request.responseHeaders.getRawHeaders(b"x-cache") == [b"HIT"]


@pytest_twisted.ensureDeferred
async def test_serve_sets_the_rewritten_headers(base):
    idx, store, gate = base
    entry = await put(store, "toy:list", b"UP/a.bin 00\n")
    request = DummyRequest([b"list"])
    served = ensureDeferred(idx.serve(request, Hit(entry, "STALE"), "list", "http://c"))
    await settled(gate.called)
    gate.release()
    body = await settled(served)
    assert body == b"http://c/a.bin 00\n"
    h = request.responseHeaders
    assert h.getRawHeaders(b"content-type") == [b"text/x-list"]
    assert h.getRawHeaders(b"cache-control") == [b"no-cache"]
    assert h.getRawHeaders(b"content-length") == [str(len(body)).encode()]
    assert h.getRawHeaders(b"x-cache") == [b"STALE"]
    assert h.getRawHeaders(b"x-artifact-source") == [b"cache"]


@pytest_twisted.ensureDeferred
async def test_expected_digest_comes_from_the_stored_index(base):
    idx, store, gate = base
    await put(store, "toy:list", b"UP/a.bin " + b"ab" * 32 + b"\n")
    looked_up = ensureDeferred(idx.expected_digest("a.bin"))
    await settled(gate.called)
    gate.release()
    assert await settled(looked_up) == "ab" * 32
    assert await idx.expected_digest("b.bin") is None  # parsed once, from memory now
    assert idx.derived.computed == 1


def test_derived_cache_is_bounded():
    d = DerivedCache(None, None, max_bytes=100)  # type: ignore[arg-type]
    d._keep("a", b"x", 40)
    d._keep("b", b"y", 40)
    d._keep("c", b"z", 40)  # pushes out the least recently used
    assert list(d._memo) == ["b", "c"] and d.size == 80
    d._keep("huge", b"w", 60)  # over half the budget: not kept at all
    assert "huge" not in d._memo


# -- Helm: digests from index.yaml ---------------------------------------------------------

HELM_INDEX = """apiVersion: v1
entries:
  demo:
  - name: demo
    version: 1.0.0
    created: 2016-10-06T16:23:20.499814565-06:00
    digest: {demo}
    urls:
    - {up}/charts/demo-1.0.0.tgz
  rel:
  - name: rel
    version: 0.1.0
    created: not a date at all
    digest: sha256:{rel}
    urls:
    - rel-0.1.0.tgz
  elsewhere:
  - name: elsewhere
    version: 2.0.0
    digest: {other}
    urls:
    - https://other.example/elsewhere-2.0.0.tgz
    - {up}/mirror/elsewhere-2.0.0.tgz?sig=1
  nodigest:
  - name: nodigest
    version: 1.0.0
    urls:
    - nodigest-1.0.0.tgz
"""


def helm_for(upstream: str) -> HelmIndex:
    remote = RemoteConfig("charts", "helm", upstream)
    return HelmIndex(remote, None, None)  # type: ignore[arg-type]


def test_helm_parses_digests_of_charts_on_this_remote():
    helm = helm_for("http://up:81/repo")
    body = HELM_INDEX.format(up="http://up:81/repo", demo="a" * 64, rel="B" * 64, other="c" * 64).encode()
    assert helm.parse_digests(body, "index.yaml") == {
        "charts/demo-1.0.0.tgz": "a" * 64,
        "rel-0.1.0.tgz": "b" * 64,  # relative to the repository; sha256: prefix and case forgiven
    }
    # In a subdirectory, relative URLs resolve against that directory.
    assert helm.parse_digests(body, "stable/index.yaml")["stable/rel-0.1.0.tgz"] == "b" * 64


def test_helm_verifies_neither_of_two_contradicting_digests():
    helm = helm_for("http://up")
    body = b"""entries:
  a:
  - {digest: %s, urls: [a.tgz, b.tgz]}
  - {digest: %s, urls: [a.tgz]}
""" % (b"a" * 64, b"b" * 64)
    assert helm.parse_digests(body, "index.yaml") == {"b.tgz": "a" * 64}


def test_helm_refuses_an_alias_bomb():
    helm = helm_for("http://up")
    urls = "[" + ", ".join(["x.tgz"] * 50) + "]"
    versions = "[" + ", ".join(["*v"] * 200) + "]"
    names = "\n".join(f"  n{i}: *l" for i in range(200))
    body = f"base: &v {{digest: {'a' * 64}, urls: {urls}}}\nlist: &l {versions}\nentries:\n{names}\n".encode()
    with pytest.raises(ValueError, match="aliases"):
        helm.parse_digests(body, "index.yaml")


# -- Helm over HTTP --------------------------------------------------------------------------


class CountingRun:
    """The store's I/O pool, counting jobs and able to hold them back."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.held: list[tuple[Deferred[Any], Callable[..., Any]]] = []
        self.hold = False

    def __call__(self, fn: Callable[..., Any]) -> Deferred[Any]:
        if not self.hold:
            return self.store.in_io(fn)
        d: Deferred[Any] = Deferred()
        self.held.append((d, fn))
        return d

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for d, fn in held:
            self.store.in_io(fn).chainDeferred(d)


@pytest.fixture
def helm(tmp_path):
    up = Upstream().start()
    store = Store(str(tmp_path / "data"), reactor, max_size=1 << 30)
    pytest_twisted.blockon(ensureDeferred(store.start()))
    config = load_config_data({
        "storage": {"data_dir": str(tmp_path / "data")},
        "remotes": {"charts": {"type": "helm", "upstream": up.base_url}},
    })
    clock = task.Clock()
    clock.advance(1_000_000)
    client = UpstreamClient(reactor)
    metrics = Metrics()
    cache = Cache(store, client, clock, metrics)
    ctx = Context(config, store, cache, client, metrics, Authorizer(config.auth), clock, reactor=reactor)
    run = CountingRun(store)
    app = GenericApp(ctx, run)
    index = app.indexes["charts"]
    rewrites: list[str] = []
    plain_rewrite = index.rewrite

    def counted(body: bytes, public_base: str) -> bytes:
        rewrites.append(public_base)
        return plain_rewrite(body, public_base)

    index.rewrite = counted  # type: ignore[method-assign]
    port = reactor.listenTCP(0, Site(app.resource()), interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    base = f"http://127.0.0.1:{port.getHost().port}"

    async def get(path: str, **kw: Any) -> tuple[Any, bytes]:
        resp = await treq.get(base + path, pool=pool, timeout=30, **kw)
        return resp, await resp.content()

    yield up, store, index, run, rewrites, get, base
    pytest_twisted.blockon(pool.closeCachedConnections())
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(DeferredList(cache.running()))
    pytest_twisted.blockon(client.close())
    pytest_twisted.blockon(ensureDeferred(store.stop()))
    up.stop()


async def committed(store: Store, key: str) -> Entry | None:
    """The entry once its fetch has committed it (a client can read the last
    byte of a miss before the commit)."""
    await eventually(lambda: store.index.peek(key) is not None)
    return store.index.peek(key)


def add_index(up: Upstream, **digests: str) -> bytes:
    body = HELM_INDEX.format(up=up.base_url, demo=digests.get("demo", "0" * 64), rel=digests.get("rel", "0" * 64),
                             other="0" * 64).encode()
    up.add("/index.yaml", body, content_type="application/x-yaml")
    return body


@pytest_twisted.ensureDeferred
async def test_helm_concurrent_index_requests_share_one_rewrite(helm):
    up, store, index, run, rewrites, get, base = helm
    stored = add_index(up)
    asked: list[str] = []
    derive = index.derived.get

    def asking(kind: str, *args: Any) -> Deferred[Any]:
        asked.append(kind)
        return derive(kind, *args)

    index.derived.get = asking  # type: ignore[method-assign]
    run.hold = True
    first = ensureDeferred(get("/api/charts/index.yaml"))
    second = ensureDeferred(get("/api/charts/index.yaml"))
    # Both requests ask for the rewrite while the first asking runs (held back).
    try:
        await eventually(lambda: bool(run.held) and len(asked) == 2)
        assert len(run.held) == 1
    finally:
        run.release()  # whatever happened, no request is left hanging
    (r1, b1), (r2, b2) = await settled(first), await settled(second)
    assert r1.code == r2.code == 200 and b1 == b2
    assert f"- {base}/api/charts/charts/demo-1.0.0.tgz".encode() in b1
    assert rewrites == [f"{base}/api/charts"]
    r3, b3 = await get("/api/charts/index.yaml")
    assert b3 == b1 and r3.headers.getRawHeaders("X-Cache") == ["HIT"] and len(rewrites) == 1
    entry = await store.index.get("charts:index.yaml")
    assert entry.digest == sha(stored)  # the store keeps upstream's bytes
    assert up.count("/index.yaml") == 1


@pytest_twisted.ensureDeferred
async def test_helm_chart_not_matching_its_index_digest_is_not_cached(helm):
    up, store, index, run, rewrites, get, base = helm
    good = b"\x1f\x8b good chart" * 1000
    add_index(up, demo=sha(good))
    up.add("/charts/demo-1.0.0.tgz", b"\x1f\x8b tampered!!" * 1000, content_type="application/gzip")
    resp, _ = await get("/api/charts/index.yaml")
    assert resp.code == 200
    assert await index.expected_digest("charts/demo-1.0.0.tgz") == sha(good)

    try:
        resp, body = await get("/api/charts/charts/demo-1.0.0.tgz")
    except ResponseFailed:
        pass  # cut off: the client never sees a clean end of unverified bytes
    else:
        assert resp.code == 502, (resp.code, len(body))
    assert await store.index.get("charts:charts/demo-1.0.0.tgz") is None
    assert up.count("/charts/demo-1.0.0.tgz") == 1

    up.add("/charts/demo-1.0.0.tgz", good, content_type="application/gzip")
    resp, body = await get("/api/charts/charts/demo-1.0.0.tgz")
    assert resp.code == 200 and body == good
    entry = await committed(store, "charts:charts/demo-1.0.0.tgz")
    assert entry is not None and entry.digest == sha(good)


@pytest_twisted.ensureDeferred
async def test_helm_chart_listed_without_digest_is_cached_unverified(helm):
    up, store, index, run, rewrites, get, base = helm
    add_index(up)
    up.add("/nodigest-1.0.0.tgz", b"anything", content_type="application/gzip")
    await get("/api/charts/index.yaml")
    assert await index.expected_digest("nodigest-1.0.0.tgz") is None
    resp, body = await get("/api/charts/nodigest-1.0.0.tgz")
    assert resp.code == 200 and body == b"anything"
    assert await committed(store, "charts:nodigest-1.0.0.tgz") is not None


@pytest_twisted.ensureDeferred
async def test_helm_malformed_index_lists_no_digests(helm):
    up, store, index, run, rewrites, get, base = helm
    up.add("/index.yaml", b"entries: [unclosed\n  - {", content_type="application/x-yaml")
    up.add("/demo.tgz", b"chart", content_type="application/gzip")
    resp, body = await get("/api/charts/index.yaml")
    assert resp.code == 200 and body == b"entries: [unclosed\n  - {"
    assert await index.expected_digest("demo.tgz") is None
    resp, body = await get("/api/charts/demo.tgz")
    assert resp.code == 200 and body == b"chart"
