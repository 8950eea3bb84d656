"""The store: content-addressed bodies + SQLite index + spool, with eviction.

Commit protocol (DESIGN.md invariant 2): a body is spooled, hashed and
verified, fsynced, renamed into the content store, and only then does its
index row appear. Removal goes the other way: rows first, then bodies.

This package is the only code that opens store files or runs SQL. Protocols
write through ``new_spool``/``commit`` and read through ``read`` (a bounded
body, in the I/O pool), ``open_range`` (what serving sends), ``exists`` (HEAD
checks), ``list`` and the index's typed queries. An entry committed with
``pinned`` (an upload, a push: it exists nowhere else) is never evicted,
expired or removed by a purge of the cache; deleting its key removes it.
"""

from __future__ import annotations

import builtins
import os
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from sparkcache.store.body import BodyRange
from sparkcache.store.cas import IContentStore, LocalContentStore
from sparkcache.store.index import Entry, Index
from sparkcache.store.spool import SpoolFile, SpoolReader, clear_spool

__all__ = ["BodyRange", "Entry", "Index", "IContentStore", "LocalContentStore", "SpoolFile", "SpoolReader", "Store"]

T = TypeVar("T")
log = Logger()


class Store:
    def __init__(self, data_dir: str, reactor: Any, max_size: int, io_pool: ThreadPool | None = None,
                 sqlite_pool: ThreadPool | None = None) -> None:
        """Pools handed in are started and stopped by their owner (the service
        tree); without them the store makes and runs its own (tests, tools)."""
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        self.reactor = reactor
        self.max_size = max_size
        self.cas: IContentStore = LocalContentStore(os.path.join(self.data_dir, "cas"))
        self.index = Index(os.path.join(self.data_dir, "index.sqlite"), reactor, pool=sqlite_pool)
        self.spool_dir = os.path.join(self.data_dir, "spool")
        # fsync, rename and unlink of large files: never on the reactor, and
        # not in the default pool, which DNS resolution needs.
        self._own_io_pool = io_pool is None
        self.io_pool = io_pool if io_pool is not None else ThreadPool(minthreads=1, maxthreads=4, name="sparkcache-io")
        # Bodies being sent right now (open BodyRanges) → how many: eviction passes them by.
        self._sending: dict[str, int] = {}
        self._spools: set[SpoolFile] = set()
        self.size = 0
        self.entries = 0
        # True while free disk space is below storage.min_free (set by the free-space check; /ready reads it).
        self.low_space = False

    def in_io(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.io_pool, fn, *args)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self._own_io_pool:
            self.io_pool.start()
        removed = clear_spool(self.spool_dir)
        if removed:
            log.info("removed {n} unfinished download(s) from the spool", n=removed)
        await self.index.start()
        present = await self.in_io(lambda: dict(self.cas.iter_digests()))
        dropped, orphans = await self.index.reconcile(present)
        if orphans:
            await self.in_io(lambda: [self.cas.remove(d) for d in orphans])
        if dropped or orphans:
            log.info("store check: dropped {d} index row(s) without a body, removed {o} orphan body file(s)",
                     d=dropped, o=len(orphans))
        await self.refresh_stats()

    async def stop(self) -> None:
        for spool in list(self._spools):
            spool.discard()
        self._spools.clear()
        try:
            await self.index.stop()
        finally:
            if self._own_io_pool:
                self.io_pool.stop()

    async def refresh_stats(self) -> tuple[int, int]:
        self.size, self.entries = await self.index.stats()
        return self.size, self.entries

    # -- bodies ------------------------------------------------------------------

    def new_spool(self, prefix: str = "dl-", scratch: bool = False) -> SpoolFile:
        """A new file in the spool: written, then committed or discarded. Also
        the place for scratch files that never become entries (``scratch``:
        not hashed; discard them); the spool is emptied at start-up."""
        spool = SpoolFile(self.spool_dir, prefix, hashed=not scratch)
        self._spools.add(spool)
        return spool

    def discard(self, spool: SpoolFile) -> None:
        self._spools.discard(spool)
        spool.discard()

    async def commit(self, spool: SpoolFile, entry: Entry) -> Entry:
        """Make a complete, verified spool durable and visible under entry.key."""
        assert entry.digest == spool.hexdigest()

        def durable() -> bool:
            spool.sync_and_close()
            assert entry.digest is not None
            return bool(self.cas.commit(spool.path, entry.digest))

        try:
            new_body = await self.in_io(durable)
        except BaseException:
            self.discard(spool)
            raise
        self._spools.discard(spool)
        stored = await self.index.put(entry)
        # Approximate until the next stats refresh (a replaced key is not subtracted).
        self.entries += 1
        if new_body:
            self.size += entry.size
        return stored

    def read(self, entry: Entry, limit: int) -> Deferred[bytes]:
        """The body of ``entry`` read whole in the I/O pool, at most ``limit`` + 1
        bytes (so a caller can tell "larger than limit"). FileNotFoundError when
        the body vanished."""
        digest = _digest_of(entry)

        def read() -> bytes:
            fd = self.cas.open(digest)
            try:
                chunks = []
                want = limit + 1
                while want > 0:
                    # One read of the rest: a regular file answers it whole, so a
                    # large body costs one buffer, not its chunks and their join (twice its size).
                    chunk = os.read(fd, want)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    want -= len(chunk)
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            finally:
                os.close(fd)

        return self.in_io(read)

    def open_range(self, entry: Entry, start: int = 0, end: int | None = None) -> BodyRange:
        """Bytes [start, end) of ``entry``'s body (end None: to its size), open
        for reading on the calling thread; the caller closes it. Eviction
        passes the body by while it is open. FileNotFoundError when the body
        vanished (purged, or the disk was tampered with)."""
        # On the hit path of every request: kept to one open and two dict updates.
        digest = _digest_of(entry)
        fd = self.cas.open(digest)
        sending = self._sending
        sending[digest] = sending.get(digest, 0) + 1
        return BodyRange(fd, start, entry.size if end is None else end, digest, self._sent)

    def _sent(self, digest: str) -> None:
        n = self._sending[digest] - 1
        if n > 0:
            self._sending[digest] = n
        else:
            del self._sending[digest]

    def exists(self, entry: Entry) -> bool:
        """Whether ``entry``'s body is there: one stat on the calling thread, as
        cheap as the open a GET does (a HEAD never answers 200 unless a GET would)."""
        return entry.digest is not None and self.cas.contains(entry.digest)

    def list(self, remote: str, prefix: str = "", limit: int | None = 10_000) -> Deferred[list[Entry]]:
        """Entries with a body of ``remote`` whose path starts with ``prefix``, by path."""
        return self.index.list_remote(remote, prefix, limit)

    # -- removal -------------------------------------------------------------------

    async def _drop(self, result: tuple[int, builtins.list[str]]) -> int:
        count, orphans = result
        # A body still being sent stays readable through its open descriptor.
        if orphans:
            await self.in_io(lambda: [self.cas.remove(d) for d in orphans])
        return count

    async def release_digest(self, digest: str) -> None:
        """Remove a body that a replaced entry no longer needs (unless others do)."""
        if not self._sending.get(digest):
            await self._drop((0, await self.index.unreferenced(digest)))

    async def purge_key(self, key: str) -> int:
        """Delete one entry, pinned or not (its body too, unless others name it)."""
        return await self._drop(await self.index.delete_key(key))

    async def purge_remote(self, remote: str) -> int:
        """Purge the cached entries of ``remote``; pinned ones stay."""
        return await self._drop(await self.index.delete_remote(remote))

    async def purge_all(self) -> int:
        """Purge everything cached; pinned entries stay."""
        n = await self._drop(await self.index.delete_all())
        await self.refresh_stats()
        return n

    async def expire(self, now: float, retention: float) -> int:
        """Drop negative entries past their TTL, and entries stale for longer than
        ``retention``; other stale bodies stay, for revalidation and stale-on-error."""
        n = 0
        for key, _ in await self.index.expired_keys(now, retention):
            n += await self.purge_key(key)
        return n

    async def evict_remote(self, remote: str, quota: int) -> int:
        """Evict ``remote``'s unpinned entries, least recently used first, until
        they take at most ``quota`` bytes (a build cache's per-remote quota)."""
        await self.index.flush_access()
        n = 0
        for key in await self.index.over_quota(remote, quota):
            n += await self.purge_key(key)
        return n

    async def evict(self) -> int:
        """Least-recently-used eviction down to max_size; bodies of pinned
        entries and bodies being sent are skipped."""
        await self.index.flush_access()
        size, _ = await self.refresh_stats()
        if size <= self.max_size:
            return 0
        # Free a little more than needed so eviction does not run on every tick.
        target = int(self.max_size * 0.95)
        evicted = 0
        batch = 256
        while size > target:
            candidates = await self.index.lru_blobs(batch + len(self._sending))
            progress = False
            for digest, blob_size in candidates:
                if size <= target:
                    break
                if self._sending.get(digest):
                    continue
                _, gone = await self.index.delete_digest(digest)
                await self._drop((0, gone))
                if digest in gone:  # else pinned since lru_blobs chose it
                    size -= blob_size
                    evicted += 1
                    progress = True
            if not progress:
                break
        await self.refresh_stats()
        log.info("evicted {n} bodies; store now {size} bytes", n=evicted, size=self.size)
        return evicted


def _digest_of(entry: Entry) -> str:
    if entry.digest is None:
        raise ValueError(f"entry {entry.key!r} has no body")
    return entry.digest
