"""The bucket's sweeper: one elected host keeps ``<prefix>cas/`` under a size.

Every host on a bucket and prefix runs the same timer; a lease object picks
the one that sweeps:

``<prefix>sweeper``
  ``{"host", "expires"}``. Absent: created with ``If-None-Match: *`` (a 412
  means another host won). Held by another host and not expired: this host
  does nothing. Ours: renewed (rewritten with a later expiry). Expired:
  taken over (deleted, then created conditionally). After writing, the host
  waits ``settle`` seconds and reads the object back, twice: it sweeps only
  if both name it. On a server that ignores conditional writes two hosts may
  both write; the read-back then shows the last writer to both, and when the
  winner of a contested round (a lease taken within ``settle``) has a larger
  host id than a contender, the contender writes again: the lexically
  smallest host id wins.

Recency comes from cheap hints: each host remembers when it last used each
body (a tier hit, a fill from the bucket, a commit) and, at most every
HINT_INTERVAL seconds and only when something changed, writes them all as one
``<prefix>access/<host>`` document (at most MAX_HINTS digests, the most
recent). That is one small PUT per host per interval whatever the traffic,
where refreshing each published index entry would cost a PUT per entry; the
sweeper reads one document per host. A body's recency is the latest of its
object's LastModified and every host's hint.

Pinned bodies (uploads, pushes: they exist nowhere else) are marked by
``<prefix>pinned/<sha256>`` when committed (published.py) and never swept.
Bodies used or written within ``grace`` seconds are not swept either (an
upload just completed, a fill in flight). A body swept from under a host's
index row is a miss there (content.py: the fill finds 404), and the
``index/`` documents that name it are deleted with it, so no host looks it up
again. Local eviction never deletes bucket objects (content.py ``remove``).

Leftovers. On the same rounds the lease holder also clears what a daemon
killed mid-fetch (or a failed abort) left under ``<prefix>``: multipart
uploads in progress (ListMultipartUploads on the prefix) initiated more than
LEFTOVER_AGE ago are aborted, and ``<prefix>tmp/`` objects (upload.py's
staging copies) and ``<prefix>leases/`` documents (lease.py: a live one is
rewritten every third of its time to live) last written longer ago than that
are deleted, and so are other hosts' ``<prefix>access/`` documents not
written for HINTS_AGE (30 days: a host renamed or retired). Nothing else is
listed, so nothing outside the prefix, and no ``cas/`` or ``pinned/``
object, is touched by it. A server that does not
implement ListMultipartUploads (501), refuses it (400, 405) or does not allow
it (403) is said so once in the log and not asked again; the rest goes on (a
bucket lifecycle rule can take the uploads there, docs/s3.rst). Any other
failure to list them is passing: the rest goes on, the next round asks again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import quote

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger

from sparkcache.store.s3.client import S3Client, S3Error

log = Logger()

FORMAT = 1
HINT_INTERVAL = 60.0
MAX_HINTS = 50_000  # ~4 MiB of JSON at most: one host's hint document stays small
GRACE = 600.0
SETTLE = 1.0
PARALLEL = 8  # index documents read / objects deleted at once
# Multipart uploads, temporary objects and leases older than this are a dead
# daemon's: a generous day (the longest fetch of a body, its upload included, is far shorter).
LEFTOVER_AGE = 86400.0
# Another host's access hints that it has not rewritten for this long are
# removed: a host renamed or retired for good. (A host rewrites its document
# whenever it uses a body; one idle that long has hints older than that, and
# its bodies then rank by their upload time instead, which is no later.)
HINTS_AGE = 30 * 86400.0
_HEX = frozenset("0123456789abcdef")


# Answers to ListMultipartUploads that say it will not be answered: not
# implemented (501, or NotImplemented under another status), refused as a bad
# or unknown request (400, 405: some S3-compatible servers), or not allowed
# for these credentials (403: s3:ListBucketMultipartUploads). Asked again
# after a restart; every round, they only filled the log and, raised, kept
# the temporary objects and leases from going.
NO_UPLOAD_LISTING = frozenset({400, 403, 405, 501})


def default_host_id(data_dir: str) -> str:
    """The host name, plus a hash of the data directory (two daemons on one host differ)."""
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:64] or "host"
    return f"{name}-{hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:8]}"


def _is_digest(s: str) -> bool:
    return len(s) == 64 and all(c in _HEX for c in s)


class LeaseObject:
    """A lease held in one small object (generic: a name, a host id, a duration)."""

    def __init__(self, client: S3Client, name: str, host: str, duration: float, clock: Any,
                 settle: float = SETTLE) -> None:
        self.client = client
        self.name = name
        self.host = host
        self.duration = duration
        self.clock = clock
        self.settle = settle

    async def _read(self) -> dict[str, Any] | None:
        raw = await self.client.get_bytes(self.name, 4096)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            return {"host": str(doc["host"]), "expires": float(doc["expires"]), "taken": float(doc.get("taken", 0))}
        except (ValueError, KeyError, TypeError):
            return {"host": "", "expires": 0.0, "taken": 0.0}  # unreadable: as if expired

    async def _write(self, taken: float, conditional: bool) -> bool:
        now = self.clock.seconds()
        doc = {"host": self.host, "expires": now + self.duration, "taken": taken}
        return await self.client.put_bytes(self.name, json.dumps(doc).encode(), if_none_match=conditional,
                                           content_type="application/json")

    async def _settle(self) -> None:
        if self.settle > 0:
            await deferLater(self.clock, self.settle, lambda: None)

    async def hold(self) -> bool:
        """Whether this host holds the lease now (taking or renewing it if it may)."""
        now = self.clock.seconds()
        doc = await self._read()
        if doc is not None and doc["host"] != self.host and doc["expires"] > now:
            return False
        if doc is None:
            if not await self._write(now, conditional=True):
                return False  # another host created it first
        elif doc["host"] == self.host:
            await self._write(doc["taken"], conditional=False)  # renewal
        else:  # expired: take it over
            await self.client.delete(self.name)
            if not await self._write(now, conditional=True):
                return False
        # Read back twice: a contender that overwrites after our first look is seen.
        seen = 0
        for _ in range(4):
            await self._settle()
            back = await self._read()
            if back is None:
                return False
            if back["host"] == self.host:
                seen += 1
                if seen == 2:
                    return True
                continue
            contested = back["expires"] > self.clock.seconds() and back["taken"] >= now - self.settle
            if not (contested and self.host < back["host"]):
                return False
            # A server that ignores conditions let both write: the smaller id wins.
            await self._write(now, conditional=False)
            seen = 0
        return False

    async def release(self) -> None:
        doc = await self._read()
        if doc is not None and doc["host"] == self.host:
            await self.client.delete(self.name)


class AccessHints:
    """When this host last used each body, published as ``<prefix>access/<host>``."""

    def __init__(self, client: S3Client, prefix: str, host: str, clock: Any, limit: int = MAX_HINTS) -> None:
        self.client = client
        self.name = f"{prefix}access/{host}"
        self.clock = clock
        self.limit = limit
        self.used: dict[str, float] = {}
        self._changed = False
        self._loaded = False
        self.writes = 0
        self.retry: Callable[[], Any] | None = None  # pinned markers that failed before

    def note(self, digest: str, at: float | None = None) -> None:
        """Called by the content store (reactor or I/O pool: a dict store is atomic);
        ``at``: when it was used (another worker's use, read from the tier's ledger), else now."""
        at = self.clock.seconds() if at is None else at
        if self.used.get(digest, 0.0) < at:
            self.used[digest] = at
            self._changed = True

    async def flush(self) -> None:
        if self.retry is not None:
            await self.retry()
        if not self._changed:
            return
        if not self._loaded:  # what this host said before a restart still counts
            self._loaded = True
            try:
                raw = await self.client.get_bytes(self.name, 16 * 2**20)
                old = json.loads(raw).get("used", {}) if raw else {}
                for digest, at in old.items():
                    self.used.setdefault(str(digest), float(at))
            except (S3Error, ValueError, TypeError, AttributeError) as e:
                log.debug("could not read this host's earlier access hints: {e}", e=e)
        self._changed = False
        used = dict(self.used)
        if len(used) > self.limit:  # keep the most recent
            used = dict(sorted(used.items(), key=lambda kv: kv[1])[-self.limit:])
            self.used = used
        try:
            await self.client.put_bytes(self.name, json.dumps({"format": FORMAT, "used": used}).encode(),
                                        content_type="application/json")
            self.writes += 1
        except S3Error as e:
            self._changed = True
            log.debug("could not publish access hints: {e}", e=e)


@dataclass
class SweepReport:
    total: int = 0
    objects: int = 0
    chosen: list[str] = field(default_factory=list)  # least recently used first
    deleted: list[str] = field(default_factory=list)  # as the deletions completed
    freed: int = 0
    index_deleted: int = 0
    pinned_kept: int = 0
    uploads_aborted: int = 0  # leftovers: multipart uploads in progress older than LEFTOVER_AGE
    leftovers_deleted: int = 0  # leftovers: ``tmp/`` objects and ``leases/`` documents
    hints_deleted: int = 0  # ``access/`` documents of other hosts not written for HINTS_AGE


class Sweeper:
    def __init__(self, client: S3Client, prefix: str, host: str, max_size: int, clock: Any,
                 lease_duration: float, grace: float = GRACE, settle: float = SETTLE,
                 hints: AccessHints | None = None, leftover_age: float = LEFTOVER_AGE,
                 hints_age: float = HINTS_AGE) -> None:
        self.client = client
        self.prefix = prefix
        self.max_size = max_size
        self.clock = clock
        self.grace = grace
        self.leftover_age = leftover_age
        self.hints_age = hints_age
        self.lists_uploads = True  # False once the server said it does not implement ListMultipartUploads
        self.hints = hints
        self.lease = LeaseObject(client, f"{prefix}sweeper", host, lease_duration, clock, settle)
        # index document name → (ETag, digest): documents are read again only when they change.
        self._refs: dict[str, tuple[str | None, str | None]] = {}
        self.sweeps = 0
        self.last: SweepReport | None = None

    async def tick(self) -> SweepReport | None:
        """One round: None when another host holds the lease."""
        try:
            if self.hints is not None:
                await self.hints.flush()  # ours first, so that this sweep sees them
            if not await self.lease.hold():
                return None
            report = await self.sweep()
        except S3Error as e:  # the bucket down or refusing: next round (no traceback every interval)
            log.warn("sweeper: {e}; trying again in the next round", e=e)
            return None
        try:
            await self.leftovers(report)
        except S3Error as e:  # (the sweep itself is done: its report stands)
            log.warn("sweeper: clearing leftovers: {e}; trying again in the next round", e=e)
        self.sweeps += 1
        self.last = report
        return report

    async def sweep(self) -> SweepReport:
        cas = f"{self.prefix}cas/"
        objects = [o async for o in self.client.list(cas) if _is_digest(o.key[len(cas):])]
        report = SweepReport(total=sum(o.size for o in objects), objects=len(objects))
        if report.total <= self.max_size:
            return report
        pinned = {o.key.rsplit("/", 1)[-1] async for o in self.client.list(f"{self.prefix}pinned/")}
        used = await self._hints()
        now = self.clock.seconds()
        ranked = []
        for o in objects:
            digest = o.key[len(cas):]
            if digest in pinned:
                report.pinned_kept += 1
                continue
            # A host's hint is exact (it notes the commit that follows the upload,
            # and every use); LastModified only stands in where no host said.
            # (LastModified is given to the second, rounded down: the end of that second.)
            at = used.get(digest) or (o.last_modified + 1.0 if o.last_modified is not None else now)
            if at > now - self.grace:
                continue  # just written or just used
            ranked.append((at, digest, o.size))
        ranked.sort()
        total, victims = report.total, []
        for _, digest, size in ranked:
            if total <= self.max_size:
                break
            victims.append((digest, size))
            total -= size
        report.chosen = [d for d, _ in victims]
        if not victims:
            return report
        refs = await self._index_refs()
        limit = DeferredSemaphore(PARALLEL)

        async def drop(digest: str, size: int) -> None:
            try:
                for name in refs.get(digest, ()):  # first the entries, so no host looks it up again
                    await self.client.delete(name)
                    self._refs.pop(name, None)
                    report.index_deleted += 1
                await self.client.delete(cas + digest)
            except S3Error as e:
                log.warn("sweeper: could not delete sha256:{digest}: {e}", digest=digest, e=e)
                return
            report.deleted.append(digest)
            report.freed += size

        await gatherResults([limit.run(_start, drop, d, s) for d, s in victims], consumeErrors=True)
        log.info("sweeper: bucket at {total} bytes of {max}: deleted {n} bodies ({freed} bytes), {i} index entries",
                 total=report.total, max=self.max_size, n=len(report.deleted), freed=report.freed,
                 i=report.index_deleted)
        return report

    async def leftovers(self, report: SweepReport) -> None:
        """Abort the multipart uploads and delete the ``tmp/`` objects and
        ``leases/`` documents under our prefix older than ``leftover_age``."""
        cutoff = self.clock.seconds() - self.leftover_age
        if self.lists_uploads:
            try:
                async for up in self.client.list_uploads(self.prefix):
                    # (a server that ignored the prefix lists other people's uploads: never theirs;
                    # dates are given to the second, rounded down: the end of that second counts)
                    if not up.key.startswith(self.prefix) or up.initiated is None or up.initiated + 1.0 > cutoff:
                        continue
                    if await self.client.abort_multipart(up.key, quote(up.upload_id, safe="-_.~")):
                        report.uploads_aborted += 1
            except S3Error as e:
                if e.status in NO_UPLOAD_LISTING or e.code == "NotImplemented":
                    self.lists_uploads = False
                    log.warn("sweeper: the bucket's server does not list multipart uploads for us ({e}): "
                             "incomplete uploads are left to a lifecycle rule (docs/s3.rst)", e=e)
                else:  # (passing: the temporary objects and leases still go, and the next round asks again)
                    log.warn("sweeper: listing multipart uploads: {e}; trying again in the next round", e=e)
        for folder in ("tmp/", "leases/"):
            for key in await self._older(folder, cutoff):
                await self.client.delete(key)
                report.leftovers_deleted += 1
        mine = self.hints.name if self.hints is not None else None
        for key in await self._older("access/", self.clock.seconds() - self.hints_age):
            if key != mine:
                await self.client.delete(key)
                report.hints_deleted += 1
        if report.uploads_aborted or report.leftovers_deleted or report.hints_deleted:
            log.info("sweeper: aborted {u} multipart upload(s) and deleted {o} temporary object(s) or lease(s) "
                     "left for over {age:.0f}s, and {h} access hint document(s) of hosts silent for over "
                     "{hage:.0f}s", u=report.uploads_aborted, o=report.leftovers_deleted, age=self.leftover_age,
                     h=report.hints_deleted, hage=self.hints_age)

    async def _older(self, folder: str, cutoff: float) -> list[str]:
        """Keys under ``<prefix><folder>`` last written before ``cutoff``."""
        where = self.prefix + folder
        # (Dates are given to the second, rounded down: the end of that second counts.)
        return [o.key async for o in self.client.list(where)
                if o.key.startswith(where) and o.last_modified is not None and o.last_modified + 1.0 <= cutoff]

    async def _hints(self) -> dict[str, float]:
        used: dict[str, float] = {}
        async for o in self.client.list(f"{self.prefix}access/"):
            try:
                raw = await self.client.get_bytes(o.key, 16 * 2**20)
                doc = json.loads(raw) if raw else {}
                items = doc.get("used", {}).items() if doc.get("format") == FORMAT else ()
                for digest, at in items:
                    used[str(digest)] = max(used.get(str(digest), 0.0), float(at))
            except (S3Error, ValueError, TypeError, AttributeError) as e:
                log.debug("sweeper: ignoring access hints {key}: {e}", key=o.key, e=e)
        return used

    async def _index_refs(self) -> dict[str, list[str]]:
        """digest → the ``index/`` documents naming it (documents read once per ETag)."""
        listed = [o async for o in self.client.list(f"{self.prefix}index/")]
        names = {o.key for o in listed}
        for gone in set(self._refs) - names:
            del self._refs[gone]
        stale = [o for o in listed if o.key not in self._refs or self._refs[o.key][0] != o.etag]
        limit = DeferredSemaphore(PARALLEL)

        async def read(name: str, etag: str | None) -> None:
            try:
                raw = await self.client.get_bytes(name, 1 << 20)
                digest = str(json.loads(raw)["digest"]) if raw else None
            except (S3Error, ValueError, KeyError, TypeError):
                digest = None
            self._refs[name] = (etag, digest)

        await gatherResults([limit.run(_start, read, o.key, o.etag) for o in stale], consumeErrors=True)
        out: dict[str, list[str]] = {}
        for name, (_, digest) in self._refs.items():
            if digest is not None:
                out.setdefault(digest, []).append(name)
        return out


def _start(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(fn(*args))


def timers(content: Any, storage: Any) -> list[tuple[str, float, Callable[[], Any]]]:
    """The primary process's timers for a content store on a bucket: the access
    hints' flush and, with ``storage.s3.sweep``, the sweeper."""
    settings = content.client.settings
    if content.shared_index is None:  # it writes the pinned markers the sweeper obeys
        if settings.sweep:
            log.warn("storage.s3.sweep needs storage.s3.share_index: the bucket is not swept by this host")
        return []
    host = settings.host_id or default_host_id(storage.data_dir)
    hints = AccessHints(content.client, content.prefix, host, content.clock)
    hints.retry = content.shared_index.retry_pins
    content.hints = hints
    out: list[tuple[str, float, Callable[[], Any]]] = [("s3-access-hints", HINT_INTERVAL, hints.flush)]
    if settings.sweep:  # a host out of the election still says what it uses
        max_size = settings.max_size if settings.max_size is not None else storage.max_size
        sweeper = Sweeper(content.client, content.prefix, host, max_size, content.clock,
                          lease_duration=max(3 * settings.sweep_interval, 60.0), grace=settings.sweep_grace,
                          hints=hints, leftover_age=max(LEFTOVER_AGE, 3 * settings.lease_ttl))
        content.sweeper = sweeper
        out.append(("s3-sweep", settings.sweep_interval, sweeper.tick))
    return out
