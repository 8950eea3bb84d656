"""The local disk tier in front of the bucket, and its LRU.

The tier is a LocalContentStore (``<data_dir>/tier/sha256/..``) bounded by
``storage.tier.max_size``. What it holds, each body's size and when it was
last used live in a small SQLite file, ``<data_dir>/tier.sqlite`` (the
*ledger*), so that the worker processes of one host keep one LRU over the
one directory:

- every process adds the bodies it brings into the tier (a fill from the
  bucket, a committed miss) to the ledger, in the I/O pool;
- a hit only notes the time in memory (a dict store on the reactor); each
  process writes its notes to the ledger in one transaction per tick
  (``flush``), so the hit path never waits on SQLite;
- only the process that ``evicts`` (the single process, or the primary
  worker) removes bodies: after its own additions, and on its tick for the
  others' (a non-primary's fill may take the tier over its bound for up to a
  tick). The most recently used body stays even when it alone is larger. A
  body being sent stays readable through its open descriptor after the
  unlink; a body another worker is filling right now (its fill lock held)
  is passed by;
- the start-up check (the single process, or the parent before any worker)
  reconciles the ledger with the files and removes unfinished fills.

With worker processes a fill from the bucket is also one per host: behind
the in-process singleflight, a flock on ``<data_dir>/locks/fill/<ab>/<digest>.lock``
(``fill_lock_path``, taken and let go, its file removed, as fetch/xlock.py does a key's); a worker that finds it held waits for the file to appear
(or for the lock to come free: the filler failed or died, then it tries).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any, Iterator

from twisted.logger import Logger

from sparkcache.fetch.xlock import release_lock, try_lock
from sparkcache.store.cas import LocalContentStore, remove_file

log = Logger()

BUSY_TIMEOUT = 60.0
# How often each worker writes its hits' times to the ledger, and the primary
# evicts what the others added.
TICK = 1.0
# A waiting worker looks for the body another worker is filling this often.
FILL_POLL = 0.05
FILL_PREFIX = ".fill-"

SCHEMA = """
CREATE TABLE IF NOT EXISTS bodies (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, used REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bodies_used ON bodies(used);
CREATE TABLE IF NOT EXISTS total (one INTEGER PRIMARY KEY CHECK (one = 1), size INTEGER NOT NULL);
INSERT OR IGNORE INTO total VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS bodies_in AFTER INSERT ON bodies BEGIN
    UPDATE total SET size = size + NEW.size; END;
CREATE TRIGGER IF NOT EXISTS bodies_out AFTER DELETE ON bodies BEGIN
    UPDATE total SET size = size - OLD.size; END;
CREATE TRIGGER IF NOT EXISTS bodies_resize AFTER UPDATE OF size ON bodies BEGIN
    UPDATE total SET size = size - OLD.size + NEW.size; END;
"""


class Ledger:
    """``tier.sqlite``: every method blocks (call it in the I/O pool); one
    connection per process, used by one thread at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # a lost last write is put right by the next start-up check
            conn.executescript(SCHEMA)
            self._conn = conn
        return self._conn

    def _write(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(sql, rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def add(self, digest: str, size: int, used: float) -> None:
        self._write("INSERT INTO bodies VALUES (?, ?, ?) ON CONFLICT(digest) DO UPDATE "
                    "SET size = excluded.size, used = max(used, excluded.used)", [(digest, size, used)])

    def touch(self, used: dict[str, float]) -> None:
        if used:
            self._write("UPDATE bodies SET used = max(used, ?) WHERE digest = ?",
                        [(at, digest) for digest, at in used.items()])

    def remove(self, digest: str) -> None:
        self._write("DELETE FROM bodies WHERE digest = ?", [(digest,)])

    def total(self) -> int:
        with self._lock:
            row = self._db().execute("SELECT size FROM total").fetchone()
        return int(row[0]) if row else 0

    def used_since(self, since: float) -> list[tuple[str, float]]:
        with self._lock:
            return list(self._db().execute("SELECT digest, used FROM bodies WHERE used > ?", (since,)))

    def oldest(self, limit: int) -> tuple[list[tuple[str, int]], str | None]:
        """(up to ``limit`` bodies, least recently used first; the most recently used one)."""
        with self._lock:
            db = self._db()
            rows = [(str(d), int(s)) for d, s in db.execute(
                "SELECT digest, size FROM bodies ORDER BY used LIMIT ?", (limit,))]
            newest = db.execute("SELECT digest FROM bodies ORDER BY used DESC LIMIT 1").fetchone()
        return rows, (str(newest[0]) if newest else None)

    def reconcile(self, present: dict[str, tuple[int, float]]) -> tuple[int, int]:
        """Make the rows say what the files are: (rows dropped, rows added)."""
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = {str(d): int(s) for d, s in db.execute("SELECT digest, size FROM bodies")}
                gone = [(d,) for d in rows if d not in present]
                db.executemany("DELETE FROM bodies WHERE digest = ?", gone)
                new = [(d, size, at) for d, (size, at) in present.items() if rows.get(d) != size]
                db.executemany("INSERT INTO bodies VALUES (?, ?, ?) ON CONFLICT(digest) DO UPDATE "
                               "SET size = excluded.size", new)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return len(gone), len(new)


# -- the fill lock (worker processes only) ---------------------------------------------------


def fill_lock_path(locks_dir: str, digest: str) -> str:
    return os.path.join(locks_dir, digest[:2], digest + ".lock")


# -- the tier ------------------------------------------------------------------------------------


class Tier:
    """The tier's files and their LRU. ``shared``: worker processes use it
    too (fill locks, ticks); ``evicts``: this process removes bodies above
    ``max_size`` (the single process, or the primary worker)."""

    def __init__(self, root: str, max_size: int, clock: Any, shared: bool = False, evicts: bool = True) -> None:
        self.files = LocalContentStore(root)
        self.root = self.files.root
        self.max_size = max_size
        self.clock = clock
        self.shared = shared
        self.evicts = evicts
        data_dir = os.path.dirname(self.root)
        self.ledger = Ledger(os.path.join(data_dir, os.path.basename(self.root) + ".sqlite"))
        self.locks_dir = os.path.join(data_dir, "locks", "fill")
        self.size = 0  # the ledger's total, as last read
        self._touched: dict[str, float] = {}  # hits since the last flush: digest → time
        self._merged = 0.0  # the primary: the ledger's uses up to this time went to the hints
        self.hints: Any = None  # AccessHints (sweep.py), on the process that publishes them

    # -- on the reactor (cheap: a hit) --------------------------------------------------------

    def open(self, digest: str) -> int:
        fd = self.files.open(digest)
        self.touch(digest)
        return fd

    def contains(self, digest: str) -> bool:
        return self.files.contains(digest)

    def local_path(self, digest: str) -> str:
        return self.files.local_path(digest)

    def touch(self, digest: str) -> None:
        self._touched[digest] = self.clock.seconds()
        if self.hints is not None:
            self.hints.note(digest)

    # -- blocking (the I/O pool) ----------------------------------------------------------------

    def iter_digests(self) -> Iterator[tuple[str, int]]:
        return self.files.iter_digests()

    def commit(self, path: str, digest: str) -> bool:
        """Move a complete, verified file into the tier; whether it was not there yet."""
        size = os.stat(path).st_size
        new = self.files.commit(path, digest)
        self.added(digest, size)
        return new

    def added(self, digest: str, size: int) -> None:
        if self.hints is not None:
            self.hints.note(digest)
        self.ledger.add(digest, size, self.clock.seconds())
        if self.evicts:
            self.evict(keep=digest)
        else:
            self.size = self.ledger.total()

    def remove(self, digest: str) -> int:
        self._touched.pop(digest, None)
        self.ledger.remove(digest)
        return self.files.remove(digest)

    def flush(self) -> None:
        """This process's hits since the last flush, into the ledger."""
        old, self._touched = self._touched, {}
        # A copy (one C call under the GIL): the reactor may still be storing into the old dict.
        touched = dict(old)
        try:
            self.ledger.touch(touched)
        except BaseException:
            for digest, at in touched.items():  # kept for the next flush
                self._touched.setdefault(digest, at)
            raise

    def tick(self) -> int:
        """Every TICK in each worker: write the hits; the evicting one then
        removes what the others' additions took over the bound, and hands the
        others' uses to the bucket's access hints. Returns the bytes freed."""
        self.flush()
        if not self.evicts:
            self.size = self.ledger.total()
            return 0
        if self.hints is not None:
            now = self.clock.seconds()
            for digest, at in self.ledger.used_since(self._merged):
                self.hints.note(digest, at)
            self._merged = now - TICK  # overlap a tick: a flush may commit a time just before now
        return self.evict()

    def evict(self, keep: str | None = None) -> int:
        """Forget least recently used bodies above ``max_size``; ``keep`` (the
        body just added, about to be served) and the most recently used stay."""
        self.flush()
        freed = 0
        total = self.ledger.total()
        while total > self.max_size:
            rows, newest = self.ledger.oldest(256)
            progress = False
            for digest, size in rows:
                if total <= self.max_size:
                    break
                if digest in (keep, newest):
                    continue
                if self._forget(digest):
                    freed += size
                    total -= size
                    progress = True
            if not progress:
                break
        self.size = self.ledger.total()
        return freed

    def _forget(self, digest: str) -> bool:
        fd = None
        lock_path = fill_lock_path(self.locks_dir, digest)
        if self.shared:
            fd = try_lock(lock_path)
            if fd is None:
                return False  # another worker is filling it right now: it stays
        try:
            self.ledger.remove(digest)
            remove_file(self.files.local_path(digest))
        finally:
            if fd is not None:
                release_lock(fd, lock_path)
        return True

    def check(self) -> int:
        """The start-up check (no other process uses the tier): unfinished
        fills go, the ledger is made to match the files, then the tier is
        evicted down to its bound. Returns the bytes freed."""
        for name in os.listdir(self.root):
            if name.startswith(FILL_PREFIX):
                remove_file(os.path.join(self.root, name))
        present: dict[str, tuple[int, float]] = {}
        for digest, size in self.files.iter_digests():
            try:
                at = os.stat(self.files.local_path(digest)).st_mtime
            except FileNotFoundError:
                continue
            present[digest] = (size, at)
        self._merged = self.clock.seconds()
        dropped, added = self.ledger.reconcile(present)
        if dropped or added:
            log.info("tier check: {d} ledger row(s) without a file dropped, {a} file(s) added", d=dropped, a=added)
        return self.evict()

    def open_ledger(self) -> None:
        self.size = self.ledger.total()
        self._merged = self.clock.seconds()  # what was used before this start is not news

    def fill_name(self, digest: str) -> str:
        """This process's temporary name for a fill of ``digest``."""
        return os.path.join(self.root, f"{FILL_PREFIX}{digest}.{os.getpid()}")

    def remove_stale_fills(self, digest: str) -> None:
        """With the fill lock held: another process's temporary file of this
        body is a dead filler's (a live one would hold the lock)."""
        mine = self.fill_name(digest)
        prefix = f"{FILL_PREFIX}{digest}"
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.startswith(prefix) and path != mine:
                remove_file(path)

    def close(self) -> None:
        self.ledger.close()
