"""The engine options the Maven remote needs from the Upstream source:
``CacheRequest.next_on_404`` (a 404 moves on to the next upstream; one from
every upstream is cached negatively) and ``refuse_types`` (a 200 of a refused
media type is never stored, and the next upstream is tried)."""

from __future__ import annotations

import pytest
import pytest_twisted

from sparkcache.fetch import CacheRequest, Failed, Live
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

MIRRORS = (f"{UPSTREAM}/first", f"{UPSTREAM}/second", f"{UPSTREAM}/third")


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory({"remotes": {"files": {"type": "generic",
                                                                         "upstream": list(MIRRORS)}}}))


def req(h: Harness, path: str, **kwargs: object) -> CacheRequest:
    url, *mirrors = (f"{u}/{path}" for u in MIRRORS)
    return CacheRequest(h.config.remotes["files"], f"files:{path}", path, url, None, mirrors=tuple(mirrors),
                        **kwargs)  # type: ignore[arg-type]




@pytest_twisted.ensureDeferred
async def test_next_on_404_tries_every_upstream_in_order(h: Harness) -> None:
    h.upstream.add("/third/a.pom", b"in the third")
    result = await h.cache.get(req(h, "a.pom", next_on_404=True))
    assert isinstance(result, Live)
    entry = (await result.flight.wait_done()).entry
    assert entry.size == len(b"in the third")
    assert [h.upstream.count(f"/{m}/a.pom") for m in ("first", "second", "third")] == [1, 1, 1]
    # Without the option a 404 is an answer: the next upstream is not asked.
    h.upstream.add("/second/b.pom", b"in the second")
    result = await h.cache.get(req(h, "b.pom"))
    assert isinstance(result, Failed) and result.status == 404
    assert h.upstream.count("/second/b.pom") == 0


@pytest_twisted.ensureDeferred
async def test_a_404_from_every_upstream_is_cached_for_the_negative_ttl(h: Harness) -> None:
    for _ in range(3):
        result = await h.cache.get(req(h, "none.pom", next_on_404=True))
        assert isinstance(result, Failed) and result.status == 404
    assert h.upstream.total() == 3  # once per upstream, then the negative entry answers
    h.clock.advance(h.config.remotes["files"].cache.negative_ttl + 1)
    result = await h.cache.get(req(h, "none.pom", next_on_404=True))
    assert isinstance(result, Failed) and h.upstream.total() == 6


@pytest_twisted.ensureDeferred
async def test_a_404_then_a_failure_is_a_failure_not_a_cached_404(h: Harness) -> None:
    h.upstream.add("/third/c.pom", b"x")
    h.upstream.behave("/third/c.pom", status=503)
    result = await h.cache.get(req(h, "c.pom", next_on_404=True))
    assert isinstance(result, Failed) and result.status == 502 and result.stale_ok
    assert await h.store.index.get("files:c.pom") is None


@pytest_twisted.ensureDeferred
async def test_a_refused_media_type_is_never_stored(h: Harness) -> None:
    h.upstream.add("/first/d.jar", b"<html>portal</html>", content_type="text/html; charset=utf-8")
    h.upstream.add("/second/d.jar", b"the jar", content_type="application/java-archive")
    result = await h.cache.get(req(h, "d.jar", refuse_types=("text/html",)))
    assert isinstance(result, Live)
    assert (await result.flight.wait_done()).entry.size == len(b"the jar")
    h.upstream.add("/first/e.jar", b"<html>portal</html>", content_type="text/html")
    h.upstream.add("/second/e.jar", b"<html>portal</html>", content_type="text/html")
    h.upstream.add("/third/e.jar", b"<html>portal</html>", content_type="text/html")
    result = await h.cache.get(req(h, "e.jar", refuse_types=("text/html",)))
    assert isinstance(result, Failed) and result.status == 502 and "text/html" in result.message
    assert await h.store.index.get("files:e.jar") is None
