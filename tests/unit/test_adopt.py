"""Cache.adopt: an upload already complete in a spool is committed as that very file.

A real store in a tmp dir, a task.Clock; the only upstream is a fake whose
response the test holds back, to have a production of the key running.
"""

from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from sparkcache.config import CachePolicy, RemoteConfig
from sparkcache.fetch import Cache, CacheRequest, Live, Target
from sparkcache.fetch.flight import BodyError
from sparkcache.metrics import Metrics
from sparkcache.store import SpoolFile, Store
from tests.support.waiting import eventually
from tests.unit.test_produce import FakeResponse, FakeUpstream

BODY = bytes(range(256)) * 400


@pytest.fixture
def env(tmp_path: Any) -> Any:
    store = Store(str(tmp_path / "data"), reactor, max_size=1 << 30)
    pytest_twisted.blockon(Deferred.fromCoroutine(store.start()))
    clock = task.Clock()
    clock.advance(1000)
    up = FakeUpstream()
    cache = Cache(store, up, clock, Metrics())  # type: ignore[arg-type]
    yield SimpleNamespace(store=store, cache=cache, up=up)
    pytest_twisted.blockon(Deferred.fromCoroutine(store.stop()))


def spooled(env: Any, body: bytes) -> SpoolFile:
    spool: SpoolFile = env.store.new_spool("up-")
    spool.write(body)
    return spool


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@pytest_twisted.ensureDeferred
async def test_the_committed_body_is_the_spool_file_itself_and_pinned(env: Any) -> None:
    spool = spooled(env, BODY)
    inode = os.stat(spool.path).st_ino
    entry = await env.cache.adopt(Target("t:a", "t", "a", pinned=True), spool, {"content-type": "text/x"})
    assert entry.pinned and entry.digest == sha(BODY) and entry.size == len(BODY)
    assert entry.content_type == "text/x" and entry.expires is None
    assert os.stat(env.store.cas.local_path(entry.digest)).st_ino == inode
    assert (await env.store.index.get("t:a")).pinned
    assert os.listdir(env.store.spool_dir) == []


@pytest_twisted.ensureDeferred
async def test_an_upload_replaces_the_entry_and_releases_its_old_body(env: Any) -> None:
    first = await env.cache.adopt(Target("t:a", "t", "a", pinned=True), spooled(env, b"one"), {})
    second = await env.cache.adopt(Target("t:a", "t", "a", pinned=True), spooled(env, b"two"), {})
    assert (await env.store.index.get("t:a")).digest == second.digest == sha(b"two")
    assert not env.store.cas.contains(first.digest)


@pytest_twisted.ensureDeferred
async def test_a_digest_mismatch_is_not_kept_and_the_spool_is_gone(env: Any) -> None:
    with pytest.raises(BodyError):
        await env.cache.adopt(Target("t:a", "t", "a", expected_digest=sha(b"other")), spooled(env, BODY), {})
    assert await env.store.index.get("t:a") is None
    assert os.listdir(env.store.spool_dir) == []


@pytest_twisted.ensureDeferred
async def test_a_running_production_of_the_key_ends_first(env: Any) -> None:
    remote = RemoteConfig("t", "generic", "http://up.invalid", cache=CachePolicy(0, 60, 30), read_timeout=5)
    req = CacheRequest(remote=remote, key="t:a", path="a", url="http://up.invalid/a", ttl=None)
    fetching = Deferred.fromCoroutine(env.cache.get(req))
    await eventually(lambda: len(env.up.requests) == 1)
    response = FakeResponse(length=len(b"upstream"))
    env.up.answer(response)
    live = await fetching
    assert isinstance(live, Live)
    adopting = Deferred.fromCoroutine(env.cache.adopt(Target("t:a", "t", "a", pinned=True), spooled(env, BODY), {}))
    await eventually(lambda: response.protocol is not None)
    assert not adopting.called
    response.send(b"upstream")
    response.end()
    entry = await adopting
    assert entry.digest == sha(BODY)
    assert (await env.store.index.get("t:a")).digest == sha(BODY)


@pytest_twisted.ensureDeferred
async def test_a_caller_that_gives_up_while_waiting_leaves_no_spool(env: Any) -> None:
    remote = RemoteConfig("t", "generic", "http://up.invalid", cache=CachePolicy(0, 60, 30), read_timeout=5)
    req = CacheRequest(remote=remote, key="t:a", path="a", url="http://up.invalid/a", ttl=None)
    fetching = Deferred.fromCoroutine(env.cache.get(req))
    await eventually(lambda: len(env.up.requests) == 1)
    adopting = Deferred.fromCoroutine(env.cache.adopt(Target("t:a", "t", "a"), spooled(env, BODY), {}))
    adopting.addErrback(lambda f: None)
    assert len(os.listdir(env.store.spool_dir)) == 1
    adopting.cancel()
    assert os.listdir(env.store.spool_dir) == []
    env.up.requests[0].errback(Exception("no upstream here"))
    await fetching.addErrback(lambda f: None)
