"""Two Index objects on one file (two worker processes): neither serves from
memory a row the other replaced or deleted (store/changes.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from sparkcache.store.index import BUMP_EACH_MAX, Entry, Index


def _entry(key: str, digest: str) -> Entry:
    return Entry(key=key, remote="r", path=key, status=200, digest=digest, size=1, content_type=None, headers={},
                 fetched=0.0, expires=None, etag=None, last_modified=None, last_access=0.0)


@pytest.fixture
def pair(tmp_path: Path) -> Any:
    path = str(tmp_path / "index.sqlite")
    a, b = Index(path, reactor), Index(path, reactor)
    a.watch_changes()
    b.watch_changes()
    return a, b


@pytest_twisted.ensureDeferred
async def test_a_row_replaced_or_deleted_elsewhere_is_not_served_from_memory(pair: Any) -> None:
    a, b = pair
    await a.start()
    await b.start()
    try:
        await a.put(_entry("k", "d1"))
        assert a.peek("k").digest == "d1"  # its own write: cached and trusted
        assert (await b.get("k")).digest == "d1"
        assert b.peek("k") is not None  # cached in b now
        await a.put(_entry("k", "d2"))  # replaced by the other worker
        assert b.peek("k") is None
        assert (await b.get("k")).digest == "d2"
        await a.put(_entry("other", "d3"))  # another key: b keeps its row
        assert b.peek("k").digest == "d2"
        await a.delete_key("k")
        assert b.peek("k") is None and await b.get("k") is None
    finally:
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_large_purge_elsewhere_empties_the_memory(pair: Any) -> None:
    a, b = pair
    await a.start()
    await b.start()
    try:
        for n in range(BUMP_EACH_MAX + 1):
            await a.put(_entry(f"k{n}", f"d{n}"))
        await b.put(_entry("mine", "dm"))
        assert (await b.get("k0")).digest == "d0"
        await a.delete_remote("r")
        assert b.peek("k0") is None and b.peek("mine") is None
        assert await b.get("mine") is None
    finally:
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_one_process_alone_pays_nothing(tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.sqlite"), reactor)
    await index.start()
    try:
        await index.put(_entry("k", "d1"))
        assert index.peek("k").digest == "d1"
        assert not (tmp_path / "index.changes").exists()
    finally:
        await index.stop()
