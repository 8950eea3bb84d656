"""The pack cache against a real bare repository and real ``git upload-pack``.

The daemon's own PackCache (tests/support/harness.py, over a FakeMirrors) is
reached through a tiny resource that hands every POST to ``PackCache.serve``
(as GitApp's handler does), whose packs the cache's engine produces. Clients
are in memory (tests/support/memory.py) and read the body as twisted's HTTP
client does, so an aborted response shows up as a broken one, not a clean end.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.web.client import PotentialDataLoss, ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from sparkcache.fetch import Cache
from sparkcache.fetch.flight import Intake
from sparkcache.git.interfaces import Mirror
from sparkcache.git.packcache import REMOTE, PackCache, cache_key, cacheable, ref_state
from sparkcache.git.pktline import DELIM, FLUSH, iter_pkt_lines, parse_request, pkt_line
from sparkcache.git.uploadpack import spawn_upload_pack
from sparkcache.metrics import Metrics
from sparkcache.store import Store
from tests.support.fake_mirrors import FakeMirrors
from tests.support.git_upstream import git as _git
from tests.support.harness import MakeHarness, harness_factory  # noqa: F401
from tests.support.memory import MemoryClient, message, read_body
from tests.support.tools import require_tool
from tests.support.waiting import eventually


def _commit(path: Path, parent: str | None, name: str, size: int = 300_000) -> str:
    blob = _git("hash-object", "-w", "--stdin", cwd=path, input=os.urandom(size))
    tree = _git("mktree", cwd=path, input=f"100644 blob {blob}\t{name}\n".encode())
    commit = _git("commit-tree", tree, *(["-p", parent] if parent else []), "-m", name, cwd=path)
    _git("update-ref", "refs/heads/main", commit, cwd=path)
    return commit


@pytest.fixture
def bare(tmp_path: Path) -> tuple[Path, str]:
    require_tool("git")
    path = tmp_path / "mirror.git"
    _git("init", "-q", "--bare", "-b", "main", str(path))
    c1 = _commit(path, None, "one.bin")
    return path, _commit(path, c1, "two.bin")


class Handler(Resource):
    """What GitApp does after parsing: ask the pack cache, else say so."""

    isLeaf = True

    def __init__(self, pc: PackCache, mirror: Mirror) -> None:
        super().__init__()
        self.pc, self.mirror = pc, mirror

    def render_POST(self, request: Any) -> Any:
        body = request.content.read()
        gp = (request.getHeader(b"git-protocol") or b"").decode() or None
        parsed = parse_request(body, 2 if gp and "version=2" in gp else 0)
        d = ensureDeferred(self.pc.serve(request, self.mirror, body, parsed, gp))

        def done(served: bool) -> None:
            if not served:
                request.setResponseCode(299)
                request.write(b"not cacheable")
            if not request.finished and not request._disconnected:
                request.finish()

        d.addCallback(done)
        return NOT_DONE_YET


class Spawns:
    """Counts upload-pack runs; optionally holds them until released."""

    def __init__(self) -> None:
        self.count = 0
        self.gate: Deferred[None] | None = None

    async def _run(self, *a: Any, **kw: Any) -> int:
        if self.gate is not None:
            await self.gate
        return await spawn_upload_pack(*a, **kw)

    def __call__(self, *a: Any, **kw: Any) -> Deferred[int]:
        self.count += 1
        return ensureDeferred(self._run(*a, **kw))


def packcache_of(h: Any) -> PackCache:
    """The PackCache the daemon's git app was built with (from its config)."""
    pc: PackCache = h.app(b"git").packcache
    return pc


@pytest.fixture
def env(bare: tuple[Path, str], harness_factory: MakeHarness) -> Any:
    mirrors = FakeMirrors()
    mirror = mirrors.add("r", path=bare[0])
    h = pytest_twisted.blockon(harness_factory(mirrors=mirrors))
    pc = packcache_of(h)
    spawns = Spawns()
    pc.spawn = spawns
    return SimpleNamespace(h=h, pc=pc, cache=h.cache, store=h.store, metrics=h.metrics, spawns=spawns, mirrors=mirrors,
                           mirror=mirror, bare=bare[0], head=bare[1], client=h.serve(Handler(pc, mirror)),
                           spool=Path(h.store.spool_dir))


def v2_fetch(*wants: str, args: tuple[str, ...] = ("thin-pack", "ofs-delta"), agent: str = "git/2.39.5",
             extra: tuple[str, ...] = ("done",)) -> bytes:
    return (pkt_line("command=fetch\n") + pkt_line(f"agent={agent}\n") + pkt_line("object-format=sha1\n") + DELIM
            + b"".join(pkt_line(a + "\n") for a in args) + b"".join(pkt_line(f"want {w}\n") for w in wants)
            + b"".join(pkt_line(a + "\n") for a in extra) + FLUSH)


def v0_fetch(want: str, caps: str = "multi_ack_detailed side-band-64k thin-pack ofs-delta agent=git/2.39.5") -> bytes:
    return pkt_line(f"want {want} {caps}\n") + FLUSH + pkt_line("done\n")


Posted = tuple[int, bytes | None, dict[str, str]]


def post(client: MemoryClient, body: bytes, protocol: str | None = "version=2") -> Deferred[Posted]:
    """(status, body or None when the response broke off, headers); sent at once."""
    return Deferred.fromCoroutine(_post(client, body, protocol))


async def _post(client: MemoryClient, body: bytes, protocol: str | None) -> Posted:
    headers = {"Content-Type": "application/x-git-upload-pack-request"}
    if protocol:
        headers["Git-Protocol"] = protocol
    r = await client.open("POST", "/git/r/git-upload-pack", body, headers)
    try:
        data: bytes | None = await read_body(r)
    except (ResponseFailed, PotentialDataLoss):
        data = None
    return r.code, data, {k.lower(): v for k, v in message(r.headers).items()}


def pack_of(response: bytes) -> bytes:
    """The pack inside a side-band response (v2 ``packfile`` section or v0 after NAK)."""
    out = bytearray()
    for pkt in iter_pkt_lines(response, text=False):
        if isinstance(pkt, bytes) and pkt[:1] == b"\x01":
            out += pkt[1:]
    assert out[:4] == b"PACK", response[:200]
    return bytes(out)


def check_pack(tmp: Path, pack: bytes, head: str) -> None:
    repo = tmp / f"check{os.getpid()}{len(list(tmp.iterdir()))}"
    _git("init", "-q", "--bare", str(repo))
    _git("index-pack", "--stdin", "--fix-thin", cwd=repo, input=pack)
    _git("update-ref", "refs/heads/main", head, cwd=repo)
    _git("fsck", "--strict", cwd=repo)


def metric(metrics: Metrics, result: str) -> float:
    v = metrics.registry.get_sample_value("sparkcache_requests_total", {"remote": REMOTE, "result": result})
    return v or 0.0


async def settled(cache: Cache) -> None:
    """Every computation finished, including its clean-up after the commit."""
    await eventually(lambda: cache.inflight == 0)
    for d in cache.running():
        await d


async def entries(store: Store) -> list[Any]:
    return list(await store.index.list_remote(REMOTE))


# -- pure functions ---------------------------------------------------------------------------


def test_cacheable_only_full_clones() -> None:
    w = "a" * 40
    assert cacheable(parse_request(v2_fetch(w), 2))
    assert cacheable(parse_request(v0_fetch(w), 0))
    assert not cacheable(parse_request(v2_fetch(w, extra=()), 2)), "no done: a negotiation round"
    assert not cacheable(parse_request(v2_fetch(w, extra=(f"have {'b' * 40}", "done")), 2))
    assert not cacheable(parse_request(v2_fetch(w, extra=("deepen 1", "done")), 2))
    assert not cacheable(parse_request(v2_fetch(w, extra=(f"shallow {'b' * 40}", "done")), 2))
    assert not cacheable(parse_request(v2_fetch(w, extra=("filter blob:none", "done")), 2))
    assert not cacheable(parse_request(pkt_line("command=ls-refs\n") + DELIM + pkt_line("peel\n") + FLUSH, 2))
    assert not cacheable(parse_request(v0_fetch(w, "multi_ack ofs-delta"), 0)), "v0 without side-band"


def test_key_ignores_agent_and_order_but_not_pack_shape() -> None:
    m = Mirror("r", "u", "/d/git/r.git")
    a, b = "a" * 40, "b" * 40
    k = cache_key(m, parse_request(v2_fetch(a, b), 2), "s1")
    assert k == cache_key(m, parse_request(v2_fetch(b, a, agent="git/2.45.0"), 2), "s1")
    assert k != cache_key(m, parse_request(v2_fetch(a, b), 2), "s2"), "ref state"
    assert k != cache_key(m, parse_request(v2_fetch(a, b, args=("thin-pack",)), 2), "s1"), "ofs-delta"
    assert k != cache_key(m, parse_request(v2_fetch(a), 2), "s1"), "wants"
    assert k != cache_key(Mirror("o", "u", "/d/git/o.git"), parse_request(v2_fetch(a, b), 2), "s1"), "mirror"
    v0 = parse_request(v0_fetch(a), 0)
    assert cache_key(m, v0, "s1") == cache_key(m, parse_request(v0_fetch(a, v0_caps_other_agent()), 0), "s1")
    assert cache_key(m, v0, "s1") != k


def v0_caps_other_agent() -> str:
    return "multi_ack_detailed side-band-64k thin-pack ofs-delta agent=git/2.45.0"


def test_ref_state_follows_refs(bare: tuple[Path, str]) -> None:
    path, head = bare
    s1 = ref_state(str(path))
    assert s1 == ref_state(str(path))
    _git("update-ref", "refs/tags/v1", head, cwd=path)
    s2 = ref_state(str(path))
    assert s2 != s1
    _git("pack-refs", "--all", cwd=path)
    assert ref_state(str(path)) != s2  # same refs, other files: a spurious miss at worst, never a wrong hit


def test_idle_child_is_stopped() -> None:
    clock = task.Clock()

    class FakeFlight:
        key = "k"
        queued = written = 0
        write_error = None
        on_drain: Any = None

        def data(self, chunk: bytes) -> None:
            pass

    class Producer:
        stopped = False

        def stopProducing(self) -> None:
            self.stopped = True

    c = Intake(FakeFlight(), clock, 10, "upload-pack produced nothing for {timeout:g}s")  # type: ignore[arg-type]
    p = Producer()
    c.registerProducer(p, True)
    clock.advance(9)
    c.write(b"0008NAK\n")
    clock.advance(9)
    assert not p.stopped
    clock.advance(2)
    assert p.stopped and c.error and "nothing for 10s" in c.error
    c.close()


def test_child_paused_while_the_spool_lags() -> None:
    clock = task.Clock()

    class SlowFlight:
        key = "k"
        queued = written = 0
        write_error = None
        on_drain: Any = None

        def data(self, chunk: bytes) -> None:
            self.queued += len(chunk)

    class Producer:
        paused = resumed = 0

        def pauseProducing(self) -> None:
            self.paused += 1

        def resumeProducing(self) -> None:
            self.resumed += 1

    flight = SlowFlight()
    c = Intake(flight, clock, 600, "idle")  # type: ignore[arg-type]
    p = Producer()
    c.registerProducer(p, True)
    for _ in range(40):
        c.write(b"x" * 65536)
    assert p.paused == 1 and p.resumed == 0
    flight.queued = 0  # the I/O thread caught up
    flight.on_drain()
    assert p.resumed == 1
    assert c.tail == b"x" * Intake.TAIL
    c.close()


# -- against upload-pack ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_identical_requests_compute_once(env: Any, tmp_path: Path) -> None:
    s1, first, h1 = await post(env.client, v2_fetch(env.head))
    assert s1 == 200 and first is not None
    assert h1["content-type"] == "application/x-git-upload-pack-result" and h1["x-cache"] == "MISS"
    assert first.endswith(b"0000")
    await settled(env.cache)
    s2, second, h2 = await post(env.client, v2_fetch(env.head, agent="git/2.45.0"))
    assert s2 == 200 and h2["x-cache"] == "HIT" and h2["cache-control"] == "no-cache"
    assert second == first
    assert env.spawns.count == 1
    assert metric(env.metrics, "miss") == 1 and metric(env.metrics, "hit") == 1
    await deferToThread(check_pack, tmp_path, pack_of(second), env.head)
    (row,) = await entries(env.store)
    assert row.size == len(first)
    assert os.listdir(env.spool) == []


@pytest_twisted.ensureDeferred
async def test_v0_side_band_clone_cached(env: Any, tmp_path: Path) -> None:
    s1, first, _ = await post(env.client, v0_fetch(env.head), None)
    assert s1 == 200 and first is not None and first.startswith(b"0008NAK\n")
    await settled(env.cache)
    _s, second, h = await post(env.client, v0_fetch(env.head, v0_caps_other_agent()), None)
    assert h["x-cache"] == "HIT" and second == first and env.spawns.count == 1
    await deferToThread(check_pack, tmp_path, pack_of(second), env.head)


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_share_one_computation(env: Any) -> None:
    env.spawns.gate = Deferred()
    calls = [post(env.client, v2_fetch(env.head)) for _ in range(4)]
    await eventually(lambda: metric(env.metrics, "miss") + metric(env.metrics, "joined") == 4)
    assert env.spawns.count == 1 and env.cache.inflight == 1
    env.spawns.gate.callback(None)
    results = [await c for c in calls]
    bodies = {r[1] for r in results}
    assert len(bodies) == 1 and None not in bodies
    assert all(r[0] == 200 for r in results)
    assert env.spawns.count == 1 and metric(env.metrics, "joined") == 3
    await settled(env.cache)
    assert len(await entries(env.store)) == 1


@pytest_twisted.ensureDeferred
async def test_refs_move_recompute_and_drop_superseded(env: Any) -> None:
    _s, first, _h = await post(env.client, v2_fetch(env.head))
    await settled(env.cache)
    (old,) = await entries(env.store)
    new_head = await deferToThread(_commit, env.bare, env.head, "three.bin")
    env.h.clock.advance(1)  # superseded means stored before the new computation started
    _s, again, h = await post(env.client, v2_fetch(env.head))
    assert h["x-cache"] == "MISS" and env.spawns.count == 2
    await settled(env.cache)
    (row,) = await entries(env.store)
    assert row.key != old.key, "the pack computed against the old refs is gone"
    _s, latest, h = await post(env.client, v2_fetch(new_head))
    assert h["x-cache"] == "MISS" and env.spawns.count == 3
    assert latest is not None and first is not None and len(latest) > len(first)


@pytest_twisted.ensureDeferred
async def test_upload_pack_failure_caches_nothing(env: Any) -> None:
    real = env.spawns

    def failing(reactor: Any, path: str, *, consumer: Any, **kw: Any) -> Deferred[int]:
        real.count += 1

        class P:
            def pauseProducing(self) -> None: ...
            def resumeProducing(self) -> None: ...
            def stopProducing(self) -> None: ...

        consumer.registerProducer(P(), True)
        # A whole response, final flush-pkt included: only the exit status says it failed.
        consumer.write(pkt_line("packfile\n") + pkt_line(b"\x01PACK" + os.urandom(3000)) + b"0000")
        d: Deferred[int] = Deferred()

        def end() -> None:
            consumer.unregisterProducer()
            d.callback(128)

        reactor.callLater(0.05, end)
        return d

    env.pc.spawn = failing
    status, body, _h = await post(env.client, v2_fetch(env.head))
    assert status == 200 and body is None, "the client must see a broken response, not a clean end"
    await settled(env.cache)
    assert await entries(env.store) == []
    await eventually(lambda: os.listdir(env.spool) == [])
    env.pc.spawn = real
    status, body, h = await post(env.client, v2_fetch(env.head))
    assert status == 200 and body is not None and body.endswith(b"0000") and h["x-cache"] == "MISS"
    assert real.count == 2


@pytest_twisted.ensureDeferred
async def test_response_without_final_flush_is_not_cached(env: Any) -> None:
    def truncated(reactor: Any, path: str, *, consumer: Any, **kw: Any) -> Deferred[int]:
        consumer.write(pkt_line("packfile\n") + pkt_line(b"\x01PACK"))
        return _fire(reactor, 0)  # exit 0, yet the response stops short of its flush-pkt

    env.pc.spawn = truncated
    status, body, _h = await post(env.client, v2_fetch(env.head))
    assert body is None
    await settled(env.cache)
    assert await entries(env.store) == []


def _fire(reactor: Any, code: int) -> Deferred[int]:
    d: Deferred[int] = Deferred()
    reactor.callLater(0.05, d.callback, code)
    return d


@pytest_twisted.ensureDeferred
async def test_not_cacheable_requests_pass_through(env: Any) -> None:
    for body in (v2_fetch(env.head, extra=("deepen 1", "done")), v2_fetch(env.head, extra=("filter blob:none", "done")),
                 v2_fetch(env.head, extra=(f"have {env.head}", "done")), v2_fetch(env.head, extra=())):
        status, data, _h = await post(env.client, body)
        assert (status, data) == (299, b"not cacheable")
    assert env.spawns.count == 0 and await entries(env.store) == []


@pytest_twisted.ensureDeferred
async def test_first_client_leaving_does_not_cancel_computation(env: Any) -> None:
    env.spawns.gate = Deferred()

    leaving = env.client.open("POST", "/x", v2_fetch(env.head), {"Git-Protocol": "version=2"})
    await eventually(lambda: env.cache.inflight == 1)
    (conn,) = env.client.agent.connections
    conn.reset()  # the client goes away before any answer
    with pytest.raises(ResponseNeverReceived):
        await leaving  # (the server saw the connection go first)
    # The computation keeps the mirror marked in use though its client left:
    # maintenance must not prune objects the running upload-pack still reads.
    assert env.mirrors.busy == 1
    env.spawns.gate.callback(None)
    await settled(env.cache)
    assert env.mirrors.busy == 0
    assert len(await entries(env.store)) == 1
    _s, _b, h = await post(env.client, v2_fetch(env.head))
    assert h["x-cache"] == "HIT" and env.spawns.count == 1


@pytest_twisted.ensureDeferred
async def test_switched_off_by_config(env: Any, harness_factory: MakeHarness) -> None:
    off = packcache_of(await harness_factory({"git": {"pack_cache": False}}, mirrors=env.mirrors))
    off.spawn = env.spawns
    assert not off.enabled
    assert await off.serve(None, env.mirror, v2_fetch(env.head), parse_request(v2_fetch(env.head), 2),
                           "version=2") is False
    assert env.spawns.count == 0
