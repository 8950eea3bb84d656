"""The store: content-addressed bodies + SQLite index + spool, with eviction.

Commit protocol (DESIGN.md invariant 2): a body is spooled, hashed and
verified, fsynced, renamed into the content store, and only then does its
index row appear. Removal goes the other way: rows first, then bodies.

This package is the only code that opens store files or runs SQL. Protocols
write through ``new_spool``/``commit`` and read through ``read`` (a bounded
body, in the I/O pool), ``open_range`` (what serving sends), ``exists`` (HEAD
checks), ``list`` and the index's typed queries. An entry committed with
``pinned`` (an upload, a push: it exists nowhere else) is never evicted,
expired or removed by a purge of the cache; deleting its key removes it. One
committed ``kept`` (a code-sync upload) is never purged either, but eviction
may remove it.

Purges cover productions in progress: one takes ``epoch()`` when it begins
and hands it to ``commit``/``refresh``, which store nothing if the entry's
cache (everything, its remote or its key) was purged since, checked in the
SQLite thread inside the insert's transaction. A body is never removed while
a commit of it is between its existence check and its row (``_drop``).

Free space (see ``space``): below the floor (``storage.min_free``) the store
evicts and says ``low_space``; after a write error (disk full, I/O error) it
counts as unwritable for ``WRITE_ERROR_HOLD`` seconds. While it is not
``writable`` the engine passes misses through uncached.
"""

from __future__ import annotations

import builtins
import errno
import os
import re
from collections import OrderedDict, deque
from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredLock, fail, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from sparkcache.store.body import BodyRange
from sparkcache.store.cas import IBackedContentStore, IContentStore, LocalContentStore
from sparkcache.store.index import INDEX_NAME, Entry, Index
from sparkcache.store import space
from sparkcache.store.spool import SpoolFile, SpoolReader, clear_spool

__all__ = ["BodyRange", "Entry", "Index", "IContentStore", "LocalContentStore", "SpoolFile", "SpoolReader", "Store"]

T = TypeVar("T")
log = Logger()

# How long a write error (disk full, I/O error) keeps the store unwritable:
# the misses in between pass through instead of each failing the same way.
WRITE_ERROR_HOLD = 30.0
# Eviction for space frees this much more than the floor asks, so it does
# not run again on the next miss.
SPACE_SLACK = 0.10
# With worker processes, a worker that does not evict waits this long at most
# for the room it asked the primary for, which looks every ROOM_POLL seconds.
ROOM_WAIT = 5.0
ROOM_POLL = 0.1
# Below the floor, a passed-through miss measures again at most this often (``Store.recheck_space``).
RECHECK_INTERVAL = 1.0
# Spool files kept made for the next misses (``Store.spool``).
SPARE_SPOOLS = 2
# Room a miss wants above its body's twice, at the last measurement, to skip measuring (``Store.roomy``).
ROOM_SPARE = 256 << 20


def _space_field(name: str) -> Any:
    """A free-space attribute of Store: its own, or the shared file's once
    ``share_space`` ran (a property: one call, no system call, on the miss path)."""
    own = "_own_" + name

    def get(self: Any) -> Any:
        shared = self._shared
        return getattr(self, own) if shared is None else getattr(shared, name)

    def set_(self: Any, value: Any) -> None:
        shared = self._shared
        if shared is None:
            setattr(self, own, value)
        else:
            setattr(shared, name, value)

    return property(get, set_)


class Store:
    # Free-space state and the store's figures: with worker processes, in a file they share (share_space).
    _shared: space.SharedSpace | None = None
    low_space = _space_field("low_space")
    free = _space_field("free")
    floor = _space_field("floor")
    write_error = _space_field("write_error")
    _write_failed_at = _space_field("write_failed_at")
    size = _space_field("size")
    entries = _space_field("entries")

    def __init__(self, data_dir: str, reactor: Any, max_size: int, io_pool: ThreadPool | None = None,
                 sqlite_pool: ThreadPool | None = None, min_free: int | None = None,
                 min_free_percent: float | None = None, content: IContentStore | None = None) -> None:
        """Pools handed in are started and stopped by their owner (the service
        tree); without them the store makes and runs its own (tests, tools).
        ``min_free`` (bytes) or ``min_free_percent`` (of the filesystem) is the
        free-space floor; neither: the smaller of 1 GiB and 5 %. ``content``:
        where bodies live (default: ``<data_dir>/cas``); an IBackedContentStore
        (an S3 bucket behind a local tier) is uploaded to before each commit
        and fills its tier before an entry is handed out (s3/tiered.py)."""
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        self.reactor = reactor
        self.clock: Any = reactor  # what the write-error hold is timed by (tests: a task.Clock)
        self.max_size = max_size
        self.cas: IContentStore = content or LocalContentStore(os.path.join(self.data_dir, "cas"))
        self.backed = IBackedContentStore.providedBy(self.cas)
        # Index entries shared with the other hosts on the same bucket (s3/published.py).
        self.shared_index: Any = getattr(self.cas, "shared_index", None) if self.backed else None
        # The cross-host lease on a key being fetched (s3/lease.py): only where entries are shared.
        self.leases: Any = None
        if self.shared_index is not None:
            from sparkcache.store.s3.lease import Leases

            cas: Any = self.cas
            self.leases = Leases(cas.client, cas.prefix, cas.clock, cas.client.settings.lease_ttl, cas)
        if self.backed:
            from sparkcache.store.s3.tiered import TieredIndex

            self.index: Index = TieredIndex(os.path.join(self.data_dir, INDEX_NAME), reactor, pool=sqlite_pool)
            self.index.store = self  # type: ignore[attr-defined]
        else:
            self.index = Index(os.path.join(self.data_dir, INDEX_NAME), reactor, pool=sqlite_pool)
        self.spool_dir = os.path.join(self.data_dir, "spool")
        # fsync, rename and unlink of large files: never on the reactor, and
        # not in the default pool, which DNS resolution needs.
        self._own_io_pool = io_pool is None
        self.io_pool = io_pool if io_pool is not None else ThreadPool(minthreads=1, maxthreads=4, name="sparkcache-io")
        # Bodies being sent right now (open BodyRanges) → how many: eviction passes them by.
        self._sending: dict[str, int] = {}
        self._spools: set[SpoolFile] = set()
        # Spool files made ahead for misses (``spool``), and the misses waiting for one.
        self._spare: list[SpoolFile] = []
        self._spare_waiting: list[Deferred[SpoolFile]] = []
        self._restocking = False
        self._stopped = False
        # Spools whose body goes to the bucket as it downloads (s3/upload.py) → that upload.
        self._uploads: dict[SpoolFile, Any] = {}
        # Bodies being committed → how many commits; bodies being removed → the
        # removal. Together they close the race between a commit that finds its
        # body already stored and a purge or eviction deleting that body (_drop).
        self._committing: dict[str, int] = {}
        self._removing: dict[str, _Removal] = {}
        # Purge epochs: a counter, and when everything, each remote and each
        # recently purged key were last purged (see commit's ``since``).
        self._purges = 0
        # With worker processes: the shared epochs of this worker's own purges
        # (the others' are counted as purges of everything, see purged_since).
        self._own_purges: deque[int] = deque(maxlen=1024)
        self._purged_all = 0
        self._purged_remote: dict[str, int] = {}
        self._purged_key: OrderedDict[str, int] = OrderedDict()
        # Bodies of commits a purge refused → the eviction pass they came in:
        # removed (unless named by then) one full pass later (_sweep_unowned).
        self._unowned: dict[str, int] = {}
        self._sweeps = 0
        self.size = 0
        self.entries = 0
        self.min_free = min_free
        self.min_free_percent = min_free_percent
        # Whether this process evicts for space (with workers: the primary only).
        self.evicts = True
        # Below the free-space floor (after eviction did what it could): /ready says so.
        self.low_space = False
        self.free = None  # bytes free at the last check
        self.floor = 0  # the floor in bytes at the last check
        self.write_error = None  # the last write error, for logs and /health
        self._write_failed_at = None
        self._rechecked_at: float | None = None  # (recheck_space)
        self.reserve_path = os.path.join(self.data_dir, space.RESERVE_NAME)
        self._room = DeferredLock()  # one eviction for space at a time

    def share_space(self, evicts: bool) -> None:
        """Blocking (a worker's start-up): keep the free-space state and the
        store's size and entry count in ``<data_dir>/space.state``, shared by
        every worker process, so a write error or a low disk one of them sees
        makes them all pass misses through; only the worker that ``evicts``
        (the primary) evicts for space."""
        self._shared = space.SharedSpace(os.path.join(self.data_dir, space.SHARED_NAME))
        self.evicts = evicts

    def in_io(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.io_pool, fn, *args)

    # -- lifecycle -------------------------------------------------------------

    async def start(self, check: bool = True) -> None:
        """Open the index; with ``check`` (the default) first empty the spool and
        reconcile rows with bodies, which only a store's sole user may do (with
        worker processes the parent checks once, before any worker runs)."""
        if self._own_io_pool:
            self.io_pool.start()
        if check:
            removed = clear_spool(self.spool_dir)
            if removed:
                log.info("removed {n} unfinished download(s) from the spool", n=removed)
        await self.index.start()
        if self.backed:
            # Rows name bodies in the bucket: one without a tier copy is normal.
            await self.cas.start()  # type: ignore[attr-defined]
        elif check:
            present = await self.in_io(lambda: dict(self.cas.iter_digests()))
            dropped, orphans = await self.index.reconcile(present)
            if orphans:
                await self.in_io(lambda: [self.cas.remove(d) for d in orphans])
            if dropped or orphans:
                log.info("store check: dropped {d} index row(s) without a body, removed {o} orphan body file(s)",
                         d=dropped, o=len(orphans))
        await self.refresh_stats()
        await self.check_space()
        self._restock_soon()  # (the first miss's spool, ready)

    async def stop(self) -> None:
        self._stopped = True
        spare, self._spare = self._spare, []
        for spool in list(self._spools) + spare:
            spool.discard()
        self._spools.clear()
        waiting, self._spare_waiting = self._spare_waiting, []
        for d in waiting:
            d.errback(OSError(errno.ESHUTDOWN, "the store is stopping"))
        try:
            if self.backed:
                await self.cas.stop()  # type: ignore[attr-defined]
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

    def spool(self) -> Deferred[SpoolFile]:
        """A new spool file for a miss's body (as ``new_spool()``), made ahead
        in the I/O pool: one of SPARE_SPOOLS kept ready, taken with no system
        call and no thread hand-off on the way to the first byte (making a
        file, an inode and a directory entry, is 0.1-0.3 ms; handing it to a
        thread and back takes longer than a loopback upstream answers). Another
        is made at the reactor's next turn, with a measurement of the free
        space (``roomy``). When none is ready, fires once one is made. (The
        spool's leftovers are emptied at start-up, these with them: empty
        files, at most SPARE_SPOOLS per process.)"""
        if self._stopped:  # (nothing would make one: fail as a full disk would)
            return fail(OSError(errno.ESHUTDOWN, "the store is stopping"))
        if self._spare:
            spool = self._spare.pop()
            self._spools.add(spool)
            self._restock_soon()
            return succeed(spool)
        waiting: Deferred[SpoolFile] = Deferred(self._spare_waiting.remove)  # (cancelled: no longer waiting)
        self._spare_waiting.append(waiting)
        self._restock_soon()
        return waiting

    def _restock_soon(self) -> None:
        if not self._restocking and not self._stopped:
            self._restocking = True
            self.reactor.callLater(0, self._restock)

    def _restock(self) -> None:
        want = SPARE_SPOOLS - len(self._spare) + len(self._spare_waiting)
        if want <= 0 or self._stopped:
            self._restocking = False
            return
        spool_dir = self.spool_dir

        def made() -> tuple[list[SpoolFile], space.Space | None]:
            spools: list[SpoolFile] = []
            try:
                for _ in range(want):
                    spools.append(SpoolFile(spool_dir, "dl-"))
            except BaseException:
                for spool in spools:
                    spool.discard()
                raise
            try:
                return spools, (space.measure(self.data_dir) if os.path.exists(self.reserve_path) else None)
            except OSError:
                return spools, None

        def back(r: tuple[list[SpoolFile], space.Space | None]) -> None:
            spools, got = r
            self._restocking = False
            if got is not None:
                self.floor = space.floor_of(got.total, self.min_free, self.min_free_percent)
                self._measured(got.free)
            for spool in spools:
                if self._stopped:
                    spool.discard()
                elif self._spare_waiting:
                    self._spools.add(spool)
                    self._spare_waiting.pop(0).callback(spool)
                else:
                    self._spare.append(spool)
            if self._spare_waiting:
                self._restock_soon()

        def failed(f: Failure) -> None:
            # (A full disk: the misses waiting fail as new_spool() would, and
            # the next one tries again.)
            self._restocking = False
            waiting, self._spare_waiting = self._spare_waiting, []
            for d in waiting:
                d.errback(f)
            if not f.check(OSError):
                log.failure("making spool files ahead", f)

        self.in_io(made).addCallbacks(back, failed)

    def roomy(self, need: int) -> bool:
        """Whether the last free-space measurement (each spool made ahead
        brings one) shows room for ``need`` bytes, as many again and ROOM_SPARE
        above the floor: a miss then stores its body without measuring again."""
        return self.free is not None and self.free - 2 * need - ROOM_SPARE >= self.floor and self.writable

    def discard(self, spool: SpoolFile) -> None:
        self._spools.discard(spool)
        upload = self._uploads.pop(spool, None)
        if upload is not None:  # nothing of a body not stored stays in the bucket
            upload.abort()
        spool.discard()

    def stream_upload(self, spool: SpoolFile, flight: Any, expected_digest: str | None) -> None:
        """With a bucket behind (s3/upload.py): send a large body's parts while
        it is written to ``spool`` (told by ``flight.listen``: ``flight.written``
        grew), to finish at ``commit``."""
        if not self.backed or spool.size:  # (an adopted body is complete: uploaded whole at commit)
            return
        if expected_digest is None:  # a name announced by the upstream: used if the body matches it
            announced = (flight.headers.get("x-checksum-sha256") or "").strip().lower()
            expected_digest = announced if _SHA256.match(announced) else None
        upload = self.cas.stream(spool.path, expected_digest, flight.total)  # type: ignore[attr-defined]
        if upload is not None:
            self._uploads[spool] = upload
            flight.listen(lambda: upload.grew(flight.written))

    async def filling(self, spool: SpoolFile, fill: Awaitable[Any]) -> None:
        """Await a production's ``fill`` of ``spool``; a streamed upload of it that
        fails stops it (the clients tailing the body are cut off, nothing is
        stored) rather than letting a body that cannot be stored download on."""
        upload = self._uploads.get(spool)
        if upload is None:
            await fill
            return

        async def run() -> None:
            await fill  # (cancelling d cancels what it waits on: the upstream transfer)

        d = Deferred.fromCoroutine(run())
        upload.on_error(lambda e: d.cancel())
        try:
            await d
        except CancelledError:
            if upload.error is None:
                raise
            from sparkcache.store.s3.upload import upload_error

            raise upload_error(upload) from None

    async def commit(self, spool: SpoolFile, entry: Entry, since: int | None = None) -> Entry:
        """Make a complete, verified spool durable and visible under entry.key.

        ``since``: the purge epoch (``epoch()``) when the body's production
        began. A cached entry purged after that (everything, its remote or
        its key) is not made visible: the body may predate the purge. The
        caller's clients still get it; its body goes at the eviction pass
        after next, unless something else names it by then."""
        assert entry.digest == spool.hexdigest()
        digest = entry.digest
        assert digest is not None

        def durable() -> bool:
            spool.sync_and_close()
            return bool(self.cas.commit(spool.path, digest))

        # From here until the row is in, no removal of this body may run: a
        # commit that finds the body already stored relies on it staying (see _drop).
        self._committing[digest] = self._committing.get(digest, 0) + 1
        try:
            removing = self._removing.get(digest)
            while removing is not None:  # decided before we came: let it finish, then store ours
                await removing.wait()
                removing = self._removing.get(digest)
            try:
                if self.backed:  # in the bucket before the row: another host may read it at once
                    await self.in_io(spool.sync_and_close)
                    await self.cas.upload(spool.path, digest, spool.size,  # type: ignore[attr-defined]
                                          self._uploads.pop(spool, None))
                new_body = await self.in_io(durable)
            except BaseException:
                self.discard(spool)
                raise
            self._spools.discard(spool)
            if since is None or entry.local:
                await self.index.put(entry)
                written = True
            else:
                written = await self.index.put_unless(entry, lambda: self.purged_since(since, entry.remote, entry.key))
        except BaseException as e:
            self._release_commit(digest)
            # A purge meanwhile may have left the body to this commit (see _drop);
            # and a body no row names must not take the space until a restart.
            try:
                await self.release_digest(digest)
            except Exception:
                log.failure("removing the body of {key} after a failed commit", key=entry.key)
            self.note_write_error(e)  # after the removal: the room it makes counts it
            raise
        self._release_commit(digest)
        if not written:
            log.info("not keeping {key}: purged while it was being produced", key=entry.key)
            # Its clients may still read the body by this entry (an index page
            # waits for the whole body, then reads it): it goes a little later.
            self._unowned.setdefault(digest, self._sweeps)
            return entry
        if self.shared_index is not None:  # then a hit on the other hosts too
            await self.shared_index.publish(entry)
        # Approximate until the next stats refresh (a replaced key is not subtracted).
        self.entries += 1
        if new_body:
            self.size += entry.size
        return entry

    def _release_commit(self, digest: str) -> None:
        n = self._committing[digest] - 1
        if n:
            self._committing[digest] = n
        else:
            del self._committing[digest]

    # -- purge epochs ------------------------------------------------------------------

    def epoch(self) -> int:
        """The purge epoch now: captured when a production begins, handed to
        ``commit`` (or ``refresh``) at its end. With worker processes it is
        shared by all (``index.changes``): a purge in one is seen by all."""
        changes = self.index.changes
        return self._purges if changes is None else changes.purge_epoch()

    def purged_since(self, epoch: int, remote: str, key: str) -> bool:
        """Whether the cache of ``key`` (of ``remote``) was purged after ``epoch``.
        Called from the SQLite thread too: reads only (dict.get is atomic)."""
        if (self._purged_all > epoch or self._purged_remote.get(remote, 0) > epoch
                or self._purged_key.get(key, 0) > epoch):
            return True
        changes = self.index.changes
        if changes is None:
            return False
        # Another worker began a purge since: its scope is not known here, so
        # nothing is stored (the next request fetches again: never a purged body kept).
        return changes.purge_epoch() - epoch > sum(1 for seq in list(self._own_purges) if seq > epoch)

    def _new_purge(self) -> int:
        changes = self.index.changes
        if changes is None:
            self._purges += 1
            return self._purges
        seq = changes.bump_purge()
        self._own_purges.append(seq)
        return seq

    async def refresh(self, entry: Entry, since: int) -> bool:
        """Write ``entry``, a new state of a stored entry (revalidated) or a
        negative one, unless its cache was purged after ``since`` (an epoch
        taken before the upstream was asked) or, for one with a body, its row
        is gone (purged, evicted) or names another body: the body may be gone
        too, so the caller fetches it whole instead. Whether it was written."""

        def purged() -> bool:
            return not entry.local and self.purged_since(since, entry.remote, entry.key)

        return await self.index.refresh_unless(entry, purged)

    async def link(self, entry: Entry) -> bool:
        """Record ``entry``, another key for a body already stored (an OCI
        manifest under its digest, a cross-repository mount), unless that
        body has been let go of meanwhile (purged, evicted); whether it was."""
        return await self.index.put_if_body(entry)

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

        if self.backed and not self.cas.contains(digest):
            async def filled() -> bytes:
                if not await self.cas.ensure(digest, entry.size):  # type: ignore[attr-defined]
                    raise FileNotFoundError(f"sha256:{digest} is not in the bucket")
                return await self.in_io(read)

            return Deferred.fromCoroutine(filled())

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

    def open_digest(self, digest: str, size: int) -> BodyRange:
        """The body stored under ``digest`` (``size`` bytes), open like ``open_range``
        (eviction passes it by until it is closed): what an export reads.
        FileNotFoundError when it is not stored (evicted, purged)."""
        fd = self.cas.open(digest)
        self._sending[digest] = self._sending.get(digest, 0) + 1
        return BodyRange(fd, 0, size, digest, self._sent)

    def needs_fill(self, digest: str) -> bool:
        """Whether ``digest`` must be brought into a local tier before
        ``open_digest`` (a content store with one, ``ensure``, lacking it)."""
        return hasattr(self.cas, "ensure") and not self.cas.contains(digest)

    async def fill(self, digest: str, size: int) -> bool:
        """Bring ``digest`` into the local tier of a content store that has one;
        whether it is there to be opened."""
        ensure = getattr(self.cas, "ensure", None)
        if ensure is not None and not self.cas.contains(digest):
            return bool(await ensure(digest, size))
        return bool(self.cas.contains(digest))

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
        """Remove the bodies the index just let go of; returns the entry count.

        A body being committed right now is left alone (the commit's row is
        about to name it again; if that commit stores nothing after all, it
        removes the body itself), and a commit of a body being removed waits
        for the removal to end (then stores its own copy): so no row ever
        names a body that a removal decided before the row appeared."""
        count, orphans = result
        # A body still being sent stays readable through its open descriptor.
        doomed = [d for d in orphans if not self._committing.get(d) and d not in self._removing]
        if doomed:
            removal = _Removal()
            for d in doomed:
                self._removing[d] = removal
            try:
                await self.in_io(lambda: [self.cas.remove(d) for d in doomed])
            finally:
                for d in doomed:
                    del self._removing[d]
                removal.done()
        return count

    async def _sweep_unowned(self) -> None:
        """Remove the bodies of refused commits that came before the last pass
        (so their clients had at least one eviction interval to open them)."""
        self._sweeps += 1
        due = [d for d, at in self._unowned.items() if at < self._sweeps - 1]
        for d in due:
            del self._unowned[d]
            await self.release_digest(d)

    async def release_digest(self, digest: str) -> None:
        """Remove a body that a replaced entry no longer needs (unless others do)."""
        if not self._sending.get(digest):
            await self._drop((0, await self._freeing(lambda: self.index.unreferenced(digest))))

    async def _freeing(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run an index write that frees space (a deletion). SQLite needs room
        for its log even to delete rows: on a full disk, release the reserve
        and try once more, so a purge or an eviction can always free space."""
        try:
            return await op()
        except Exception as e:
            if not space.is_sqlite_full(e):
                raise
            freed = await self.in_io(space.release_reserve, self.reserve_path)
            log.warn("the index could not write ({e}): released the {n}-byte reserve to free space", e=e, n=freed)
            return await op()

    async def purge_key(self, key: str) -> int:
        """Delete one entry, pinned or not (its body too, unless others name it)."""
        return await self._drop(await self._freeing(lambda: self.index.delete_key(key)))

    async def purge_cached_key(self, key: str) -> int:
        """Purge one cached entry (a pinned or kept one stays), and keep a
        production of ``key`` in progress from committing what it fetched."""
        seq = self._new_purge()
        self._purged_key[key] = seq
        self._purged_key.move_to_end(key)
        while len(self._purged_key) > _PURGED_KEYS:
            # The oldest is forgotten: count it as a purge of everything, so a
            # production older than it still stores nothing (rare: a long fetch).
            _, forgotten = self._purged_key.popitem(last=False)
            self._purged_all = max(self._purged_all, forgotten)
        if self.shared_index is not None:  # the other hosts forget it too
            await self.shared_index.forget_key(key)
        return await self._drop(await self._freeing(lambda: self.index.delete_cached_key(key)))

    async def purge_remote(self, remote: str) -> int:
        """Purge the cached entries of ``remote``; pinned ones stay, and a
        production in progress for the remote commits nothing."""
        self._purged_remote[remote] = self._new_purge()
        if self.shared_index is not None:
            await self.shared_index.forget_remote(remote)
        n = await self._drop(await self._freeing(lambda: self.index.delete_remote(remote)))
        await self._after_purge()
        return n

    async def purge_all(self) -> int:
        """Purge everything cached; pinned entries stay, and no production in
        progress commits what it fetched."""
        self._purged_all = self._new_purge()
        if self.shared_index is not None:
            await self.shared_index.forget_remote(None)
        n = await self._drop(await self._freeing(lambda: self.index.delete_all()))
        await self.refresh_stats()
        await self._after_purge()
        return n

    async def _after_purge(self) -> None:
        # Space came back: the next miss may be stored again, without waiting
        # out a write error or the next eviction tick.
        self._write_failed_at = None
        await self.check_space()

    async def delete_local(self, remote: str, path: str) -> int:
        """Delete local content (an upload, a push: the only copy) of ``remote``
        at ``path``: the explicit, destructive call no purge makes."""
        n = await self._drop(await self._freeing(lambda: self.index.delete_local(remote, path)))
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
        """Least-recently-used eviction down to max_size, then down to the
        free-space floor; bodies of pinned entries and bodies being sent are
        skipped."""
        await self.index.flush_access()
        await self._sweep_unowned()
        evicted = await self._evict_to_size()
        await self._room.acquire()
        try:
            return evicted + await self._evict_for_space(0)
        finally:
            self._room.release()

    async def _evict_to_size(self) -> int:
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
                if await self._evict_one(digest):
                    size -= blob_size
                    evicted += 1
                    progress = True
            if not progress:
                break
        await self.refresh_stats()
        log.info("evicted {n} bodies; store now {size} bytes", n=evicted, size=self.size)
        return evicted

    async def _evict_one(self, digest: str) -> bool:
        """Evict one body and its entries; False when it stays (being sent, or
        pinned since lru_blobs chose it)."""
        if self._sending.get(digest):
            return False
        _, gone = await self._freeing(lambda: self.index.delete_digest(digest))
        await self._drop((0, gone))
        return digest in gone

    # -- free space ------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """Whether a miss should be stored now: not below the floor, and no
        write error in the last WRITE_ERROR_HOLD seconds."""
        if self.low_space:
            return False
        if self.backed and not self.cas.writable:  # type: ignore[attr-defined]
            return False
        at = self._write_failed_at
        return at is None or self.clock.seconds() - at >= WRITE_ERROR_HOLD

    def recheck_space(self) -> None:
        """(A miss passed through because the store is below its floor.) Measure
        again, in the background, at most every RECHECK_INTERVAL seconds: space
        given back since the last measurement (a failed download's spool whose
        last descriptor closed after it, something else deleting files) makes
        the store writable at the next miss, not at the next eviction tick."""
        if not self.low_space:
            return
        now = self.clock.seconds()
        if self._rechecked_at is not None and now - self._rechecked_at < RECHECK_INTERVAL:
            return
        self._rechecked_at = now

        async def measure() -> None:
            try:
                await self.check_space()
            except Exception:
                log.failure("measuring free space")

        Deferred.fromCoroutine(measure())

    def note_write_error(self, e: BaseException) -> None:
        """A spool write, fsync, rename or index commit failed: if the disk is
        at fault, stop storing for a while and make room in the background."""
        if not space.is_write_error(e):
            return
        now = self.clock.seconds()
        first = self._write_failed_at is None or now - self._write_failed_at >= WRITE_ERROR_HOLD
        self._write_failed_at = now
        self.write_error = str(e)
        if first:
            log.warn("the store cannot write ({e}): passing misses through uncached for {s:g}s", e=e,
                     s=WRITE_ERROR_HOLD)
        Deferred.fromCoroutine(self._background_room())

    async def _background_room(self) -> None:
        try:
            await self.make_room(0)
        except Exception:
            log.failure("making room after a write error")

    async def check_space(self) -> int:
        """Measure free space (in the I/O pool), update ``low_space`` and keep
        the reserve; returns the bytes free."""
        got = await self.in_io(space.measure, self.data_dir)
        self.floor = space.floor_of(got.total, self.min_free, self.min_free_percent)
        free = got.free
        if not os.path.exists(self.reserve_path):
            size = space.reserve_size(got.total)
            if free - size > self.floor and await self.in_io(space.make_reserve, self.reserve_path, size):
                free -= size
        return self._measured(free)

    def _measured(self, free: int) -> int:
        self.free = free
        low = free < self.floor
        if low != self.low_space:
            if low:
                log.warn("free space {free} bytes is below the floor of {floor} bytes", free=free, floor=self.floor)
            else:
                log.info("free space {free} bytes is above the floor of {floor} bytes again", free=free,
                         floor=self.floor)
        self.low_space = low
        return free

    async def make_room(self, need: int) -> bool:
        """Evict (least recently used first) until ``need`` more bytes fit above
        the floor; False when they cannot (then nothing is evicted for them)."""
        if not self.evicts:
            return await self._room_from_primary(need)
        await self._room.acquire()
        try:
            free = await self.check_space()
            if free - need >= self.floor:
                return True
            if need and need > free + self.size - self.floor:
                return False  # even an empty cache would not hold it: keep what is there
            await self._evict_for_space(need)
            return self.free is not None and self.free - need >= self.floor
        finally:
            self._room.release()

    async def _room_from_primary(self, need: int) -> bool:
        """A worker that does not evict: ask the primary for the room (it looks
        every ROOM_POLL seconds) and wait for it, at most ROOM_WAIT seconds."""
        free = await self.check_space()
        if free - need >= self.floor:
            return True
        if (need and need > free + self.size - self.floor) or self._shared is None:
            return False
        self._shared.want_room(need)
        deadline = self.clock.seconds() + ROOM_WAIT
        while self.clock.seconds() < deadline:
            await deferLater(self.clock, ROOM_POLL, lambda: None)
            if await self.check_space() - need >= self.floor:
                return True
        return False

    async def make_wanted_room(self) -> None:
        """The primary, every ROOM_POLL seconds with worker processes: make the
        room another worker found missing (``make_room`` there never evicts)."""
        need = self._shared.take_wanted() if self._shared is not None else None
        if need is not None:
            await self.make_room(need)

    async def _evict_for_space(self, need: int) -> int:
        free = await self.check_space()
        if free - need >= self.floor:
            return 0
        target = self.floor + need + int(self.floor * SPACE_SLACK)
        await self.index.flush_access()
        evicted = 0
        while free < target:
            candidates = await self.index.lru_blobs(64 + len(self._sending))
            progress = False
            for digest, blob_size in candidates:
                if free >= target:
                    break
                if await self._evict_one(digest):
                    free += blob_size
                    evicted += 1
                    progress = True
            free = await self.check_space()
            if not progress:
                break
        await self.refresh_stats()
        if evicted:
            log.info("evicted {n} bodies for free space; {free} bytes free (floor {floor})", n=evicted, free=free,
                     floor=self.floor)
        return evicted


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Keys whose purge is remembered for productions still running (see purge_cached_key).
_PURGED_KEYS = 4096


class _Removal:
    """Bodies being removed: commits of them wait until they are gone."""

    def __init__(self) -> None:
        self._waiters: builtins.list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def done(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


def _digest_of(entry: Entry) -> str:
    if entry.digest is None:
        raise ValueError(f"entry {entry.key!r} has no body")
    return entry.digest
