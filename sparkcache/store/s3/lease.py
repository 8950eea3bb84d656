"""The cross-host lease: one upstream fetch of a key for every host on a bucket.

Several daemons on one bucket each keep one production per key (the engine's
Singleflight, and fetch/across.py between worker processes), so without more
a key asked on N hosts at once is fetched N times. Before it fetches an
immutable key (the kind the bucket's index shares, published.py) a host takes
``<prefix>leases/<sha256(key)>`` with a conditional ``PUT`` (``If-None-Match:
*``): a small JSON document naming the holder and its expiry.

- The winner fetches as usual; the lease is renewed every third of its time
  to live while the production runs (``If-Match`` on its own ETag: a lease
  taken over meanwhile is not written back) and deleted when the production
  ends, after the entry was published, stored or not.
- A host that finds a live lease waits: it polls (with backoff) for the
  entry the holder publishes in ``index/`` and serves it as a hit from the
  bucket, through its tier. A lease gone without an entry (the holder failed,
  or its answer was not a cacheable 200) is taken again; an expired one (the
  holder died) is taken over with a ``PUT`` conditional on the ETag read
  (``If-Match``), so one waiter wins.
- A server that ignores the conditions answers every ``PUT`` 200: every host
  believes it holds the lease and fetches once itself, as with no lease (at
  most one upstream fetch per host). A bucket that cannot be reached gives an
  inert lease: the host goes on alone rather than wait.

With ``storage.s3.peer_url`` the lease also says where its holder can be
reached, and a host that lost the lease streams the body from the holder
while it downloads (fetch/peer.py, web/peer.py) instead of waiting for it.

Expiries are wall-clock times written by one host and read by another: keep
the hosts' clocks in sync (NTP), as for purge markers.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar, Union

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from sparkcache.store.s3.bodies import BytesProducer
from sparkcache.store.s3.client import S3Client, S3Error, S3Unavailable, _discard, _header, _small_body

log = Logger()


def key_hash(key: str) -> str:
    """How a key is named outside this host: its lease object, a peer's request."""
    return hashlib.sha256(key.encode()).hexdigest()

FORMAT = 1
MAX_DOC = 4096
# Waiting for another host's production: the first poll, doubled up to the last.
POLL_FIRST = 0.05
POLL_MAX = 1.0

T = TypeVar("T")


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    host: str
    expires: float
    etag: str | None
    peer: str | None = None  # where the holder serves its flight (storage.s3.peer_url)


class Lease:
    """A lease held by this host (or an inert one: the bucket could not be
    asked); renewed until ``release``."""

    def __init__(self, leases: "Leases", key: str, etag: str | None, inert: bool = False) -> None:
        self.leases = leases
        self.key = key
        self.etag = etag
        self.inert = inert
        self.lost = False
        self._timer: Any = None
        self._released = False
        if not inert:
            leases.held[key_hash(key)] = self
            self._schedule()

    def _schedule(self) -> None:
        self._timer = self.leases.clock.callLater(self.leases.ttl / 3, self._renew)

    def _renew(self) -> None:
        self._timer = None
        ensureDeferred(self._renew_now())

    async def _renew_now(self) -> None:
        if self._released:
            return
        try:
            ok, etag = await self.leases.put_if_match(self.key, self.etag)
        except S3Error as e:
            log.warn("could not renew the lease of {key}: {e}", key=self.key, e=e)
            ok, etag = True, self.etag  # try again next time: it has not expired yet
        if self._released:
            return
        if not ok:  # taken over (we were too slow to renew): the new holder's now
            log.warn("lost the lease of {key} to another host", key=self.key)
            self.lost = True
            self.leases.count("lost")
            return
        self.etag = etag or self.etag
        self._schedule()

    async def release(self) -> None:
        """Ends the lease (after the entry was published, or instead of it)."""
        if self._released:
            return
        self._released = True
        if self.leases.held.get(key_hash(self.key)) is self:
            del self.leases.held[key_hash(self.key)]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.inert or self.lost:
            return
        try:
            await self.leases.client.delete(self.leases.name(self.key))
        except S3Error as e:  # it expires by itself
            log.warn("could not remove the lease of {key}: {e}", key=self.key, e=e)


class Leases:
    def __init__(self, client: S3Client, prefix: str, clock: Any, ttl: float, health: Any = None) -> None:
        """``health``: the content store (``writable``, ``note_down``)."""
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self.ttl = ttl
        self.health = health
        self.me = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(6).hex()}"
        self.taken = 0  # leases this host won (fresh or taken over)
        self.waited = 0  # productions that waited for another host's
        self.bare_etags = False  # the server matches If-Match on the unquoted ETag only
        settings = getattr(client, "settings", None)
        # Peer streaming: where this host serves its flights, and what signs the requests.
        self.peer_url: str | None = getattr(settings, "peer_url", None)
        self.peer_key: bytes = getattr(settings, "peer_key", b"")
        self.peer_client: Any = None  # made by fetch/peer.py when first needed
        self.streamed = 0  # productions served from another host's flight
        # The leases this host holds now, by sha256 of their key (what a peer asks for).
        self.held: dict[str, Lease] = {}
        # Told of each event (taken, taken_over, waited, lost, inert): Metrics.lease,
        # set by the engine (fetch/peer.py) before it takes the first lease.
        self.count: Callable[[str], None] = lambda outcome: None

    def name(self, key: str) -> str:
        return f"{self.prefix}leases/{key_hash(key)}"

    async def put(self, key: str, condition: dict[str, str]) -> tuple[bool, str | None]:
        """Write our lease document under ``condition``: (written, its ETag)."""
        fields: dict[str, Any] = {"format": FORMAT, "key": key, "owner": self.me, "host": socket.gethostname(),
                                  "expires": self.clock.seconds() + self.ttl}
        if self.peer_url:
            fields["peer"] = self.peer_url
        doc = json.dumps(fields).encode()
        headers = {"Content-Type": "application/json", **condition}
        response, _ = await self.client.request(
            "PUT", self.name(key), headers=headers, body=lambda: BytesProducer(doc),
            payload_hash=hashlib.sha256(doc).hexdigest(), expect=(412, 409))
        if response.code != 200:
            return False, None
        await _discard(response)
        return True, _header(response, b"etag")

    async def put_if_match(self, key: str, etag: str | None) -> tuple[bool, str | None]:
        """``put`` on condition that the lease still has ``etag`` (none: unconditional).

        Ceph RGW (16) compares ``If-Match`` with the ETag it stored, without
        quotes, so the quoted form its ETag header gives never matches there:
        a 412 on the quoted form is tried again unquoted, and once that
        matched the unquoted form goes first. SeaweedFS and moto take both."""
        if not etag:
            return await self.put(key, {})
        bare = etag.strip('"')
        forms = [etag] if bare == etag else ([bare, etag] if self.bare_etags else [etag, bare])
        for form in forms:
            ok, new = await self.put(key, {"If-Match": form})
            if ok:
                self.bare_etags = form == bare and bare != etag
                return ok, new
        return False, None

    async def read(self, key: str) -> LeaseInfo | None:
        """The lease on ``key`` now (None: none). A malformed one counts as expired."""
        response, _ = await self.client.request("GET", self.name(key), expect=(404,))
        if response.code == 404:
            return None
        etag = _header(response, b"etag")
        raw = await _small_body(response, MAX_DOC)
        try:
            doc = json.loads(raw)
            peer = doc.get("peer")
            return LeaseInfo(str(doc["owner"]), str(doc.get("host", "")), float(doc["expires"]), etag,
                             peer if isinstance(peer, str) and peer else None)
        except (ValueError, KeyError, TypeError):
            return LeaseInfo("", "", 0.0, etag)

    async def acquire(self, key: str) -> Lease | None:
        """The lease on ``key`` if nobody holds it (None: another host does)."""
        try:
            ok, etag = await self.put(key, {"If-None-Match": "*"})
        except S3Error as e:
            return self._inert(key, e)
        if not ok:
            return None
        self.taken += 1
        self.count("taken")
        return Lease(self, key, etag)

    async def take_over(self, key: str, info: LeaseInfo) -> Lease | None:
        """An expired lease, unless another host took it over first."""
        try:
            ok, etag = await self.put_if_match(key, info.etag)
        except S3Error as e:
            return self._inert(key, e)
        if not ok:
            return None
        log.info("took over the expired lease of {key} (held by {host})", key=key, host=info.host or "?")
        self.taken += 1
        self.count("taken_over")
        return Lease(self, key, etag)

    def _inert(self, key: str, e: S3Error) -> Lease:
        if isinstance(e, S3Unavailable) and self.health is not None:
            self.health.note_down(e)
        log.warn("could not take the lease of {key} ({e}); fetching without it", key=key, e=e)
        self.count("inert")
        return Lease(self, key, None, inert=True)

    async def wait(self, key: str, found: Callable[[], Awaitable[T | None]],
                   holder: Callable[[LeaseInfo], Awaitable[Any]] | None = None) -> Union[Lease, T]:
        """The lease on ``key``, or what ``found()`` answers once another
        host's production ended (its entry, published in the bucket).
        ``holder``: told once, right after the lease was lost, who holds it
        (when its lease names a peer address), before the polls begin."""
        lease = await self.acquire(key)
        if lease is not None:
            return lease
        self.waited += 1
        self.count("waited")
        if holder is not None:
            try:
                info = await self.read(key)
            except S3Error as e:
                return self._inert(key, e)
            if info is not None and info.peer and info.owner != self.me and info.expires > self.clock.seconds():
                await holder(info)
        delay = POLL_FIRST
        while True:
            await deferLater(self.clock, delay, lambda: None)
            delay = min(delay * 2, POLL_MAX)
            outcome = await found()
            if outcome is not None:
                return outcome
            try:
                info = await self.read(key)
            except S3Error as e:
                return self._inert(key, e)
            if info is None:  # released without an entry (or just now with one: found() says next)
                outcome = await found()
                if outcome is not None:
                    return outcome
                lease = await self.acquire(key)
            elif info.expires <= self.clock.seconds():
                lease = await self.take_over(key, info)
            if lease is not None:
                return lease
