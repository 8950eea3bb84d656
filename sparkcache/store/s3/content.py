"""The S3 content store: bodies in a bucket, a local disk tier in front.

``<prefix>cas/<sha256>`` holds each committed body, written once (a
conditional PUT, or an identical overwrite where the server ignores the
condition). The tier is a local content store of its own size: every hit is
served from it (sendfile), a body missing there is fetched from the bucket
once (singleflight) and verified against its sha256 before it lands, and it
forgets least recently used bodies above ``tier_max_size``.

While the bucket is unreachable the store says it is not ``writable`` for a
while (the engine passes misses through uncached, X-Cache: BYPASS) and the
tier keeps serving what it holds. A body that is gone from the bucket, or
that comes back with other bytes than its name says, is a miss, never a
5xx: the index row goes and the next request fetches from upstream again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from sparkcache.fetch.produce import Singleflight
from sparkcache.store.cas import IBackedContentStore, LocalContentStore, remove_file
from sparkcache.store.s3.bodies import FileSink
from sparkcache.store.s3.client import Mismatch, S3Client, S3Error, S3Unavailable
from sparkcache.store.s3.published import SharedIndex

log = Logger()

# After the bucket failed to answer, misses pass through uncached for this
# long before the next one tries to store again.
DOWN_HOLD = 10.0


@implementer(IBackedContentStore)
class S3ContentStore:
    shared = True
    _streams: Any = None  # upload.StreamedUploads, made by the first stream()

    def __init__(self, client: S3Client, tier_root: str, tier_max_size: int, clock: Any,
                 in_io: Callable[..., Deferred[Any]]) -> None:
        self.client = client
        self.prefix = client.settings.prefix
        self.tier = LocalContentStore(tier_root)
        self.tier_max_size = tier_max_size
        self.clock = clock
        self.in_io = in_io
        # digest → size, least recently used first. Touched from the reactor
        # (open on a hit) and from the I/O pool (commit, read): hence the lock.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self.tier_size = 0
        self._fills: Singleflight[str, bool] = Singleflight()
        self._down_at: float | None = None
        self.fills = 0  # bodies brought from the bucket into the tier
        self.uploads = 0  # bodies written to the bucket (not found there first)
        self.shared_index = SharedIndex(client, self.prefix, clock, self) if client.settings.share_index else None
        # Set by sweep.timers on the primary: recency hints for the bucket's sweeper.
        self.hints: Any = None
        self.sweeper: Any = None

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
        fd = self.tier.open(digest)
        self._touch(digest)
        return fd

    def contains(self, digest: str) -> bool:
        return self.tier.contains(digest)

    def commit(self, spool_path: str, digest: str) -> bool:
        """Into the tier (the bucket has it already: Store.commit uploads first)."""
        size = os.stat(spool_path).st_size
        new = self.tier.commit(spool_path, digest)
        self._added(digest, size, new)
        self._evict_tier(keep=digest)
        return new

    def remove(self, digest: str) -> int:
        """The tier's copy only: the bucket is shared with other hosts (its
        objects go by the bucket's own sweeper, not by one host's eviction)."""
        with self._lock:
            size = self._lru.pop(digest, None)
            if size is not None:
                self.tier_size -= size
        return self.tier.remove(digest)

    def iter_digests(self) -> Iterator[tuple[str, int]]:
        return self.tier.iter_digests()

    # -- the tier's LRU ------------------------------------------------------------------

    def _touch(self, digest: str) -> None:
        if self.hints is not None:
            self.hints.note(digest)
        with self._lock:
            if digest in self._lru:
                self._lru.move_to_end(digest)

    def _added(self, digest: str, size: int, new: bool) -> None:
        if self.hints is not None:
            self.hints.note(digest)
        with self._lock:
            if digest not in self._lru:
                self.tier_size += size
            self._lru[digest] = size
            self._lru.move_to_end(digest)

    def _evict_tier(self, keep: str | None = None) -> int:
        """Blocking (I/O pool): forget least recently used tier bodies above
        tier_max_size. A body being sent stays readable through its open
        descriptor; ``keep`` (the one just added, about to be served) stays."""
        freed = 0
        while True:
            with self._lock:
                if self.tier_size <= self.tier_max_size or not self._lru:
                    return freed
                digest, size = next(iter(self._lru.items()))
                if digest == keep:
                    if len(self._lru) == 1:
                        return freed
                    self._lru.move_to_end(digest)
                    continue
                del self._lru[digest]
                self.tier_size -= size
            freed += remove_file(self.tier.local_path(digest))

    def _scan(self) -> int:
        found = []
        for digest, size in self.tier.iter_digests():
            try:
                at = os.stat(self.tier.local_path(digest)).st_mtime
            except FileNotFoundError:
                continue
            found.append((at, digest, size))
        with self._lock:
            for _, digest, size in sorted(found):
                self._lru[digest] = size
                self.tier_size += size
        return self._evict_tier()

    # -- IBackedContentStore: the bucket -------------------------------------------------

    async def start(self) -> None:
        await self.in_io(self._scan)
        log.info("S3 store: bucket {bucket} at {endpoint} (prefix {prefix!r}); local tier {n} bytes of {max}",
                 bucket=self.client.settings.bucket, endpoint=self.client.settings.endpoint, prefix=self.prefix,
                 n=self.tier_size, max=self.tier_max_size)

    async def stop(self) -> None:
        self._fills.cancel()
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

    def ensure(self, digest: str, size: int) -> Deferred[bool]:
        """Whether the tier holds the body now, fetching it from the bucket
        first if it must (once, however many ask). False: the bucket does not
        have it (or has other bytes under its name). Raises S3Unavailable when
        the bucket cannot be asked."""
        if self.tier.contains(digest):
            self._touch(digest)
            return Deferred.fromCoroutine(_true())
        if not self.writable:
            # Known to be down: a miss now (passed through) rather than a wait for every retry.
            return Deferred.fromCoroutine(_down_now(self.object_name(digest)))
        return self._fills.run(digest, lambda: self._fill(digest, size))

    async def _fill(self, digest: str, size: int) -> bool:
        tmp = os.path.join(self.tier.root, f".fill-{digest}")
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
            new = await self.in_io(self.tier.commit, tmp, digest)
            self._added(digest, size, new)
            self.fills += 1
            await self.in_io(self._evict_tier, digest)
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
