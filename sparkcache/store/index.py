"""The SQLite index: cache key → body digest, headers, freshness, validators.

SQLite runs in one dedicated thread (a ThreadPool of size 1), so the reactor
never waits on disk and the connection is only ever used from one thread.
Rows are mirrored in a bounded in-memory LRU (20,000 rows, ~1 KiB each) so a
hit on a hot key costs no thread hop at all; colder keys cost one trip to the
SQLite thread. Last-access times are written back in batches.
"""

from __future__ import annotations

import json
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    remote TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    digest TEXT,
    size INTEGER NOT NULL,
    content_type TEXT,
    headers TEXT NOT NULL,
    fetched REAL NOT NULL,
    expires REAL,
    etag TEXT,
    last_modified TEXT,
    last_access REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_remote ON entries(remote);
CREATE INDEX IF NOT EXISTS entries_digest ON entries(digest);
CREATE INDEX IF NOT EXISTS entries_expires ON entries(expires);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    last_access REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_access ON blobs(last_access);
"""


@dataclass(frozen=True)
class Entry:
    """One cached response. ``status`` 404 with no digest is a negative entry."""

    key: str
    remote: str
    path: str
    status: int
    digest: str | None
    size: int
    content_type: str | None
    headers: dict[str, str] = field(default_factory=dict)
    fetched: float = 0.0
    expires: float | None = None  # None: never expires
    etag: str | None = None
    last_modified: str | None = None
    last_access: float = 0.0

    def fresh(self, now: float) -> bool:
        return self.expires is None or now < self.expires

    def as_row(self) -> tuple[Any, ...]:
        return (
            self.key, self.remote, self.path, self.status, self.digest, self.size,
            self.content_type, json.dumps(self.headers), self.fetched, self.expires,
            self.etag, self.last_modified, self.last_access,
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> "Entry":
        (key, remote, path, status, digest, size, ctype, headers, fetched, expires, etag, lm, la) = row
        return cls(key, remote, path, status, digest, size, ctype, json.loads(headers), fetched, expires, etag, lm, la)


_COLUMNS = "key, remote, path, status, digest, size, content_type, headers, fetched, expires, etag, last_modified, last_access"


class Index:
    def __init__(self, path: str, reactor: IReactorThreads, memory_entries: int = 20_000,
                 pool: ThreadPool | None = None) -> None:
        self.path = path
        self._reactor = reactor
        # One thread: SQLite connections are not shared across threads. A pool
        # handed in is started and stopped by its owner (the service tree).
        self._own_pool = pool is None
        self.pool = pool if pool is not None else ThreadPool(minthreads=1, maxthreads=1, name="sparkcache-sqlite")
        self._db: sqlite3.Connection | None = None
        self._mem: OrderedDict[str, Entry] = OrderedDict()
        self._mem_max = memory_entries
        self._touched: dict[str, float] = {}
        # Remotes whose bodies exist nowhere else (type: local, oci-local): never LRU-evicted.
        self.keep_remotes: frozenset[str] = frozenset()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Deferred[None]:
        if self._own_pool:
            self.pool.start()
        return self._run(self._open)

    def stop(self) -> Deferred[None]:
        d = self.flush_access()

        def close(_: object) -> Deferred[None]:
            return self._run(self._close)

        def stop_pool(r: object) -> object:
            if self._own_pool:
                self.pool.stop()
            return r

        d.addCallback(close)
        d.addBoth(stop_pool)
        return d

    def _open(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a crash can lose the last transactions but never
        # corrupts; the body files are fsynced before their rows are written.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self.pool, fn, *args)  # type: ignore[arg-type]

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "index not started"
        return self._db

    # -- memory mirror ------------------------------------------------------

    def _remember(self, entry: Entry) -> None:
        self._mem[entry.key] = entry
        self._mem.move_to_end(entry.key)
        while len(self._mem) > self._mem_max:
            self._mem.popitem(last=False)

    def _forget(self, keys: Iterable[str]) -> None:
        for k in keys:
            self._mem.pop(k, None)
            self._touched.pop(k, None)

    # -- reads -----------------------------------------------------------------

    def get(self, key: str) -> Deferred[Entry | None]:
        e = self._mem.get(key)
        if e is not None:
            self._mem.move_to_end(key)
            return succeed(e)

        def found(entry: Entry | None) -> Entry | None:
            if entry is not None:
                self._remember(entry)
            return entry

        return self._run(self._get, key).addCallback(found)

    def peek(self, key: str) -> Entry | None:
        """The in-memory row only: no thread hop, may miss."""
        return self._mem.get(key)

    def _get(self, key: str) -> Entry | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE key=?", (key,)).fetchone()
        return Entry.from_row(row) if row else None

    def list_remote(self, remote: str, limit: int = 10_000) -> Deferred[list[Entry]]:
        def q() -> list[Entry]:
            rows = self.db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE remote=? AND status=200 ORDER BY path LIMIT ?", (remote, limit)
            ).fetchall()
            return [Entry.from_row(r) for r in rows]

        return self._run(q)

    def stats(self) -> Deferred[tuple[int, int]]:
        """(bytes stored, entries)."""

        def q() -> tuple[int, int]:
            size = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]
            n = self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            return int(size), int(n)

        return self._run(q)

    def expired_keys(self, now: float, retention: float) -> Deferred[list[tuple[str, str | None]]]:
        """Negative entries past their TTL, and bodies stale for longer than ``retention``."""

        def q() -> list[tuple[str, str | None]]:
            return self.db.execute(
                "SELECT key, digest FROM entries WHERE expires IS NOT NULL AND "
                "((status != 200 AND expires < ?) OR expires < ?)", (now, now - retention)
            ).fetchall()

        return self._run(q)

    def lru_blobs(self, limit: int) -> Deferred[list[tuple[str, int]]]:
        keep = sorted(self.keep_remotes)
        if not keep:
            return self._run(lambda: self.db.execute(
                "SELECT digest, size FROM blobs ORDER BY last_access LIMIT ?", (limit,)
            ).fetchall())
        # Bodies that some kept remote still names are never candidates.
        return self._run(lambda: self.db.execute(
            "SELECT digest, size FROM blobs WHERE NOT EXISTS (SELECT 1 FROM entries WHERE entries.digest=blobs.digest "
            f"AND entries.remote IN ({','.join('?' * len(keep))})) ORDER BY last_access LIMIT ?", (*keep, limit)
        ).fetchall())

    # -- writes ------------------------------------------------------------

    def put(self, entry: Entry) -> Deferred[Entry]:
        """Record an entry whose body (if any) is already committed to the store."""

        def q() -> None:
            with self.db:
                self.db.execute(f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES ({','.join('?' * 13)})", entry.as_row())
                if entry.digest is not None:
                    self.db.execute(
                        "INSERT INTO blobs (digest, size, last_access) VALUES (?, ?, ?) "
                        "ON CONFLICT(digest) DO UPDATE SET last_access=excluded.last_access",
                        (entry.digest, entry.size, entry.last_access),
                    )
            return None

        def done(_: object) -> Entry:
            self._touched.pop(entry.key, None)
            self._remember(entry)
            return entry

        return self._run(q).addCallback(done)

    def touch(self, entry: Entry, now: float) -> None:
        """Note an access; written back by flush_access().

        On the hit path, so it only records the time: the in-memory row keeps
        its old last_access (nothing reads it; eviction orders by SQLite's)."""
        self._touched[entry.key] = now

    def flush_access(self) -> Deferred[None]:
        if not self._touched:
            return succeed(None)
        touched, self._touched = self._touched, {}

        def q() -> None:
            with self.db:
                self.db.executemany("UPDATE entries SET last_access=? WHERE key=?", [(t, k) for k, t in touched.items()])
                self.db.execute(
                    "UPDATE blobs SET last_access=(SELECT MAX(last_access) FROM entries WHERE entries.digest=blobs.digest) "
                    f"WHERE digest IN (SELECT digest FROM entries WHERE key IN ({','.join('?' * len(touched))}))",
                    list(touched),
                )

        return self._run(q)

    def delete_where(self, where: str, args: tuple[Any, ...]) -> Deferred[tuple[int, list[str]]]:
        """Delete matching entries; returns (count, digests no longer referenced).

        The caller removes those bodies after the rows are gone, so a crash in
        between leaves orphan files (collected at start-up), never rows
        pointing at missing bodies.
        """

        def q() -> tuple[list[str], list[str]]:
            with self.db:
                rows = self.db.execute(f"SELECT key, digest FROM entries WHERE {where}", args).fetchall()
                keys = [r[0] for r in rows]
                digests = {r[1] for r in rows if r[1]}
                self.db.execute(f"DELETE FROM entries WHERE {where}", args)
                orphans = [
                    d for d in digests
                    if self.db.execute("SELECT 1 FROM entries WHERE digest=? LIMIT 1", (d,)).fetchone() is None
                ]
                self.db.executemany("DELETE FROM blobs WHERE digest=?", [(d,) for d in orphans])
                return keys, orphans

        def done(r: tuple[list[str], list[str]]) -> tuple[int, list[str]]:
            keys, orphans = r
            self._forget(keys)
            return len(keys), orphans

        return self._run(q).addCallback(done)

    def delete_key(self, key: str) -> Deferred[tuple[int, list[str]]]:
        self._forget([key])
        return self.delete_where("key=?", (key,))

    def delete_remote(self, remote: str) -> Deferred[tuple[int, list[str]]]:
        return self.delete_where("remote=?", (remote,))

    def delete_all(self) -> Deferred[tuple[int, list[str]]]:
        self._mem.clear()
        self._touched.clear()
        return self.delete_where("1=1", ())

    def delete_digest(self, digest: str) -> Deferred[tuple[int, list[str]]]:
        return self.delete_where("digest=?", (digest,))

    def unreferenced(self, digest: str) -> Deferred[list[str]]:
        """Forget the blob row of ``digest`` if no entry points at it any more."""

        def q() -> list[str]:
            with self.db:
                if self.db.execute("SELECT 1 FROM entries WHERE digest=? LIMIT 1", (digest,)).fetchone():
                    return []
                self.db.execute("DELETE FROM blobs WHERE digest=?", (digest,))
                return [digest]

        return self._run(q)

    def reconcile(self, present: dict[str, int]) -> Deferred[tuple[int, list[str]]]:
        """Start-up cross-check against the bodies actually on disk.

        Drops rows whose body is missing or has the wrong size; returns
        (rows dropped, digests on disk that no row references).
        """

        def q() -> tuple[int, list[str]]:
            with self.db:
                blobs = dict(self.db.execute("SELECT digest, size FROM blobs").fetchall())
                # Negative entries have no digest, which IN(...) never matches.
                referenced = {r[0] for r in self.db.execute("SELECT DISTINCT digest FROM entries WHERE digest IS NOT NULL")}
                bad = [d for d in referenced if present.get(d) is None or (d in blobs and blobs[d] != present[d])]
                dropped = 0
                for d in bad:
                    dropped += self.db.execute("DELETE FROM entries WHERE digest=?", (d,)).rowcount
                    self.db.execute("DELETE FROM blobs WHERE digest=?", (d,))
                live = referenced - set(bad)
                self.db.execute(
                    "DELETE FROM blobs WHERE digest NOT IN (SELECT DISTINCT digest FROM entries WHERE digest IS NOT NULL)"
                )
                for d in live - set(blobs):
                    self.db.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, strftime('%s','now'))", (d, present[d]))
                orphans = [d for d in present if d not in live]
                return dropped, orphans

        self._mem.clear()
        return self._run(q)
