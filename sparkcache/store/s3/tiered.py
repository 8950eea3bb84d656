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

The one exception: the lookup a Range request announced (ranged.py) hands
out an entry whose body is in the bucket but not yet in the tier; its
``serve_hit`` streams the range from the bucket.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from sparkcache.store.index import Entry, Index
from sparkcache.store.ranges import range_wanted
from sparkcache.store.s3.client import S3Unavailable

log = Logger()


class TieredIndex(Index):
    store: Any = None  # set by Store once both exist

    def get(self, key: str) -> Deferred[Entry | None]:
        # Read here, in the caller's context (the coroutine below runs in a copy).
        return Deferred.fromCoroutine(self._ready(key, range_wanted(key)))

    async def _ready(self, key: str, ranged: bool = False) -> Entry | None:
        entry = await Index.get(self, key)
        shared = self.store.shared_index
        if entry is None and shared is not None:
            entry = await shared.lookup(key)
            if entry is not None:  # another host's: ours from now on (unless its body is gone)
                await self.put(entry)
        if entry is None or entry.status != 200 or entry.digest is None:
            return entry
        content = self.store.cas
        gone = False
        try:
            if ranged and not content.contains(entry.digest) and content.writable:
                # A Range request: served by a ranged GET from the bucket (ranged.py)
                # once the object is known to be there; the tier fills meanwhile.
                there = await content.probe(entry.digest, entry.size)
                if there:
                    content.fill_later(entry.digest, entry.size)
                    return entry
                if there is None and not content.writable:
                    return None
                gone = there is False  # then a miss without asking again
            if not gone and await content.ensure(entry.digest, entry.size):
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
