"""A purge covers productions in flight: what a fetch that began before the
purge brings is served to its clients but never stored after the purge,
revalidations and negative answers included (the store's purge epochs)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from tests.support.client import bearer
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

ADMIN = "ad-f00dface"
CONFIG: dict[str, Any] = {
    "auth": {"anonymous_read": True, "tokens": [{"name": "a", "token": ADMIN, "scopes": ["read", "admin"]}]},
    "remotes": {
        "files": {"type": "generic", "upstream": UPSTREAM, "mutable_patterns": ["^/?meta/"],
                  "check_mutable_updates": True, "cache": {"mutable_ttl": 10, "negative_ttl": 60}},
        "other": {"type": "generic", "upstream": UPSTREAM},
    },
}
BODY = bytes(range(256)) * 40


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


# Each purge that covers files:big.bin (everything, its remote, its key), and
# one that does not (another remote).
PURGES = {
    "all": ("/admin/purge", True),
    "remote": ("/admin/purge?remote=files", True),
    "key": ("/admin/purge?remote=files&path=big.bin", True),
    "other remote": ("/admin/purge?remote=other", False),
}


@pytest.mark.parametrize("which", sorted(PURGES))
@pytest_twisted.ensureDeferred
async def test_a_fetch_in_flight_during_a_purge_is_not_stored(h: Harness, which: str) -> None:
    purge, covers = PURGES[which]
    h.upstream.add("/big.bin", BODY)
    h.upstream.behave("/big.bin", pause_at=1000, times=1)
    first = h.get("/api/files/big.bin")
    await h.upstream.until_paused("/big.bin")
    purged = await h.post(purge, None, bearer(ADMIN))
    assert purged.status == 200 and purged.json() == {"purged": 0}, purged.describe()
    h.upstream.resume("/big.bin")
    got = await first
    # The client that asked before the purge gets the whole body all the same.
    assert got.status == 200 and got.body == BODY and got.header("X-Cache") == "MISS"
    await h.settle()
    again = await h.get("/api/files/big.bin")
    assert again.status == 200 and again.body == BODY
    await h.settle()
    if covers:
        assert again.header("X-Cache") == "MISS" and h.upstream.count("/big.bin") == 2
        assert h.store.cas.contains(got_digest(BODY)) is True  # the second fetch stored it
    else:
        assert again.header("X-Cache") == "HIT" and h.upstream.count("/big.bin") == 1


def got_digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_body_fetched_across_a_purge_leaves_no_file_behind(h: Harness) -> None:
    h.upstream.add("/big.bin", BODY)
    h.upstream.behave("/big.bin", pause_at=1000, times=1)
    first = h.get("/api/files/big.bin")
    await h.upstream.until_paused("/big.bin")
    assert (await h.post("/admin/purge", None, bearer(ADMIN))).status == 200
    h.upstream.resume("/big.bin")
    assert (await first).body == BODY
    await h.settle()
    assert await h.store.index.get("files:big.bin") is None
    # Left a little longer for clients that read it by its entry once complete
    # (index pages do), then removed by the second eviction pass.
    assert h.store.cas.contains(got_digest(BODY))
    await h.store.evict()
    assert h.store.cas.contains(got_digest(BODY))
    await h.store.evict()
    assert list(h.store.cas.iter_digests()) == []


@pytest_twisted.ensureDeferred
async def test_a_revalidation_in_flight_during_a_purge_fetches_the_body_again(h: Harness) -> None:
    h.upstream.add("/meta/index.json", b'{"v": 1}')
    assert (await h.get("/api/files/meta/index.json")).status == 200
    await h.settle()
    h.clock.advance(20)  # stale (and short of any periodic eviction): the next request revalidates
    h.upstream.behave("/meta/index.json", stall=True, times=1)
    revalidating = h.get("/api/files/meta/index.json")
    await h.upstream.until_paused("/meta/index.json")
    purged = await h.post("/admin/purge?remote=files", None, bearer(ADMIN))
    assert purged.json() == {"purged": 1}  # the stale row and its body are gone
    h.upstream.resume("/meta/index.json")  # ... and upstream answers 304
    got = await revalidating
    assert got.status == 200 and got.body == b'{"v": 1}', got.describe()
    await h.settle()
    requests = h.upstream.requests_for("/meta/index.json")
    assert [r.status for r in requests] == [200, 304, 200]
    # The fetch after the purge was stored: a fresh hit, its body there.
    hit = await h.get("/api/files/meta/index.json")
    assert hit.status == 200 and hit.header("X-Cache") == "HIT" and hit.body == b'{"v": 1}'


@pytest_twisted.ensureDeferred
async def test_a_not_found_in_flight_during_a_purge_is_not_remembered(h: Harness) -> None:
    h.upstream.behave("/gone.bin", stall=True, times=1)
    asking = h.get("/api/files/gone.bin")
    await h.upstream.until_paused("/gone.bin")
    assert (await h.post("/admin/purge?remote=files", None, bearer(ADMIN))).status == 200
    h.upstream.resume("/gone.bin")
    assert (await asking).status == 404
    await h.settle()
    assert await h.store.index.get("files:gone.bin") is None
    h.upstream.add("/gone.bin", b"here now")
    assert (await h.get("/api/files/gone.bin")).body == b"here now"


@pytest_twisted.ensureDeferred
async def test_an_eviction_during_a_revalidation_is_not_undone(h: Harness) -> None:
    """The 304 does not bring back the row of a body evicted meanwhile."""
    h.upstream.add("/meta/index.json", b'{"v": 2}')
    assert (await h.get("/api/files/meta/index.json")).status == 200
    await h.settle()
    h.clock.advance(20)  # stale, short of the periodic eviction (60 s): only ours runs
    h.upstream.behave("/meta/index.json", stall=True, times=1)
    revalidating = h.get("/api/files/meta/index.json")
    await h.upstream.until_paused("/meta/index.json")
    h.store.max_size = 0
    await h.store.evict()
    assert await h.store.index.get("files:meta/index.json") is None
    h.store.max_size = 1 << 30
    h.upstream.resume("/meta/index.json")
    got = await revalidating
    assert got.status == 200 and got.body == b'{"v": 2}', got.describe()
    await h.settle()
    assert [r.status for r in h.upstream.requests_for("/meta/index.json")] == [200, 304, 200]
    assert (await h.get("/api/files/meta/index.json")).header("X-Cache") == "HIT"
