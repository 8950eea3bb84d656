"""Cache.adopt: an upload already complete in a spool is committed as that very file.

The engine's test fixture (tests/unit/test_produce.py): a real store in a tmp
dir, a task.Clock, a fake upstream whose response the test holds back to
have a production of the key running.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from sparkcache.fetch import Live, Target
from sparkcache.fetch.flight import BodyError
from sparkcache.store import SpoolFile
from tests.support.waiting import eventually
from tests.unit.test_produce import FakeResponse, creq, env  # noqa: F401  (env: the engine's fixture)

BODY = bytes(range(256)) * 400


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


async def fetching(env: Any) -> Deferred[Any]:
    """A production of ``r:a`` from the fake upstream, asked for and not answered yet."""
    d = Deferred.fromCoroutine(env.cache.get(creq(env, "a")))
    await eventually(lambda: len(env.up.requests) == 1)
    return d


@pytest_twisted.ensureDeferred
async def test_a_running_production_of_the_key_ends_first(env: Any) -> None:
    fetch = await fetching(env)
    response = FakeResponse(length=len(b"upstream"))
    env.up.answer(response)
    live = await fetch
    assert isinstance(live, Live)
    adopting = Deferred.fromCoroutine(env.cache.adopt(Target("r:a", "r", "a", pinned=True), spooled(env, BODY), {}))
    await eventually(lambda: response.protocol is not None)
    assert not adopting.called
    response.send(b"upstream")
    response.end()
    entry = await adopting
    assert entry.digest == sha(BODY)
    assert (await env.store.index.get("r:a")).digest == sha(BODY)


@pytest_twisted.ensureDeferred
async def test_a_caller_that_gives_up_while_waiting_leaves_no_spool(env: Any) -> None:
    fetch = await fetching(env)
    adopting = Deferred.fromCoroutine(env.cache.adopt(Target("r:a", "r", "a"), spooled(env, BODY), {}))
    adopting.addErrback(lambda f: None)

    def uploads() -> list[str]:  # (the fetch has its own spool, made while upstream is asked)
        return [n for n in os.listdir(env.store.spool_dir) if n.startswith("up-")]

    assert len(uploads()) == 1
    adopting.cancel()
    assert uploads() == []
    env.up.requests[0].errback(Exception("no upstream here"))
    await fetch.addErrback(lambda f: None)
    # ... which a fetch that failed does not leave behind either.
    await eventually(lambda: os.listdir(env.store.spool_dir) == [])
