"""Index entries shared through the bucket: a key fetched by one host is a hit on all.

An immutable cached entry (no expiry; not an upload) is published when it is
committed, as ``<prefix>index/<sha256(key)>``: a small JSON document with
its digest, size and headers (entries of one key are interchangeable, so a
later one simply replaces it). A host that has no row
for a key looks there before it counts the key as a miss, and takes the
entry as its own (its body then comes from the bucket into its tier).

Purges reach the other hosts: purging a key deletes its document; purging a
remote (or everything) writes ``<prefix>purged/<sha256(remote)>`` (``purged/_all``)
with the time, and a document fetched before it is ignored. Those markers
are read at most every MARKER_TTL seconds.

Mutable entries are not shared: each host revalidates its own.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from twisted.logger import Logger

from sparkcache.store.index import Entry
from sparkcache.store.s3.client import S3Client, S3Error, S3Unavailable

log = Logger()

FORMAT = 1
MAX_DOC = 1 << 20
MARKER_TTL = 5.0
ALL = None  # the marker of a purge of everything


class SharedIndex:
    def __init__(self, client: S3Client, prefix: str, clock: Any, health: Any = None) -> None:
        """``health``: the content store (``writable``, ``note_down``), so that
        lookups skip a bucket known to be down instead of waiting for retries."""
        self.client = client
        self.health = health
        self.prefix = prefix
        self.clock = clock
        self._markers: dict[str | None, tuple[float, float]] = {}  # remote → (read at, purged at)
        self.published = 0
        self.found = 0
        self.pins_pending: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}index/{hashlib.sha256(key.encode()).hexdigest()}"

    def marker(self, remote: str | None) -> str:
        # Hashed: a remote's name may hold characters an object name should not.
        return f"{self.prefix}purged/" + ("_all" if remote is None else hashlib.sha256(remote.encode()).hexdigest())

    @staticmethod
    def shareable(entry: Entry) -> bool:
        return entry.status == 200 and entry.digest is not None and entry.expires is None and not entry.local

    async def publish(self, entry: Entry) -> None:
        """Best effort: a host that cannot publish still serves its own entry."""
        if entry.pinned and entry.digest is not None:
            await self.mark_pinned(entry.digest)
        if not self.shareable(entry):
            return
        doc = {"format": FORMAT, "key": entry.key, "remote": entry.remote, "path": entry.path,
               "digest": entry.digest, "size": entry.size, "content_type": entry.content_type,
               "headers": entry.headers, "etag": entry.etag, "last_modified": entry.last_modified,
               "fetched": entry.fetched}
        try:
            # Unconditional: a document older than a purge marker must be replaced.
            await self.client.put_bytes(self.name(entry.key), json.dumps(doc).encode(),
                                        content_type="application/json")
            self.published += 1
        except S3Error as e:
            log.warn("could not publish the index entry of {key}: {e}", key=entry.key, e=e)

    async def mark_pinned(self, digest: str) -> None:
        """``<prefix>pinned/<sha256>``: the bucket's sweeper never deletes this body (sweep.py)."""
        try:
            await self.client.put_bytes(f"{self.prefix}pinned/{digest}", b"", if_none_match=True)
            self.pins_pending.discard(digest)
        except S3Error as e:
            self.pins_pending.add(digest)  # retried by retry_pins (the sweeper's hint timer)
            log.warn("could not mark sha256:{digest} pinned in the bucket: {e}", digest=digest, e=e)

    async def retry_pins(self) -> None:
        for digest in sorted(self.pins_pending):
            await self.mark_pinned(digest)

    async def lookup(self, key: str) -> Entry | None:
        """The entry another host published for ``key`` (None: none, or purged since)."""
        if self.health is not None and not self.health.writable:
            return None
        try:
            raw = await self.client.get_bytes(self.name(key), MAX_DOC)
        except S3Error as e:
            if isinstance(e, S3Unavailable) and self.health is not None:
                self.health.note_down(e)
            log.debug("shared index lookup of {key} failed: {e}", key=key, e=e)
            return None
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT or doc.get("key") != key:
                return None
            digest, size = str(doc["digest"]), int(doc["size"])
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or size < 0:
                return None
            fetched = float(doc.get("fetched") or 0.0)
            remote = str(doc["remote"])
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warn("ignoring a malformed shared index entry for {key}", key=key)
            return None
        if fetched <= await self.purged_at(remote):
            return None
        now = self.clock.seconds()
        headers = doc.get("headers") if isinstance(doc.get("headers"), dict) else {}
        self.found += 1
        return Entry(key=key, remote=remote, path=str(doc.get("path") or ""), status=200, digest=digest, size=size,
                     content_type=doc.get("content_type"), headers={str(k): str(v) for k, v in headers.items()},
                     fetched=now, expires=None, etag=doc.get("etag"), last_modified=doc.get("last_modified"),
                     last_access=now)

    async def purged_at(self, remote: str) -> float:
        return max(await self._marker(remote), await self._marker(ALL))

    async def _marker(self, remote: str | None) -> float:
        now = self.clock.seconds()
        cached = self._markers.get(remote)
        if cached is not None and now - cached[0] < MARKER_TTL:
            return cached[1]
        try:
            raw = await self.client.get_bytes(self.marker(remote), 4096)
            at = float(json.loads(raw)["at"]) if raw else 0.0
        except (S3Error, ValueError, KeyError, TypeError):
            at = cached[1] if cached is not None else 0.0
        self._markers[remote] = (now, at)
        return at

    async def forget_key(self, key: str) -> None:
        try:
            await self.client.delete(self.name(key))
        except S3Error as e:
            log.warn("could not remove the shared index entry of {key}: {e}", key=key, e=e)

    async def forget_remote(self, remote: str | None) -> None:
        """Entries of ``remote`` (None: every remote) published until now are ignored by every host."""
        now = self.clock.seconds()
        try:
            await self.client.put_bytes(self.marker(remote), json.dumps({"at": now}).encode(),
                                        content_type="application/json")
            self._markers[remote] = (now, now)
        except S3Error as e:
            log.warn("could not record the purge of {remote} in the bucket: {e}", remote=remote or "everything", e=e)
