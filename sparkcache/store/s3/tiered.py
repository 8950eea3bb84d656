"""The index of a store whose bodies live in a bucket: an entry is handed out
only once its body is in the local tier.

Serving opens bodies synchronously (``Store.open_range`` on the reactor), so
the tier must hold a body before anyone is told "hit": ``get`` brings it from
the bucket first (once per body, see S3ContentStore.ensure). When the bucket
does not have it (deleted behind our back, corrupt) the row goes and the key
is a miss; when the bucket cannot be reached the key is a miss for now (the
store is not writable then, so it passes through) and the row stays.
``peek`` answers only what the tier holds, for the same reason.

With a SharedIndex (published.py), a key this host never fetched is looked
up in the bucket before it counts as a miss.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from sparkcache.store.index import Entry, Index
from sparkcache.store.s3.client import S3Unavailable

log = Logger()


class TieredIndex(Index):
    store: Any = None  # set by Store once both exist

    def get(self, key: str) -> Deferred[Entry | None]:
        return Deferred.fromCoroutine(self._ready(key))

    async def _ready(self, key: str) -> Entry | None:
        entry = await Index.get(self, key)
        shared = self.store.shared_index
        if entry is None and shared is not None:
            entry = await shared.lookup(key)
            if entry is not None:  # another host's: ours from now on (unless its body is gone)
                await self.put(entry)
        if entry is None or entry.status != 200 or entry.digest is None:
            return entry
        content = self.store.cas
        try:
            if await content.ensure(entry.digest, entry.size):
                return entry
        except S3Unavailable:
            return None
        except Exception:
            log.failure("bringing sha256:{digest} from the bucket", digest=entry.digest)
            return None
        # Gone from the bucket: forget it, so the next production fetches it again.
        current = Index.peek(self, key)
        if current is None or current.digest == entry.digest:
            if shared is not None:
                await shared.forget_key(key)
            await self.store.purge_key(key)
        return None

    def peek(self, key: str) -> Entry | None:
        entry = Index.peek(self, key)
        if entry is not None and entry.status == 200 and entry.digest is not None \
                and not self.store.cas.contains(entry.digest):
            return None
        return entry
