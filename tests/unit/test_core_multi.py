"""Core pieces the package registries build on: several upstreams tried in order,
digests in algorithms other than sha256 checked while a body streams, and group
remotes' member checks."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted

from sparkcache.config import ConfigError
from sparkcache.fetch import CacheRequest, Failed, Hit, Live
from sparkcache.fetch.flight import BodyError
from sparkcache.protocols import load_config_data
from sparkcache.protocols._group import first_having, group_kind
from sparkcache.protocols.base import ProtocolSpec, Built, RemoteKind
from sparkcache.protocols import PROTOCOLS
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

MIRRORS = [f"{UPSTREAM}/first", f"{UPSTREAM}/second"]


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory({"remotes": {"files": {"type": "generic", "upstream": MIRRORS}}}))


@pytest_twisted.ensureDeferred
async def test_a_failing_upstream_falls_back_to_the_next(h: Harness) -> None:
    h.upstream.add("/first/a.bin", b"from the first")
    h.upstream.add("/second/a.bin", b"from the second")
    h.upstream.behave("/first/a.bin", status=503)
    resp = await h.get("/api/files/a.bin")
    assert resp.status == 200 and resp.body == b"from the second"
    assert h.upstream.count("/first/a.bin") == 1 and h.upstream.count("/second/a.bin") == 1
    # A 404 is an answer, not a failure: the next upstream is not asked.
    h.upstream.add("/second/b.bin", b"only in the second")
    resp = await h.get("/api/files/b.bin")
    assert resp.status == 404 and h.upstream.count("/second/b.bin") == 0


@pytest_twisted.ensureDeferred
async def test_every_upstream_failing_is_a_bad_gateway(h: Harness) -> None:
    for p in ("/first/c.bin", "/second/c.bin"):
        h.upstream.add(p, b"x")
        h.upstream.behave(p, status=500)
    resp = await h.get("/api/files/c.bin")
    assert resp.status == 502


def _request(h: Harness, path: str, checks: tuple[tuple[str, str], ...]) -> CacheRequest:
    remote = h.config.remotes["files"]
    return CacheRequest(remote, f"files:{path}", path, f"{UPSTREAM}/first/{path}", None, checks=checks)


@pytest_twisted.ensureDeferred
async def test_sha512_checks_keep_matching_bodies_and_refuse_others(h: Harness) -> None:
    good, bad = b"good bytes" * 1000, b"tampered" * 1000
    h.upstream.add("/first/good.tgz", good)
    h.upstream.add("/first/bad.tgz", bad)
    cache = h.cache
    result = await cache.get(_request(h, "good.tgz", (("sha512", hashlib.sha512(good).hexdigest()),)))
    assert isinstance(result, Live)
    flight = await result.flight.wait_done()
    assert flight.entry.size == len(good)
    assert isinstance(await cache.get(_request(h, "good.tgz", ())), Hit)

    result = await cache.get(_request(h, "bad.tgz", (("sha512", hashlib.sha512(good).hexdigest()),)))
    assert isinstance(result, Live)
    with pytest.raises(BodyError, match="sha512"):
        await result.flight.wait_done()
    assert await h.store.index.get("files:bad.tgz") is None


def load(data: Any) -> Any:
    kinds = (RemoteKind("thing", many_upstreams=True), RemoteKind("thing-local", needs_upstream=False),
             group_kind("thing-group", {"thing", "thing-local"}, "/thing/{name}/"))
    spec = ProtocolSpec("thing", (b"thing",), lambda ctx: Built(), kinds)
    return load_config_data(data, "cache.yaml", {}, (*PROTOCOLS, spec))


def test_group_members_are_checked() -> None:
    cfg = load({"remotes": {"all": {"type": "thing-group", "members": ["mine", "up"]},
                            "mine": {"type": "thing-local"}, "up": {"type": "thing", "upstream": MIRRORS}}})
    assert cfg.remotes["all"].options.members == ("mine", "up")
    assert cfg.remotes["up"].upstreams == tuple(MIRRORS) and cfg.remotes["up"].upstream == MIRRORS[0]
    cases = [
        ({"all": {"type": "thing-group"}}, "remotes.all.members", "missing"),
        ({"all": {"type": "thing-group", "members": []}}, "remotes.all.members", "empty"),
        ({"all": {"type": "thing-group", "members": ["x"]}}, "remotes.all.members[0]", "no remote named 'x'"),
        ({"all": {"type": "thing-group", "members": ["f", "f"]}, "f": {"type": "thing-local"}},
         "remotes.all.members[1]", "listed twice"),
        ({"all": {"type": "thing-group", "members": ["g"]}, "g": {"type": "generic", "upstream": UPSTREAM}},
         "remotes.all.members[0]", "type: generic"),
        ({"all": {"type": "thing-group", "members": ["all"]}}, "remotes.all.members[0]", "type: thing-group"),
        ({"all": {"type": "thing-group", "members": ["f"], "upstream": UPSTREAM}, "f": {"type": "thing-local"}},
         "remotes.all.upstream", "no upstream of its own"),
        ({"o": {"type": "oci", "upstream": MIRRORS}}, "remotes.o.upstream", "not a list"),
        ({"t": {"type": "thing", "upstream": []}}, "remotes.t.upstream", "empty"),
        ({"t": {"type": "thing", "upstream": [UPSTREAM, 3]}}, "remotes.t.upstream[1]", "expected a URL"),
        ({"t": {"type": "thing", "upstream": [UPSTREAM, "ftp://x"]}}, "remotes.t.upstream[1]", "http"),
    ]
    for remotes, path, problem in cases:
        with pytest.raises(ConfigError) as e:
            load({"remotes": remotes})
        assert e.value.path == path and problem in e.value.problem, (remotes, str(e.value))


@pytest_twisted.ensureDeferred
async def test_first_having_stops_at_the_first_member_that_has_the_name() -> None:
    asked: list[str] = []

    async def probe(m: str) -> str | None:
        asked.append(m)
        return {"b": "found in b", "c": "found in c"}.get(m)

    assert await first_having(["a", "b", "c"], probe) == ("b", "found in b")
    assert asked == ["a", "b"]
    assert await first_having(["a"], probe) is None
