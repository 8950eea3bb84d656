"""A large body's multipart upload, its parts sent while the body downloads.

The engine writes a miss to its spool file as it arrives; ``StreamedUpload``
hears each time the spool grew (``grew``, from the flight's progress
listener) and, once the body is known to be larger than
``multipart_threshold`` (its Content-Length, or the bytes so far), starts a
multipart upload and sends every whole ``part_size`` part as soon as the
spool holds it: read back from the spool file in the I/O pool
(bodies.FileProducer), ``UNSIGNED-PAYLOAD``, at most ``PARALLEL_PARTS`` in
flight (the others wait their turn: their bytes are in the spool, not in
memory). When the body is complete and verified, ``finish`` sends the last
part and completes the upload; then the engine commits as before.

Where the parts go. An object's name is its sha256, known before the body
only when the production expects one (an OCI blob, a pinned hash) or the
upstream announced it (``X-Checksum-Sha256``, as Artifactory and Nexus send):
then the parts go straight to ``<prefix>cas/<sha256>`` and completion makes
it (a body that does not match is never completed: the upload is aborted and
the body goes up whole at the end). Other
bodies go to ``<prefix>tmp/<host>/<random>`` and are copied server-side to
their name at the end (CopyObject; UploadPartCopy ranges above 5 GiB), then
the temporary object is deleted. Nothing is ever named by a digest it does
not have: an aborted fetch (truncated, a write error, a purge, a failed
part) aborts the multipart upload, and a temporary object or upload left by
a daemon that died is cleared by the bucket's sweeper a day later (sweep.py).

A part that fails (after the client's retries) fails the upload at once:
``on_error`` callbacks run (the store stops the download, so the clients
tailing it are cut off like any failed fetch) and ``finish`` raises.
"""

from __future__ import annotations

import re
import socket
import uuid
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.logger import Logger

from sparkcache.store.s3.client import PARALLEL_PARTS, S3Client, S3Error, S3Unavailable

log = Logger()

# Multipart uploads remembered to abort once the bucket answers again (beyond: the sweeper's leftovers pass).
LEFTOVERS = 1000
MAX_PARTS = 10_000  # S3's limit on one multipart upload
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StreamedUploads:
    """The content store's streamed uploads: which bodies get one (``stream_uploads``),
    names for temporary objects, and the aborts to try again once the bucket answers."""

    def __init__(self, client: S3Client, down: Callable[[BaseException], None]) -> None:
        self.client = client
        self.prefix = client.settings.prefix
        self.down = down  # the bucket is unreachable: misses pass through for a while
        self.host = re.sub(r"[^A-Za-z0-9._-]", "-", client.settings.host_id or socket.gethostname()) or "host"
        self.streamed = 0  # bodies whose parts went up while they downloaded
        self._leftovers: list[tuple[str, str]] = []  # (object, upload id)

    def start(self, path: str, expected: str | None, total: int | None) -> "StreamedUpload | None":
        mode = self.client.settings.stream_uploads
        if expected is not None and not _SHA256.match(expected):
            expected = None  # (not a sha256: the engine refuses the body anyway)
        if mode == "false" or (mode == "known" and expected is None):
            return None
        final = f"{self.prefix}cas/{expected}" if expected is not None else None
        up = StreamedUpload(self.client, path, final, f"{self.prefix}tmp/{self.host}/{uuid.uuid4().hex}", total)
        up.on_error(lambda e: self.down(e) if isinstance(e, S3Unavailable) else None)
        up.leftover = self._leftover
        return up

    async def finish(self, up: "StreamedUpload", name: str, size: int) -> bool | None:
        """``up``'s end (see StreamedUpload.finish); None: upload the body whole."""
        if not up.started:
            up.abort()  # a small body: nothing was sent, and nothing will be
            return None
        created = await up.finish(name, size)
        if created is not None:
            self.streamed += 1
        return created

    def _leftover(self, key: str, uid: str) -> None:
        if len(self._leftovers) < LEFTOVERS:
            self._leftovers.append((key, uid))

    def retry_aborts(self) -> None:
        if self._leftovers:
            Deferred.fromCoroutine(self._abort_leftovers())

    async def _abort_leftovers(self) -> None:
        leftovers, self._leftovers = self._leftovers, []
        for key, uid in leftovers:
            if not await self.client.abort_multipart(key, uid):
                self._leftover(key, uid)


class StreamedUpload:
    def __init__(self, client: S3Client, path: str, final: str | None, temp: str, total: int | None) -> None:
        """``path``: the spool file; ``final``: the object's name when known in
        advance (else the parts go to ``temp``); ``total``: the announced length."""
        self.client = client
        self.path = path
        self.final = final
        self.temp = temp
        self.key = final if final is not None else temp  # where the parts go
        self.total = total
        self.part_size = client.settings.part_size
        self.threshold = client.settings.multipart_threshold
        self.started = False
        self.exists = False  # ``final`` was in the bucket already: nothing is sent
        self.aborted = False
        self.gave_up = False  # more than MAX_PARTS parts
        self.error: BaseException | None = None
        self.sent = 0  # bytes of parts uploaded (figures, tests)
        self._uid: str | None = None
        self._etags: dict[int, str] = {}
        self._queued = 0  # parts 1.._queued are sent or being sent
        self._written = 0
        self._size: int | None = None  # known once the body is complete (finish)
        self._running: dict[int, Deferred[None]] = {}
        self._creating: Deferred[None] | None = None
        self._idle: list[Deferred[None]] = []
        self._on_error: list[Callable[[BaseException], None]] = []
        # Told of an upload whose abort failed (the bucket down): to abort later.
        self.leftover: Callable[[str, str], None] = lambda key, uid: None

    def on_error(self, fn: Callable[[BaseException], None]) -> None:
        """Call ``fn(error)`` when the upload fails before ``finish`` (once)."""
        self._on_error.append(fn)
        if self.error is not None and not self.aborted:
            fn(self.error)

    # -- while the body downloads ----------------------------------------------------

    def grew(self, written: int) -> None:
        """The spool holds ``written`` bytes now (on the reactor: cheap)."""
        if self.aborted or self.error is not None or self._size is not None:
            return
        self._written = max(self._written, written)
        if self.total is not None and -(-self.total // self.part_size) > MAX_PARTS:
            self.gave_up = True  # (never started: uploaded whole at the end, as before)
            return
        if self._ready() > MAX_PARTS and not self.gave_up:
            # Too many parts for S3: no more sent; the body is tried whole at the end (as before).
            self.gave_up = True
            self.abort()
            return
        if not self.started:
            if (self.total if self.total is not None else self._written) <= self.threshold:
                return  # (yet): a small body goes up whole at the end, in one PUT
            self.started = True
            self._creating = Deferred.fromCoroutine(self._create())
            return
        self._pump()

    async def _create(self) -> None:
        try:
            if self.final is not None and await self.client.head(self.final) is not None:
                self.exists = True  # another host (or an earlier fetch) wrote it
                return
            uid = await self.client.create_multipart(self.key)
        except CancelledError:
            return
        except Exception as e:
            self._fail(e)
            return
        self._uid = uid
        self._pump()

    def _ready(self) -> int:
        """How many parts can be sent: the whole ones in the spool, all once the size is known."""
        if self._size is None:
            return self._written // self.part_size
        return -(-self._size // self.part_size)

    def _pump(self) -> None:
        if self._uid is not None and self.error is None and not self.aborted:
            ready = self._ready()
            while self._queued < ready and len(self._running) < PARALLEL_PARTS:
                self._queued += 1
                part = self._queued
                start = (part - 1) * self.part_size
                end = start + self.part_size if self._size is None else min(start + self.part_size, self._size)
                d = Deferred.fromCoroutine(self._send(part, start, end - start))
                if not d.called:
                    self._running[part] = d
        self._check_idle()

    async def _send(self, part: int, start: int, n: int) -> None:
        assert self._uid is not None
        try:
            etag = await self.client.upload_part(self.key, self._uid, part, self.path, start, n)
        except CancelledError:
            self._running.pop(part, None)
            return
        except Exception as e:
            self._running.pop(part, None)
            self._fail(e)
            return
        self._running.pop(part, None)
        self._etags[part] = etag
        self.sent += n
        self._pump()

    def _fail(self, e: BaseException) -> None:
        if self.error is not None or self.aborted:
            return
        self.error = e
        log.warn("uploading {key} failed: {e}", key=self.key, e=e)
        for fn in self._on_error:
            fn(e)
        self._check_idle()

    def _check_idle(self) -> None:
        done = self.error is not None or self.aborted or (
            self._size is not None and self._queued >= self._ready() and not self._running)
        if done and self._idle:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _all_sent(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        self._check_idle()
        return d

    # -- the end -------------------------------------------------------------------------

    async def finish(self, name: str, size: int) -> bool | None:
        """The body is complete and verified, ``size`` bytes, to be named ``name``:
        send what is left, complete the upload (and copy it to ``name``). True:
        written; False: ``name`` was in the bucket already; None: the parts went
        to another name than the body's (an expected digest not matched: the
        upload is aborted, the caller uploads the body whole). Raises when the
        upload failed (it is aborted)."""
        assert self.started, "finish of an upload never started: upload the body whole"
        if self.gave_up:
            return None
        self._size = self._written = size
        early, began = self.sent, self.client.clock.seconds()
        try:
            if self._creating is not None:
                await self._creating
            if self.error is not None:
                raise self.error
            if self.final is not None and self.final != name:
                await self._abort()
                return None
            if self.exists:
                return False
            self._pump()
            await self._all_sent()
            if self.error is not None:
                raise self.error
            assert self._uid is not None
            uid, parts = self._uid, self._ready()
            created = await self.client.complete_multipart(self.key, uid, [self._etags[i] for i in range(1, parts + 1)])
            self._uid = None  # completed (or aborted: already there)
            completed = self.client.clock.seconds()
            if self.final is not None:
                self._log(name, early, began, completed, None)
                return created
            try:
                if await self.client.head(name) is not None:
                    return False
                await self.client.copy(self.temp, name, size)
                self._log(name, early, began, completed, self.client.clock.seconds())
                return True
            finally:
                await self._delete_temp()
        except BaseException:
            await self._abort()
            raise

    def _log(self, name: str, early: int, began: float, completed: float, copied: float | None) -> None:
        copy = "" if copied is None else f", then copied from {self.temp} in {copied - completed:.2f}s"
        log.info("uploaded {name}: {early} of {size} bytes went up while it downloaded; the rest took "
                 "{rest:.2f}s{copy}", name=name, early=early, size=self._size, rest=completed - began, copy=copy)

    async def _delete_temp(self) -> None:
        try:
            await self.client.delete(self.temp)
        except Exception as e:
            log.warn("could not delete the temporary object {key}: {e}", key=self.temp, e=e)

    def abort(self) -> Deferred[None]:
        """Stop: the parts being sent are cut off and the multipart upload is
        aborted, so nothing of this body stays in the bucket (best effort: see
        the sweeper's leftovers pass, sweep.py)."""
        if self.aborted:
            return succeed(None)
        return Deferred.fromCoroutine(self._abort())

    async def _abort(self) -> None:
        self.aborted = True
        self._check_idle()
        running = list(self._running.values())
        for d in running:
            d.cancel()
        if running:
            await DeferredList(running, consumeErrors=True)
        if self._creating is not None and not self._creating.called:
            self._creating.cancel()
            await DeferredList([self._creating], consumeErrors=True)
        uid, self._uid = self._uid, None
        if uid is not None and not await self.client.abort_multipart(self.key, uid):
            self.leftover(self.key, uid)


def upload_error(upload: Any) -> Exception:
    """What a production stopped by its failed upload ends with: a BodyError
    (the engine then caches nothing and cuts its clients off, as for a
    truncated body)."""
    from sparkcache.fetch.flight import BodyError

    e = BodyError(f"the upload to the bucket failed: {upload.error}")
    e.__cause__ = upload.error
    return e


__all__ = ["S3Error", "StreamedUpload", "StreamedUploads", "upload_error"]
