"""The SQLite index: cache key → body digest, headers, freshness, validators.

SQLite runs in one dedicated thread (a ThreadPool of size 1), so the reactor
never waits on disk and the connection is only ever used from one thread.
Rows are mirrored in a bounded in-memory LRU (20,000 rows, ~1 KiB each) so a
hit on a hot key costs no thread hop at all; colder keys cost one trip to the
SQLite thread. Last-access times are written back in batches.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from sparkcache.store.changes import ChangeCounters
from sparkcache.store.keyfilter import SHARED_SUFFIX, KeyFilter, SharedKeyFilter, prepare_shared, remove_shared

T = TypeVar("T")
# A deletion of more rows than this (a purge) bumps the global change counter
# (every worker drops its whole in-memory index) rather than each key's.
BUMP_EACH_MAX = 64
BUSY_TIMEOUT = 60.0

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
    last_access REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0  -- 0 cache, 1 pinned, 2 kept (see PINNED, KEPT)
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
# PRAGMA user_version of an index this code writes. 0: before entries carried
# their own ``pinned`` flag (the store then kept whole remotes instead).
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """One cached response. ``status`` 404 with no digest is a negative entry.

    ``pinned``: the body exists nowhere else (an upload, a push), so it is
    never evicted, expired or removed by a purge of the cache; only deleting
    its own key removes it. The protocol that commits the entry sets it.
    ``kept``: not cache either (a code-sync upload), so a purge of the cache
    leaves it, but LRU eviction under ``storage.max_size`` may remove it
    (its client still has the files and can upload them again). Either one
    makes the entry *local content* (``local``).
    """

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
    pinned: bool = False
    kept: bool = False

    @property
    def local(self) -> bool:
        """Content that exists nowhere else: no purge of the cache removes it."""
        return self.pinned or self.kept

    def fresh(self, now: float) -> bool:
        return self.expires is None or now < self.expires

    def as_row(self) -> tuple[Any, ...]:
        return (
            self.key, self.remote, self.path, self.status, self.digest, self.size,
            self.content_type, json.dumps(self.headers), self.fetched, self.expires,
            self.etag, self.last_modified, self.last_access, _hold_column(self.pinned, self.kept),
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> "Entry":
        (key, remote, path, status, digest, size, ctype, headers, fetched, expires, etag, lm, la, pinned) = row
        return cls(key, remote, path, status, digest, size, ctype, json.loads(headers), fetched, expires, etag, lm, la,
                   pinned == PINNED, pinned == KEPT)


# The ``pinned`` column: 0 cache (purged, evicted, expired), PINNED (never
# removed but by an explicit delete), KEPT (never purged, may be evicted).
# Purges match ``pinned=0``; eviction passes over ``pinned=PINNED`` only.
PINNED, KEPT = 1, 2


def _hold_column(pinned: bool, kept: bool) -> int:
    return PINNED if pinned else KEPT if kept else 0


_COLUMNS = ("key, remote, path, status, digest, size, content_type, headers, fetched, expires, etag, last_modified, "
            "last_access, pinned")
_NCOLUMNS = len(_COLUMNS.split(","))
# Whether some pinned entry names the body ``blobs.digest``.
_PINNED_BLOB = f"EXISTS (SELECT 1 FROM entries AS p WHERE p.digest=blobs.digest AND p.pinned={PINNED})"


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One atomic transaction. The connection is in autocommit mode
    (isolation_level=None), where ``with db:`` alone begins nothing."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


INDEX_NAME = "index.sqlite"  # (in the data dir)

# Keys read (and added) per SQLite-thread call while the key filter is built:
# lookups and writes wait between batches, not behind the whole table.
FILTER_BATCH = 2000

log = Logger()


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
        # Other processes share this index (server.workers > 1): a row in _mem
        # is trusted only while its change stamp holds (store/changes.py).
        self.changes: ChangeCounters | None = None
        self._stamps: dict[str, tuple[int, int]] = {}
        self._touched: dict[str, float] = {}
        # Used once, by the upgrade of an index written before entries carried
        # ``pinned``: rows of these remotes are then marked pinned. Set before start().
        self.legacy_pinned_remotes: frozenset[str] = frozenset()
        # Every key with a row (store/keyfilter.py), kept by the index's sole
        # user once ``filter_keys`` built it; the keys written while one is
        # being built, for it.
        self._keys: KeyFilter | SharedKeyFilter | None = None
        self._keys_pending: list[str] | None = None

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
        # With worker processes several connections write: a writer waits for
        # another's transaction (in this thread) rather than failing after 5 s.
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT)
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a crash can lose the last transactions but never
        # corrupts; the body files are fsynced before their rows are written.
        db.execute("PRAGMA synchronous=NORMAL")
        self._upgrade(db)
        db.executescript(SCHEMA)
        # Written only when it changes: a write needs room in the WAL, and a
        # worker restarted on a full disk must still open the index it reads.
        if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db = db

    def _upgrade(self, db: sqlite3.Connection) -> None:
        """Bring an index written by an older version up to SCHEMA_VERSION.

        Version 0 kept whole remotes (``type: local``, ``oci-local``) from
        eviction; rows now carry ``pinned``. The column and the marks of the
        rows that version protected land in one transaction, so a crash
        leaves either the old index or the upgraded one."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        columns = {r[1] for r in db.execute("PRAGMA table_info(entries)")}
        if not columns:
            return  # a new index: SCHEMA creates it as it is now
        with transaction(db):
            if "pinned" not in columns:
                db.execute("ALTER TABLE entries ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0")
            keep = sorted(self.legacy_pinned_remotes)
            if keep:
                db.execute(f"UPDATE entries SET pinned=1 WHERE remote IN ({','.join('?' * len(keep))})", keep)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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

    def watch_changes(self) -> None:
        """Blocking (start-up): other processes write this index too; see store/changes.py."""
        self.changes = ChangeCounters(os.path.splitext(self.path)[0] + ".changes")

    def share_keys(self) -> None:
        """Blocking (start-up, a worker process): use the key filter the
        supervisor made for this run (``prepare_key_filter``); the primary
        fills it (``fill_shared_keys``)."""
        try:
            self._keys = SharedKeyFilter(os.path.splitext(self.path)[0] + SHARED_SUFFIX)
        except (OSError, ValueError) as e:
            log.warn("no shared key filter ({e}): every cold miss asks the index", e=e)

    def _remember(self, entry: Entry, stamp: tuple[int, int] | None = None) -> None:
        if self.changes is not None:
            if stamp is None:
                self._forget([entry.key])
                return
            self._stamps[entry.key] = stamp
        self._mem[entry.key] = entry
        self._mem.move_to_end(entry.key)
        while len(self._mem) > self._mem_max:
            old, _ = self._mem.popitem(last=False)
            self._stamps.pop(old, None)

    def _forget(self, keys: Iterable[str]) -> None:
        for k in keys:
            self._mem.pop(k, None)
            self._stamps.pop(k, None)
            self._touched.pop(k, None)

    def _cached(self, key: str) -> Entry | None:
        e = self._mem.get(key)
        if e is not None and self.changes is not None and not self.changes.valid(key, self._stamps[key]):
            # Another process replaced or deleted it since it was cached.
            self._mem.pop(key, None)
            self._stamps.pop(key, None)
            return None
        return e

    def _bump(self, keys: list[str]) -> None:
        """In the SQLite thread, after the transaction and before any body goes."""
        if self.changes is None or not keys:
            return
        if len(keys) > BUMP_EACH_MAX:
            self.changes.bump(None)
            return
        for k in keys:
            self.changes.bump(k)

    # -- reads -----------------------------------------------------------------

    def get(self, key: str) -> Deferred[Entry | None]:
        e = self._cached(key)
        if e is not None:
            self._mem.move_to_end(key)
            return succeed(e)

        def q() -> tuple[tuple[int, int] | None, Entry | None]:
            # Stamped before the read: a change after it invalidates what was read.
            stamp = self.changes.stamp(key) if self.changes is not None else None
            return stamp, self._get(key)

        def found(r: tuple[tuple[int, int] | None, Entry | None]) -> Entry | None:
            stamp, entry = r
            if entry is not None:
                self._remember(entry, stamp)
            return entry

        return self._run(q).addCallback(found)

    def get_or_claim(self, key: str, now: float, claim: Callable[[], T | None],
                     undo: Callable[[T], None]) -> Deferred[tuple[Entry | None, T | None]]:
        """``get``, and when no row fresh at ``now`` is found, ``claim()`` run
        in the SQLite thread right after the read (something brief that never
        waits: the flock of a key's lock file, fetch/xlock.py), the row read
        again once it returned something (not None): whoever holds the key's
        lock then sees the row as of the moment it took it. One thread round
        trip for the lookup, the lock and the recheck, where they were three.
        ``undo(got)`` when that second read fails. The caller owns what
        ``claim`` returned even if it stopped waiting (see Cache.get)."""
        e = self._cached(key)
        if e is not None and e.fresh(now):
            self._mem.move_to_end(key)
            return succeed((e, None))

        def q() -> tuple[tuple[int, int] | None, Entry | None, T | None]:
            stamp = self.changes.stamp(key) if self.changes is not None else None
            entry = self._get(key)
            if entry is not None and entry.fresh(now):
                return stamp, entry, None
            got = claim()
            if got is not None:
                try:
                    stamp = self.changes.stamp(key) if self.changes is not None else None
                    entry = self._get(key)
                except BaseException:
                    undo(got)
                    raise
            return stamp, entry, got

        def found(r: tuple[tuple[int, int] | None, Entry | None, T | None]) -> tuple[Entry | None, T | None]:
            stamp, entry, got = r
            if entry is not None:
                self._remember(entry, stamp)
            return entry, got

        return self._run(q).addCallback(found)

    def peek(self, key: str) -> Entry | None:
        """The in-memory row only: no thread hop, may miss."""
        return self._cached(key)

    def surely_absent(self, key: str) -> bool:
        """True when ``key`` surely has no row, known without a thread hop
        (the key filter, once built: ``filter_keys``); False: maybe one."""
        f = self._keys
        # (A row in memory is a row: no hashing on the way to a hit.)
        return f is not None and key not in self._mem and f.usable and not f.may_hold(key)

    def fill_shared_keys(self) -> Deferred[None]:
        """(The primary worker, at start.) Add every row's key to the shared
        filter, in batches in the SQLite thread, then let every worker trust
        it. Rows written meanwhile add their own keys (``_write``)."""
        f = self._keys
        if not isinstance(f, SharedKeyFilter) or not f.building:
            return succeed(None)
        shared: SharedKeyFilter = f

        def batch(after: str | None) -> tuple[int, str | None]:
            keys = [k for (k,) in self._key_batch(after)]
            shared.add(keys)
            return len(keys), (keys[-1] if keys else None)

        async def build() -> None:
            after: str | None = None
            while True:
                got, after = await self._run(batch, after)
                if got < FILTER_BATCH:
                    break
            await self._run(shared.built)
            log.info("the shared key filter is built")

        def failed(reason: Failure) -> None:
            log.failure("building the shared key filter (cold misses ask the index until a restart)", reason)

        return Deferred.fromCoroutine(build()).addErrback(failed)

    def _key_batch(self, after: str | None) -> Any:
        if after is None:
            return self.db.execute("SELECT key FROM entries ORDER BY key LIMIT ?", (FILTER_BATCH,))
        return self.db.execute("SELECT key FROM entries WHERE key > ? ORDER BY key LIMIT ?", (after, FILTER_BATCH))

    def filter_keys(self) -> Deferred[None]:
        """(Only for the index's sole user: no other process writes it.) Build
        the key filter from every row, in batches in the SQLite thread, and
        keep it: ``surely_absent`` answers from then on. Rebuilt, larger, when
        it fills up; a key written meanwhile is added to both."""
        if self._keys_pending is not None:
            return succeed(None)  # (one is being built)
        self._keys_pending = []

        def batch(f: KeyFilter, after: str | None) -> tuple[int, str | None]:
            # (Added here, not on the reactor: nothing else sees ``f`` until it is built.)
            n, last = 0, None
            for (k,) in self._key_batch(after):
                f.add(k)
                n, last = n + 1, k
            return n, last

        async def build() -> None:
            n = await self._run(lambda: int(self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]))
            f = KeyFilter(2 * n)
            after: str | None = None
            while True:
                got, after = await self._run(batch, f, after)
                if got < FILTER_BATCH:
                    break
            pending, self._keys_pending = self._keys_pending or [], None
            for k in pending:
                f.add(k)
            self._keys = f

        def failed(reason: Failure) -> None:
            self._keys_pending = None
            log.failure("building the index's key filter (lookups go to the index meanwhile)", reason)

        return Deferred.fromCoroutine(build()).addErrback(failed)

    def _note_key(self, key: str) -> None:
        """(Before its row is written.) ``key`` may have a row from now on."""
        if isinstance(self._keys, KeyFilter):
            self._keys.add(key)
            if self._keys.full:
                self.filter_keys()
        if self._keys_pending is not None:
            self._keys_pending.append(key)

    def _get(self, key: str) -> Entry | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE key=?", (key,)).fetchone()
        return Entry.from_row(row) if row else None

    def list_remote(self, remote: str, prefix: str = "", limit: int | None = 10_000) -> Deferred[list[Entry]]:
        """Entries with a body (status 200) of ``remote`` whose path starts with
        ``prefix``, by path; at most ``limit`` (None: all)."""

        def q() -> list[Entry]:
            rows = self.db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE remote=? AND status=200 AND substr(path, 1, ?)=? "
                "ORDER BY path LIMIT ?", (remote, len(prefix), prefix, -1 if limit is None else limit)
            ).fetchall()
            return [Entry.from_row(r) for r in rows]

        return self._run(q)

    def entries_with_body(self, remotes: list[str] | None, since: float | None) -> Deferred[list[Entry]]:
        """Every entry with a body of ``remotes`` (None: of every remote) fetched
        at or after ``since`` (None: whenever), by key: what an export lists."""

        def q() -> list[Entry]:
            where, args = "digest IS NOT NULL", []  # type: tuple[str, list[Any]]
            if remotes is not None:
                where += f" AND remote IN ({','.join('?' * len(remotes))})"
                args += remotes
            if since is not None:
                where += " AND fetched >= ?"
                args.append(since)
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE {where} ORDER BY key", args).fetchall()
            return [Entry.from_row(r) for r in rows]

        return self._run(q)

    def prefixes_before(self, remote: str, marker: str) -> Deferred[list[str]]:
        """The distinct beginnings of ``remote``'s paths that contain ``marker``,
        each cut just before its first ``marker``, sorted (an OCI catalog: the
        repositories holding a ``<repo>/_manifests/...`` row)."""

        def q() -> list[str]:
            rows = self.db.execute(
                "SELECT DISTINCT substr(path, 1, instr(path, ?) - 1) FROM entries WHERE remote=? AND instr(path, ?) > 0",
                (marker, remote, marker)).fetchall()
            return sorted(r[0] for r in rows)

        return self._run(q)

    def stats(self) -> Deferred[tuple[int, int]]:
        """(bytes stored, entries)."""

        def q() -> tuple[int, int]:
            size = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]
            n = self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            return int(size), int(n)

        return self._run(q)

    def expired_keys(self, now: float, retention: float) -> Deferred[list[tuple[str, str | None]]]:
        """Negative entries past their TTL, and bodies stale for longer than
        ``retention``; never pinned ones (kept ones may go: they are evictable)."""

        def q() -> list[tuple[str, str | None]]:
            return self.db.execute(
                f"SELECT key, digest FROM entries WHERE expires IS NOT NULL AND pinned!={PINNED} AND "
                "((status != 200 AND expires < ?) OR expires < ?)", (now, now - retention)
            ).fetchall()

        return self._run(q)

    def lru_blobs(self, limit: int) -> Deferred[list[tuple[str, int]]]:
        """Eviction candidates, least recently used first: (digest, size) of
        bodies that no pinned entry names."""
        return self._run(lambda: self.db.execute(
            f"SELECT digest, size FROM blobs WHERE NOT {_PINNED_BLOB} ORDER BY last_access LIMIT ?", (limit,)
        ).fetchall())

    def over_quota(self, remote: str, quota: int) -> Deferred[list[str]]:
        """Keys of ``remote``'s unpinned entries (kept ones included) beyond its most recently used
        ``quota`` bytes: what to evict, least recently used last."""

        def q() -> list[str]:
            total, out = 0, []
            rows = self.db.execute(
                f"SELECT key, size FROM entries WHERE remote=? AND pinned!={PINNED} ORDER BY last_access DESC", (remote,))
            for key, size in rows:
                total += size or 0
                if total > quota:
                    out.append(key)
            return out

        return self._run(q)

    # -- writes ------------------------------------------------------------

    def put(self, entry: Entry) -> Deferred[Entry]:
        """Record an entry whose body (if any) is already committed to the store."""
        return self._write(entry, None).addCallback(lambda _: entry)

    def put_unless(self, entry: Entry, purged: Callable[[], bool]) -> Deferred[bool]:
        """Record ``entry`` unless ``purged()``, asked in the SQLite thread
        inside the insert's transaction (so a purge is either before it,
        and the row never appears, or after it, and deletes the row);
        whether the row was written."""
        return self._write(entry, lambda: not purged())

    def refresh_unless(self, entry: Entry, purged: Callable[[], bool]) -> Deferred[bool]:
        """Write ``entry``, a new state of a stored entry (revalidated: new
        expiry and validators), unless ``purged()`` or its row is gone or
        names another body by now (purged, evicted, replaced): a refresh never
        brings back a row whose body may have been removed. An entry with no
        body (a negative one) is written unless ``purged()``. Whether it was."""

        def still_there() -> bool:
            return entry.digest is None or self.db.execute(
                "SELECT 1 FROM entries WHERE key=? AND digest=?", (entry.key, entry.digest)).fetchone() is not None

        return self._write(entry, lambda: not purged() and still_there())

    def put_if_body(self, entry: Entry) -> Deferred[bool]:
        """Record another entry naming a body already stored (``entry.digest``),
        if that body is still referenced: its blob row is deleted in the very
        transaction that lets its file go, so checking it here, in the
        insert's transaction, never adds a row for a body being removed."""
        return self._write(entry, lambda: self.db.execute(
            "SELECT 1 FROM blobs WHERE digest=?", (entry.digest,)).fetchone() is not None)

    def _write(self, entry: Entry, may: Callable[[], bool] | None) -> Deferred[bool]:
        """Insert ``entry`` unless ``may()`` (asked in the insert's transaction)
        says no; whether it was."""

        key = entry.key
        self._note_key(key)

        shared = self._keys if isinstance(self._keys, SharedKeyFilter) else None

        def q() -> tuple[bool, tuple[int, int] | None]:
            if shared is not None:
                shared.add((key,))  # (before the row: see store/keyfilter.py)
            before = self.changes.stamp(key) if self.changes is not None else None
            with transaction(self.db):
                if may is not None and not may():
                    return False, None
                self._insert(entry)
            if self.changes is None or before is None:
                return True, None
            # The row may have replaced one another process has cached. Our own
            # bump is the only change since ``before`` when the slot moved by one.
            slot = self.changes.bump(key)
            after = self.changes.stamp(key)
            return True, (after if after == (before[0], before[1] + 1) and slot == after[1] else None)

        def done(r: tuple[bool, tuple[int, int] | None]) -> bool:
            written, stamp = r
            if written:
                self._touched.pop(key, None)
                self._remember(entry, stamp)
            else:
                self._forget([key])
            return written

        return self._run(q).addCallback(done)

    def _insert(self, entry: Entry) -> None:
        self.db.execute(f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES ({','.join('?' * _NCOLUMNS)})",
                        entry.as_row())
        if entry.digest is not None:
            self.db.execute(
                "INSERT INTO blobs (digest, size, last_access) VALUES (?, ?, ?) "
                "ON CONFLICT(digest) DO UPDATE SET last_access=excluded.last_access",
                (entry.digest, entry.size, entry.last_access),
            )

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
            with transaction(self.db):
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
            with transaction(self.db):
                rows = self.db.execute(f"SELECT key, digest FROM entries WHERE {where}", args).fetchall()
                keys = [r[0] for r in rows]
                digests = {r[1] for r in rows if r[1]}
                self.db.execute(f"DELETE FROM entries WHERE {where}", args)
                orphans = [
                    d for d in digests
                    if self.db.execute("SELECT 1 FROM entries WHERE digest=? LIMIT 1", (d,)).fetchone() is None
                ]
                self.db.executemany("DELETE FROM blobs WHERE digest=?", [(d,) for d in orphans])
            self._bump(keys)
            return keys, orphans

        def done(r: tuple[list[str], list[str]]) -> tuple[int, list[str]]:
            keys, orphans = r
            self._forget(keys)
            return len(keys), orphans

        return self._run(q).addCallback(done)

    def delete_key(self, key: str) -> Deferred[tuple[int, list[str]]]:
        """Delete one entry, pinned or not: asking for it by key is explicit."""
        self._forget([key])
        return self.delete_where("key=?", (key,))

    def delete_remote(self, remote: str) -> Deferred[tuple[int, list[str]]]:
        """Purge the cache of one remote: its pinned and kept entries stay."""
        return self.delete_where("remote=? AND pinned=0", (remote,))

    def delete_all(self) -> Deferred[tuple[int, list[str]]]:
        """Purge the whole cache: pinned and kept entries stay."""
        return self.delete_where("pinned=0", ())

    def delete_cached_key(self, key: str) -> Deferred[tuple[int, list[str]]]:
        """Purge one cached entry: a pinned or kept one stays."""
        self._forget([key])
        return self.delete_where("key=? AND pinned=0", (key,))

    def delete_local(self, remote: str, path: str) -> Deferred[tuple[int, list[str]]]:
        """Delete the local content (pinned or kept entries) of ``remote`` at ``path``."""
        return self.delete_where("remote=? AND path=? AND pinned!=0", (remote, path))

    def list_local(self, remote: str, prefix: str = "", limit: int = 10_000) -> Deferred[list[Entry]]:
        """The local content (pinned or kept entries) of ``remote`` whose path
        starts with ``prefix``, by path."""
        return self._run(lambda: [Entry.from_row(r) for r in self.db.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE remote=? AND pinned!=0 AND substr(path, 1, ?)=? "
            "ORDER BY path LIMIT ?", (remote, len(prefix), prefix, limit))])

    def local_summary(self) -> Deferred[list[tuple[str, int, int]]]:
        """(remote, entries, bytes) of the local content of each remote holding some."""
        return self._run(lambda: [(r, int(n), int(b or 0)) for r, n, b in self.db.execute(
            "SELECT remote, COUNT(*), SUM(size) FROM entries WHERE pinned!=0 GROUP BY remote ORDER BY remote")])

    def delete_digest(self, digest: str) -> Deferred[tuple[int, list[str]]]:
        """Evict a body with every entry naming it, unless a pinned entry does
        (checked in the same transaction, since lru_blobs chose it)."""
        return self.delete_where(
            f"digest=? AND NOT EXISTS (SELECT 1 FROM entries AS p WHERE p.digest=? AND p.pinned={PINNED})", (digest, digest))

    def unreferenced(self, digest: str) -> Deferred[list[str]]:
        """Forget the blob row of ``digest`` if no entry points at it any more."""

        def q() -> list[str]:
            with transaction(self.db):
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
            with transaction(self.db):
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


def prepare_key_filter(data_dir: str, shared: bool) -> None:
    """Blocking (the supervisor, before any worker starts; the store checked):
    a new shared key filter for the store's index sized from its rows now, or,
    ``shared`` False (a bucket's shared index: other hosts write it), none."""
    path = os.path.join(data_dir, INDEX_NAME)
    filter_path = os.path.splitext(path)[0] + SHARED_SUFFIX
    if not shared:
        remove_shared(filter_path)
        return
    os.makedirs(data_dir, exist_ok=True)
    rows = 0
    if os.path.exists(path):
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT)
        try:
            rows = int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
        except sqlite3.OperationalError:  # (no table yet)
            pass
        finally:
            db.close()
    prepare_shared(filter_path, rows)
