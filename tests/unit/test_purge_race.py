"""The race between a commit that finds its body already stored and a purge
or eviction deleting that body, driven step by step: the removal comes
between the commit's existence check and its index row, or is under way
when the commit begins. Either way the committed row's body is there."""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from sparkcache.store import Entry, Store

BODY = b"shared body " * 100
DIGEST = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def store(tmp_path: Any) -> Any:
    s = Store(str(tmp_path / "data"), reactor, max_size=1 << 30)
    pytest_twisted.blockon(Deferred.fromCoroutine(s.start()))
    yield s
    pytest_twisted.blockon(Deferred.fromCoroutine(s.stop()))


def spooled(store: Store, key: str, remote: str, body: bytes = BODY) -> tuple[Any, Entry]:
    spool = store.new_spool()
    spool.write(body)
    path = key.split(":", 1)[1]
    entry = Entry(key, remote, path, 200, spool.hexdigest(), len(body), None, {}, 1.0, None, None, None, 1.0)
    return spool, entry


async def commit(store: Store, key: str, remote: str) -> Entry:
    spool, entry = spooled(store, key, remote)
    return await store.commit(spool, entry)


async def purge_remote_a(store: Store) -> None:
    assert await store.purge_remote("a") == 1


async def evict_everything(store: Store) -> None:
    store.max_size = 0
    await store.evict()


@pytest.mark.parametrize("remove", [purge_remote_a, evict_everything], ids=["purge", "evict"])
@pytest_twisted.ensureDeferred
async def test_removal_between_the_existence_check_and_the_row(
        store: Store, monkeypatch: pytest.MonkeyPatch, remove: Callable[[Store], Any]) -> None:
    await commit(store, "a:one", "a")
    assert store.cas.contains(DIGEST)
    put = store.index.put
    steps: list[str] = []

    async def removal_then_put(entry: Entry) -> Entry:
        # The commit of b:two found the body stored and dropped its spool;
        # now, before its row exists, the only row naming the body goes.
        steps.append("removal")
        await remove(store)
        steps.append("insert")
        return await put(entry)

    monkeypatch.setattr(store.index, "put", lambda e: Deferred.fromCoroutine(removal_then_put(e)))
    entry = await commit(store, "b:two", "b")
    monkeypatch.undo()
    assert steps == ["removal", "insert"]
    assert await store.index.get("a:one") is None
    assert await store.index.get("b:two") == entry
    # The row names a body that is there: no "cached body missing".
    assert await store.read(entry, len(BODY)) == BODY
    # And it is accounted for: an eviction now removes it with its row.
    store.max_size = 0
    await store.evict()
    assert await store.index.get("b:two") is None and not store.cas.contains(DIGEST)


@pytest_twisted.ensureDeferred
async def test_a_commit_waits_for_a_removal_already_under_way(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    await commit(store, "a:one", "a")
    entered, release = threading.Event(), threading.Event()
    remove = store.cas.remove

    def held_remove(digest: str) -> int:
        entered.set()
        release.wait(30)
        return remove(digest)

    monkeypatch.setattr(store.cas, "remove", held_remove)
    purging = Deferred.fromCoroutine(purge_remote_a(store))
    assert await deferToThread(entered.wait, 30)  # the purge decided: the body goes, its unlink is under way
    spool, entry = spooled(store, "b:two", "b")
    committing = Deferred.fromCoroutine(store.commit(spool, entry))
    # It waits for the removal before looking for the body (which is still there).
    assert not committing.called and store.cas.contains(DIGEST)
    release.set()
    await purging
    assert await committing == entry
    assert await store.read(entry, len(BODY)) == BODY


@pytest_twisted.ensureDeferred
async def test_a_commit_refused_by_a_purge_removes_only_an_unreferenced_body(store: Store) -> None:
    """A production that began before a purge stores nothing; its body goes
    unless another row names it."""
    since = store.epoch()
    await store.purge_all()
    spool, entry = spooled(store, "a:late", "a")
    await store.commit(spool, entry, since)
    assert await store.index.get("a:late") is None
    # Its clients may still read it by the entry they were handed, for one eviction pass.
    assert await store.read(entry, len(BODY)) == BODY
    await store.evict()
    assert store.cas.contains(DIGEST)
    await store.evict()
    assert not store.cas.contains(DIGEST)
    # The same body, also committed by a production that began after the purge.
    spool, entry = spooled(store, "a:late", "a")
    await store.commit(spool, entry, since)
    await commit(store, "b:kept", "b")
    for _ in range(2):
        await store.evict()
    assert await store.index.get("a:late") is None and store.cas.contains(DIGEST)
    # An upload (pinned) is never refused: no purge removes uploads.
    spool, entry = spooled(store, "loc:up", "loc", b"uploaded")
    pinned = Entry(**{**entry.__dict__, "pinned": True})
    await store.commit(spool, pinned, since)
    assert await store.index.get("loc:up") == pinned


@pytest_twisted.ensureDeferred
async def test_a_link_to_a_body_let_go_of_is_refused(store: Store) -> None:
    """Another key for a stored body (an OCI manifest by digest, a mount) is
    added only while the body is still referenced."""
    first = await commit(store, "a:one", "a")
    alias = Entry(**{**first.__dict__, "key": "a:alias", "path": "alias"})
    assert await store.link(alias) is True
    assert await store.purge_remote("a") == 2 and not store.cas.contains(DIGEST)
    assert await store.link(alias) is False
    assert await store.index.get("a:alias") is None


@pytest_twisted.ensureDeferred
async def test_purge_epochs_cover_their_scope_only(store: Store) -> None:
    since = store.epoch()
    await store.purge_cached_key("r:x")
    assert store.purged_since(since, "r", "r:x") and not store.purged_since(since, "r", "r:y")
    await store.purge_remote("q")
    assert store.purged_since(since, "q", "q:z") and not store.purged_since(since, "r", "r:y")
    later = store.epoch()
    assert not store.purged_since(later, "r", "r:x") and not store.purged_since(later, "q", "q:z")
    # Past the bound of remembered keys, the oldest counts as a purge of everything
    # for the productions older than it (never fewer purges, only more).
    for n in range(4096):
        await store.purge_cached_key(f"r:k{n}")
    assert store.purged_since(since, "r", "r:y") and not store.purged_since(store.epoch(), "r", "r:y")
