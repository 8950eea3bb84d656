"""The store API protocols use instead of files and SQL: read, open_range,
exists, list, typed index queries, pinned entries, and the upgrade of an
index written before entries carried their own pin."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

import sparkcache
from sparkcache.store import Entry, Store
from sparkcache.store.cas import LocalContentStore


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "data"), reactor, max_size=1 << 30)
    pytest_twisted.blockon(_start(s))
    yield s
    pytest_twisted.blockon(_stop(s))


def _start(s: Store) -> Deferred[None]:
    return Deferred.fromCoroutine(s.start())


def _stop(s: Store) -> Deferred[None]:
    return Deferred.fromCoroutine(s.stop())


async def put(store: Store, key: str, body: bytes, *, remote: str = "r", path: str | None = None,
              pinned: bool = False, expires: float | None = None, access: float = 1.0) -> Entry:
    spool = store.new_spool()
    spool.write(body)
    entry = Entry(f"{remote}:{key}", remote, key if path is None else path, 200, spool.hexdigest(), len(body), None, {},
                  access, expires, None, None, access, pinned=pinned)
    return await store.commit(spool, entry)


# -- reading bodies ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_open_range_reads_exactly_the_range(store):
    body = bytes(range(256)) * 40
    e = await put(store, "x", body)
    with store.open_range(e) as whole:
        assert (whole.start, whole.end, len(whole)) == (0, len(body), len(body))
        assert whole.read_all() == body
    with store.open_range(e, 100, 1100) as part:
        assert len(part) == 1000 and part.read_all() == body[100:1100]
        # Chunked reads at absolute offsets never run past the range's end.
        assert part.read(100, 300) == body[100:400]
        assert part.read(1000, 300) == body[1000:1100]
        assert part.read(1100, 10) == b""
        assert os.fstat(part.fileno()).st_size == len(body)


@pytest_twisted.ensureDeferred
async def test_open_range_of_a_missing_body(store):
    e = await put(store, "x", b"gone soon")
    os.unlink(store.cas.local_path(e.digest))
    with pytest.raises(FileNotFoundError):
        store.open_range(e)
    negative = Entry("r:404", "r", "404", 404, None, 0, None)
    with pytest.raises(ValueError):
        store.open_range(negative)


@pytest_twisted.ensureDeferred
async def test_a_closed_range_is_no_longer_held_and_closes_once(store):
    e = await put(store, "x", b"x" * 10)
    r = store.open_range(e)
    r2 = store.open_range(e)
    fd = r.fileno()
    r.close()
    r.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(AssertionError):
        r.read(0, 1)
    # Still held by r2: eviction of everything passes it by.
    store.max_size = 0
    assert await store.evict() == 0
    r2.close()
    assert await store.evict() == 1
    assert await store.index.get("r:x") is None


@pytest_twisted.ensureDeferred
async def test_read_of_a_large_body_is_one_read_not_chunks_and_a_join(store, monkeypatch):
    # Chunks plus their join held a body twice over (80 MB for a 40 MB npm packument).
    body = os.urandom(5 << 20)
    e = await put(store, "big", body)
    sizes = []
    real_read = os.read

    def spy(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        sizes.append(len(data))
        return data

    monkeypatch.setattr("sparkcache.store.os.read", spy)  # the os module: other threads' reads show too
    assert await store.read(e, len(body)) == body
    assert [n for n in sizes if n > 64] == [len(body)]


@pytest_twisted.ensureDeferred
async def test_read_is_bounded_and_runs_in_the_io_pool(store, monkeypatch):
    body = os.urandom(3 << 20)
    e = await put(store, "big", body)
    threads = []
    real_open = store.cas.open

    def spy(digest: str) -> int:
        threads.append(threading.current_thread())
        return real_open(digest)

    monkeypatch.setattr(store.cas, "open", spy)
    assert await store.read(e, len(body)) == body
    assert await store.read(e, 10) == body[:11]  # limit + 1: "larger than limit" is visible
    assert await store.read(e, len(body) + 100) == body
    assert threads and all(t is not threading.main_thread() for t in threads)
    os.unlink(store.cas.local_path(e.digest))
    with pytest.raises(FileNotFoundError):
        await store.read(e, 10)


@pytest_twisted.ensureDeferred
async def test_exists(store):
    e = await put(store, "x", b"here")
    assert store.exists(e)
    os.unlink(store.cas.local_path(e.digest))
    assert not store.exists(e)
    assert not store.exists(Entry("r:404", "r", "404", 404, None, 0, None))


def test_content_store_open(tmp_path):
    cas = LocalContentStore(str(tmp_path / "cas"))
    src = tmp_path / "spool"
    src.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(FileNotFoundError):
        cas.open(digest)
    assert cas.commit(str(src), digest)
    fd = cas.open(digest)
    try:
        assert os.pread(fd, 10, 0) == b"abc"
    finally:
        os.close(fd)
    with pytest.raises(ValueError):
        cas.open("../../etc/passwd")


# -- listing ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_list_by_remote_and_prefix(store):
    for p in ("b/2", "a/1", "b/1", "c"):
        await put(store, p, p.encode())
    await put(store, "b/9", b"other remote", remote="s")
    await store.index.put(Entry("r:b/404", "r", "b/404", 404, None, 0, None, {}, 1.0, 2.0))
    assert [e.path for e in await store.list("r")] == ["a/1", "b/1", "b/2", "c"]
    assert [e.path for e in await store.list("r", "b/")] == ["b/1", "b/2"]
    assert [e.path for e in await store.list("r", "b/", limit=1)] == ["b/1"]
    assert [e.path for e in await store.list("s")] == ["b/9"]
    assert await store.list("r", "zz") == [] and await store.list("nobody") == []
    # A prefix is matched literally, never as a pattern.
    await put(store, "x%_/1", b"odd")
    assert [e.path for e in await store.list("r", "x%_")] == ["x%_/1"]
    assert await store.list("r", "x__") == []


@pytest_twisted.ensureDeferred
async def test_prefixes_before(store):
    for p in ("team/app/_manifests/v1", "team/app/_manifests/sha256:ab", "team/app/_layers/sha256:cd",
              "base/_manifests/latest", "only/_layers/sha256:ef"):
        await put(store, p, p.encode(), remote="loc")
    await put(store, "elsewhere/_manifests/x", b"x", remote="other")
    assert await store.index.prefixes_before("loc", "/_manifests/") == ["base", "team/app"]
    assert await store.index.prefixes_before("loc", "/_nothing/") == []


# -- pinned entries ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pinned_entries_survive_eviction(store):
    # The pinned body is the least recently used of all: it must still stay.
    up = await put(store, "upload", b"u" * 3000, remote="loc", pinned=True, access=1.0)
    for i in range(3):
        await put(store, f"c{i}", bytes([i]) * 3000, access=2.0 + i)
    store.max_size = 7000  # evicts down to 95%: two cached bodies
    assert await store.evict() == 2
    assert await store.index.get(up.key) is not None and store.exists(up)
    assert [e.path for e in await store.list("r")] == ["c2"]
    store.max_size = 0
    assert await store.evict() == 1
    assert await store.evict() == 0
    assert await store.index.get(up.key) is not None and store.exists(up)
    assert store.size == 3000


@pytest_twisted.ensureDeferred
async def test_a_body_shared_with_a_pinned_entry_is_never_evicted(store):
    same = b"s" * 4000
    up = await put(store, "upload", same, remote="loc", pinned=True, access=1.0)
    cached = await put(store, "copy", same, access=1.0)
    store.max_size = 0
    assert await store.evict() == 0
    assert await store.index.get(cached.key) is not None
    # A cache purge drops the cached row, never the body the upload still names.
    assert await store.purge_all() == 1
    assert await store.index.get(cached.key) is None
    with store.open_range(up) as r:
        assert r.read_all() == same


@pytest_twisted.ensureDeferred
async def test_cache_purges_and_expiry_leave_pinned_entries(store):
    up = await put(store, "upload", b"u", remote="loc", pinned=True, expires=5.0)
    await put(store, "x", b"x", remote="loc", expires=5.0)  # cached under the same remote
    await put(store, "y", b"y")
    assert await store.expire(now=1000.0, retention=10.0) == 1
    assert await store.purge_remote("loc") == 0
    assert await store.purge_all() == 1
    assert [e.key for e in await store.list("loc")] == [up.key]
    assert store.entries == 1 and store.exists(up)
    # Deleting the key itself is explicit: that removes it.
    assert await store.purge_key(up.key) == 1
    assert await store.index.get(up.key) is None and not store.exists(up)


@pytest_twisted.ensureDeferred
async def test_pinned_survives_a_restart_and_the_memory_mirror(tmp_path):
    first = Store(str(tmp_path / "data"), reactor, max_size=1 << 30)
    await _start(first)
    try:
        up = await put(first, "upload", b"u", remote="loc", pinned=True)
        assert first.index.peek(up.key).pinned
    finally:
        await _stop(first)
    again = Store(str(tmp_path / "data"), reactor, max_size=1 << 30)
    await _start(again)
    try:
        got = await again.index.get(up.key)
        assert got is not None and got.pinned
        assert await again.purge_all() == 0
    finally:
        await _stop(again)


# -- upgrade of an older index -----------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE entries (
    key TEXT PRIMARY KEY, remote TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL, digest TEXT,
    size INTEGER NOT NULL, content_type TEXT, headers TEXT NOT NULL, fetched REAL NOT NULL, expires REAL,
    etag TEXT, last_modified TEXT, last_access REAL NOT NULL
);
CREATE INDEX entries_remote ON entries(remote);
CREATE INDEX entries_digest ON entries(digest);
CREATE INDEX entries_expires ON entries(expires);
CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, last_access REAL NOT NULL);
CREATE INDEX blobs_access ON blobs(last_access);
"""


def _old_data_dir(data: Path, rows: dict[str, tuple[str, bytes]]) -> None:
    """A data dir as the version before per-entry pins wrote it: key → (remote, body)."""
    cas = LocalContentStore(str(data / "cas"))
    db = sqlite3.connect(data / "index.sqlite")
    db.executescript(OLD_SCHEMA)
    for key, (remote, body) in rows.items():
        digest = hashlib.sha256(body).hexdigest()
        src = data / "tmp"
        src.write_bytes(body)
        cas.commit(str(src), digest)
        path = key.split(":", 1)[1]
        db.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   (key, remote, path, 200, digest, len(body), None, "{}", 1.0, None, None, None, 1.0))
        db.execute("INSERT OR IGNORE INTO blobs VALUES (?,?,?)", (digest, len(body), 1.0))
    db.commit()
    db.close()


@pytest_twisted.ensureDeferred
async def test_upgrade_pins_what_the_old_version_kept(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _old_data_dir(data, {"uploads:a.bin": ("uploads", b"upload a" * 500), "cache:b.bin": ("cache", b"cached b" * 500),
                         "loc:app/_layers/sha256:x": ("loc", b"pushed" * 500)})
    s = Store(str(data), reactor, max_size=1 << 30)
    s.index.legacy_pinned_remotes = frozenset({"uploads", "loc"})
    await _start(s)
    try:
        assert (await s.index.get("uploads:a.bin")).pinned
        assert (await s.index.get("loc:app/_layers/sha256:x")).pinned
        assert not (await s.index.get("cache:b.bin")).pinned
        s.max_size = 0
        assert await s.evict() == 1
        assert await s.purge_all() == 0
        assert [e.key for e in await s.list("uploads")] == ["uploads:a.bin"]
    finally:
        await _stop(s)
    db = sqlite3.connect(data / "index.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()

    # Once upgraded, the remotes named at start-up no longer matter: pins are per entry.
    again = Store(str(data), reactor, max_size=1 << 30)
    await _start(again)
    try:
        await again.index.put(Entry("uploads:new", "uploads", "new", 404, None, 0, None, {}, 1.0, 2.0))
    finally:
        await _stop(again)
    third = Store(str(data), reactor, max_size=1 << 30)
    third.index.legacy_pinned_remotes = frozenset({"uploads"})
    await _start(third)
    try:
        assert not (await third.index.get("uploads:new")).pinned
    finally:
        await _stop(third)


@pytest_twisted.ensureDeferred
async def test_a_new_index_needs_no_upgrade(tmp_path):
    s = Store(str(tmp_path / "d"), reactor, max_size=1 << 30)
    s.index.legacy_pinned_remotes = frozenset({"uploads"})
    await _start(s)
    try:
        e = await put(s, "a", b"a", remote="uploads")
        assert not (await s.index.get(e.key)).pinned  # the protocol says what it pins, not the remote
    finally:
        await _stop(s)


# -- nothing outside the store opens its files or runs SQL ----------------------------------------

# Files allowed a number of store-path uses (none: Helm reads through store.read now).
_PATH_USERS: dict[str, int] = {}


def test_protocols_and_serving_go_through_the_store_api():
    root = Path(sparkcache.__file__).parent
    sql = re.compile(r"\bsqlite3\b|\.execute\(|\.index\.db\b|\.index\.pool\b")
    paths = re.compile(r"\bstore\.path\(|\.local_path\(|\.cas\.")
    for sub in ("protocols", "web"):
        for f in sorted((root / sub).rglob("*.py")):
            text = f.read_text()
            rel = str(f.relative_to(root))
            assert not sql.search(text), f"{rel} runs SQL: use a typed index query"
            assert len(paths.findall(text)) <= _PATH_USERS.get(rel, 0), f"{rel} opens store paths: use open_range/read"
