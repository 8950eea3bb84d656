"""The S3 content store: bodies in a bucket, a local disk tier in front.

``<prefix>cas/<sha256>`` holds each committed body, written once (a
conditional PUT, or an identical overwrite where the server ignores the
condition). The tier is a local content store of its own size: every hit is
served from it (sendfile), a body missing there is fetched from the bucket
once (singleflight; across worker processes a fill lock) and verified
against its sha256 before it lands, and it forgets least recently used
bodies above ``tier_max_size`` (tier.py: one LRU per host, whatever the
number of worker processes).

While the bucket is unreachable the store says it is not ``writable`` for a
while (the engine passes misses through uncached, X-Cache: BYPASS) and the
tier keeps serving what it holds. A body that is gone from the bucket, or
that comes back with other bytes than its name says, is a miss, never a
5xx: the index row goes and the next request fetches from upstream again.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from zope.interface import implementer

from sparkcache.fetch.produce import Singleflight
from sparkcache.store.cas import IBackedContentStore, remove_file
from sparkcache.store.s3.bodies import FileSink
from sparkcache.store.s3.client import Mismatch, S3Client, S3Error, S3Unavailable
from sparkcache.store.s3.published import SharedIndex
from sparkcache.store.s3.tier import FILL_POLL, TICK, Tier, fill_lock_path, release_lock, try_lock

log = Logger()

# After the bucket failed to answer, misses pass through uncached for this
# long before the next one tries to store again.
DOWN_HOLD = 10.0
# A worker other than the primary retries its failed pinned markers every this many ticks.
PIN_RETRY_TICKS = 60


@implementer(IBackedContentStore)
class S3ContentStore:
    shared = True
    _streams: Any = None  # upload.StreamedUploads, made by the first stream()

    def __init__(self, client: S3Client, tier_root: str, tier_max_size: int, clock: Any,
                 in_io: Callable[..., Deferred[Any]], shared: bool = False, evicts: bool = True) -> None:
        """``shared``: a worker process (the tier's LRU and its fills are the
        host's, see tier.py; the parent checked the tier before it started);
        ``evicts``: this process removes bodies above ``tier_max_size``."""
        self.client = client
        self.prefix = client.settings.prefix
        self.tier = Tier(tier_root, tier_max_size, clock, shared=shared, evicts=evicts)
        self.tier_max_size = tier_max_size
        self.shared = shared
        self.clock = clock
        self.in_io = in_io
        self._fills: Singleflight[str, bool] = Singleflight()
        self._ticker: LoopingCall | None = None
        self._ticking: Deferred[Any] | None = None
        self._ticks = 0
        self._down_at: float | None = None
        self.fills = 0  # bodies brought from the bucket into the tier by this process
        self.kept = 0  # bodies streamed from another host kept in the tier (keep_streamed)
        self.uploads = 0  # bodies written to the bucket (not found there first)
        self.ranged = 0  # ranges served from the bucket (ranged.py)
        self.shared_index = SharedIndex(client, self.prefix, clock, self) if client.settings.share_index else None
        # Set by sweep.timers on the primary: the bucket's sweeper.
        self.sweeper: Any = None

    @property
    def hints(self) -> Any:
        """Recency hints for the bucket's sweeper (sweep.AccessHints), set on the primary."""
        return self.tier.hints

    @hints.setter
    def hints(self, value: Any) -> None:
        self.tier.hints = value

    @property
    def tier_size(self) -> int:
        return self.tier.size

    def object_name(self, digest: str) -> str:
        self.tier.local_path(digest)  # validates the digest
        return f"{self.prefix}cas/{digest}"

    # -- reachability ------------------------------------------------------------

    @property
    def writable(self) -> bool:
        at = self._down_at
        return at is None or self.clock.seconds() - at >= DOWN_HOLD

    def note_down(self, e: BaseException) -> None:
        self._down(e)

    def _down(self, e: BaseException) -> None:
        if self._down_at is None:
            log.warn("the S3 bucket is unreachable ({e}): serving the local tier, passing misses through", e=e)
        self._down_at = self.clock.seconds()

    def _up(self) -> None:
        if self._down_at is not None:
            log.info("the S3 bucket answers again")
        self._down_at = None

    # -- IContentStore: the tier -------------------------------------------------------

    def local_path(self, digest: str) -> str:
        return self.tier.local_path(digest)

    def open(self, digest: str) -> int:
        return self.tier.open(digest)

    def contains(self, digest: str) -> bool:
        return self.tier.contains(digest)

    def commit(self, spool_path: str, digest: str) -> bool:
        """Into the tier (the bucket has it already: Store.commit uploads first)."""
        return self.tier.commit(spool_path, digest)

    def remove(self, digest: str) -> int:
        """The tier's copy only: the bucket is shared with other hosts (its
        objects go by the bucket's own sweeper, not by one host's eviction)."""
        return self.tier.remove(digest)

    def iter_digests(self) -> Iterator[tuple[str, int]]:
        return self.tier.iter_digests()

    # -- the tier's tick ---------------------------------------------------------------

    def _tick(self) -> Deferred[Any]:
        self._ticking = Deferred.fromCoroutine(self._tick_once())
        return self._ticking

    async def _tick_once(self) -> None:
        # A LoopingCall stops for good at an exception: log, carry on.
        try:
            await self.in_io(self.tier.tick)
            self._ticks += 1
            # Pinned markers that failed in a worker other than the primary
            # (whose hint timer retries its own): retried here, once a minute.
            if (self.shared and not self.tier.evicts and self.shared_index is not None
                    and self.shared_index.pins_pending and self._ticks % PIN_RETRY_TICKS == 0):
                await self.shared_index.retry_pins()
        except Exception:
            log.failure("the tier's tick")

    # -- IBackedContentStore: the bucket -------------------------------------------------

    async def start(self) -> None:
        if self.shared:  # a worker: the parent checked the tier before any worker ran
            await self.in_io(self.tier.open_ledger)
        else:
            await self.in_io(self.tier.check)
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self.clock
        self._ticker.start(TICK, now=False)
        log.info("S3 store: bucket {bucket} at {endpoint} (prefix {prefix!r}); local tier {n} bytes of {max}",
                 bucket=self.client.settings.bucket, endpoint=self.client.settings.endpoint, prefix=self.prefix,
                 n=self.tier_size, max=self.tier_max_size)

    async def stop(self) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._ticking is not None and not self._ticking.called:
            await self._ticking
        self._fills.cancel()
        try:
            await self.in_io(self.tier.flush)
        except Exception:
            log.failure("writing the tier's last hits")
        await self.in_io(self.tier.close)
        await self.client.close()

    def stream(self, spool_path: str, expected: str | None, total: int | None) -> Any:
        """An upload.StreamedUpload of the body being written to ``spool_path``,
        sending its parts as the spool grows, straight to its object when its
        sha256 is ``expected``, else to a temporary object copied at the end.
        None while the bucket is down (the miss is passed through anyway) or
        when ``stream_uploads`` says not to."""
        if self._streams is None:
            from sparkcache.store.s3.upload import StreamedUploads

            self._streams = StreamedUploads(self.client, self._down)
        return self._streams.start(spool_path, expected, total) if self.writable else None

    async def upload(self, spool_path: str, digest: str, size: int, streamed: Any = None) -> None:
        """Write a complete, fsynced body to the bucket, before its index row:
        the rest of its ``streamed`` upload if that started, else the whole body."""
        try:
            created = None
            if streamed is not None:
                created = await self._streams.finish(streamed, self.object_name(digest), size)
            if created is None:
                created = await self.client.put_file(self.object_name(digest), spool_path, size, digest)
        except S3Unavailable as e:
            self._down(e)
            raise
        self._up()
        if created:
            self.uploads += 1
        if self._streams is not None:  # the bucket answers: the aborts it missed while down
            self._streams.retry_aborts()

    async def keep_streamed(self, spool: Any, digest: str, size: int) -> bool:
        """Into the tier, a body that arrived from another host (fetch/peer.py)
        and matched, by its sha256 and size, the entry that host published
        (its object in the bucket): the published entry's fill then finds it
        here instead of GETting it again. The caller checked that entry; the
        bytes are checked here once more (the spool's own hash of what was
        written). Whether it was not in the tier yet."""
        if spool.hexdigest() != digest or spool.size != size:
            raise ValueError(f"not the body of sha256:{digest}")

        def durable() -> bool:
            spool.sync_and_close()
            return self.tier.commit(spool.path, digest)

        new = bool(await self.in_io(durable))
        self.kept += 1
        return new

    def ensure(self, digest: str, size: int) -> Deferred[bool]:
        """Whether the tier holds the body now, fetching it from the bucket
        first if it must (once, however many ask: in this process a
        singleflight, across worker processes the fill lock). False: the
        bucket does not have it (or has other bytes under its name). Raises
        S3Unavailable when the bucket cannot be asked."""
        if self.tier.contains(digest):
            self.tier.touch(digest)
            return Deferred.fromCoroutine(_true())
        if not self.writable:
            # Known to be down: a miss now (passed through) rather than a wait for every retry.
            return Deferred.fromCoroutine(_down_now(self.object_name(digest)))
        fill = self._fill_across if self.shared else self._fill
        return self._fills.run(digest, lambda: fill(digest, size))

    async def probe(self, digest: str, size: int) -> bool | None:
        """Whether the bucket holds ``digest`` with ``size`` bytes (a HEAD): a
        range of it may be served from there (ranged.py). None: the bucket
        cannot be asked now."""
        try:
            info = await self.client.head(self.object_name(digest))
        except S3Unavailable as e:
            self._down(e)
            return None
        self._up()
        if info is None:
            log.info("sha256:{digest} is gone from the bucket: a miss", digest=digest)
            return False
        if info.size != size:
            log.warn("the bucket's sha256:{digest} has {n} bytes, not {size}: filling it to check",
                     digest=digest, n=info.size, size=size)
            return None
        return True

    def fill_later(self, digest: str, size: int) -> None:
        """Start bringing ``digest`` into the tier (verified, as every fill) without waiting for it."""
        def failed(f: Any) -> None:
            log.info("bringing sha256:{digest} into the tier: {e}", digest=digest, e=f.value)

        self.ensure(digest, size).addErrback(failed)

    async def _fill_across(self, digest: str, size: int) -> bool:
        """One fill of ``digest`` per host: the worker holding its fill lock
        fills; the others wait for the file (or for the lock: the filler
        failed or died, and one of them tries)."""
        lock_path = fill_lock_path(self.tier.locks_dir, digest)
        while True:
            fd = await self.in_io(try_lock, lock_path)
            if fd is not None:
                try:
                    if await self.in_io(self.tier.contains, digest):
                        self.tier.touch(digest)
                        return True  # filled by another worker meanwhile
                    await self.in_io(self.tier.remove_stale_fills, digest)
                    return await self._fill(digest, size)
                finally:
                    await self.in_io(release_lock, fd, lock_path)
            await deferLater(self.clock, FILL_POLL, lambda: None)
            if self.tier.contains(digest):
                self.tier.touch(digest)
                return True

    async def _fill(self, digest: str, size: int) -> bool:
        tmp = self.tier.fill_name(digest)
        fd = await self.in_io(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        closed = False
        try:
            sink = FileSink(fd, self.client.reactor, self.client.settings.timeout, limit=size)
            try:
                await self.client.get_to(self.object_name(digest), sink)
                bad = sink.written != size or sink.hexdigest() != digest
            except S3Unavailable as e:
                self._down(e)
                raise
            except (ValueError, Mismatch):
                bad = True
            except S3Error as e:
                if e.status == 404:
                    log.info("sha256:{digest} is gone from the bucket: a miss", digest=digest)
                    return False
                raise
            self._up()
            if bad:
                # Some servers never check what they were sent: never serve it, and
                # take it away so that the next upload of the body puts it right.
                log.warn("the bucket's sha256:{digest} is corrupt ({n} bytes, sha256:{got}): deleting it",
                         digest=digest, n=sink.written, got=sink.hexdigest())
                try:
                    await self.client.delete(self.object_name(digest))
                except S3Error as e:
                    log.warn("could not delete the corrupt object: {e}", e=e)
                return False
            closed = True
            await self.in_io(_sync_close, fd)
            # Into the tier and its ledger; the evicting process evicts at once.
            await self.in_io(self.tier.commit, tmp, digest)
            self.fills += 1
            return True
        finally:
            if not closed:
                await self.in_io(os.close, fd)
            await self.in_io(remove_file, tmp)


async def _true() -> bool:
    return True


async def _down_now(name: str) -> bool:
    raise S3Unavailable(f"GET {name}", None, message="(the bucket is down)")


def _sync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
