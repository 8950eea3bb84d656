"""Peer streaming: a host that lost a key's lease serves the holder's download as it arrives.

Several daemons on one bucket take a lease before an upstream fetch
(store/s3/lease.py): one host fetches, the others wait. Without more, a
waiting host's clients get their first byte only once the holder has
downloaded, uploaded and published the entry. With ``storage.s3.peer_url``
the holder writes that address into its lease, and a host whose lease
attempt lost asks the holder for the body in flight
(``GET <peer>/_peer/flight/<sha256 of the key>``, served by web/peer.py from
the holder's spool exactly as the holder's own clients get it):

- 200: the bytes go into a local spool of this host (a Flight), which every
  client of the key on this host tails at its own pace, as a local miss;
  they see ``X-Cache: MISS``. A body with a digest to match arrives from the
  holder only once the holder verified it (it holds back the last byte until
  its commit), so its end here is already checked.
- 404 (no flight there: not started, already committed, a pass-through), a
  refusal, or a holder that cannot be reached: the host waits for the
  published entry as before, nothing lost.
- The stream breaking off (the holder died, its upstream broke off): this
  host's clients are aborted at once (never a clean short end), and the key
  is free again here: the next request waits for (or takes over) the lease.

With worker processes, the worker that streams announces its spool in its
flight marker (fetch/xlock.py), so the other workers' clients of the key
tail it as they tail a download (and are cut off with it); on the holder, a
peer request that reaches a worker other than the one holding the lease
tails the holder's spool the same way (web/peer.py).

What was streamed is never committed as this host's own entry: the flight
ends once the holder's published entry reaches this host through the shared
index, and only if that entry's length and sha256 are those of the bytes
streamed. Once the whole stream is here the waiter looks the entry up in the
bucket's index first (``keep``): when it is published (the holder's commit:
its object uploaded before) and names the bytes streamed, the spool goes into
this host's tier (S3ContentStore.keep_streamed, which checks the spool's own
hash once more), so the entry's fill finds it there and does not GET the
body from the bucket again. So a peer never places a body here that does not
match what its host published in the bucket; a body that matches nothing
published is discarded with its spool.

Requests are signed (``X-Sparkcache-Peer: <time>:<hex>``, an HMAC-SHA256 over
the method, the path and the time, keyed with ``storage.s3`` ``peer_key``:
derived from the S3 secret key every host on the bucket has, or a secret of
their own), so the endpoint is no open proxy to bodies in flight.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import TYPE_CHECKING, Any, Callable, Union
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from sparkcache.fetch.flight import BodyError, Flight, Lanes, receive
from sparkcache.fetch.produce import Shared
from sparkcache.fetch.upstream import discard_body
from sparkcache.fetch.xlock import Held, Marker

if TYPE_CHECKING:
    from sparkcache.fetch.cache import Cache, Result, Target
    from sparkcache.store.s3.lease import Lease, LeaseInfo

log = Logger()

FLIGHT_PATH = "/_peer/flight/"
AUTH_HEADER = b"X-Sparkcache-Peer"
HEADERS_HEADER = b"X-Sparkcache-Peer-Headers"
# How far a request's time may be from ours: the hosts keep their clocks in sync (NTP).
SKEW = 120.0
CONNECT_TIMEOUT = 5.0
MAX_HEADERS = 16 << 10


# -- the token ---------------------------------------------------------------------------


def _mac(key: bytes, method: bytes, path: bytes, stamp: bytes) -> str:
    return hmac.new(key, b"\n".join((b"sparkcache-peer-1", method, path, stamp)), hashlib.sha256).hexdigest()


def sign(key: bytes, method: bytes, path: bytes, now: float) -> bytes:
    """The value of ``X-Sparkcache-Peer`` for a request of ``method`` on ``path`` (no query) at ``now``."""
    stamp = str(int(now)).encode()
    return stamp + b":" + _mac(key, method, path, stamp).encode()


def refusal(key: bytes, method: bytes, path: bytes, token: bytes | None, now: float) -> str | None:
    """Why a peer request carrying ``token`` is refused (None: it is not)."""
    if not key:
        return "peer streaming is not enabled here"
    if not token:
        return "no peer token"
    stamp, _, mac = token.partition(b":")
    if not stamp.isdigit() or len(stamp) > 12 or len(mac) != 64:
        return "malformed peer token"
    if abs(int(stamp) - now) > SKEW:
        return "peer token out of date (are the hosts' clocks in sync?)"
    if not hmac.compare_digest(mac, _mac(key, method, path, stamp).encode()):
        return "bad peer token"
    return None


# -- the waiting host's side ---------------------------------------------------------------


class PeerClient:
    """The Agent that asks holders for their flights: one connection per
    stream (streams are long and few), a short connect timeout (an
    unreachable holder means waiting as before, soon)."""

    def __init__(self, reactor: Any) -> None:
        self.agent = Agent(reactor, connectTimeout=CONNECT_TIMEOUT, pool=HTTPConnectionPool(reactor, persistent=False))


def _client(cache: "Cache") -> PeerClient:
    leases = cache.store.leases
    if leases.peer_client is None:
        leases.peer_client = PeerClient(cache.store.reactor)
    client: PeerClient = leases.peer_client
    return client


class PeerFollow:
    """One waiting production's stream of the holder's flight (once ``start``
    found one): settles the production's outcome with a Live over a local
    spool, and ends that flight with the published entry (``conclude``)."""

    def __init__(self, cache: "Cache", target: "Target", shared: Shared["Result"], leave: Callable[[], None],
                 idle_timeout: float, held: Held | None = None) -> None:
        self.cache = cache
        self.held = held  # with worker processes: this one's claim on the key (fetch/across.py)
        self.key = target.key
        self.shared = shared
        self.leave = leave
        self.idle_timeout = idle_timeout
        self.flight: Flight | None = None
        self.spool: Any = None
        self.peer = ""
        self.broken = False  # the stream broke off: this production is over
        self.outcome: str | None = None  # for the metrics: complete, error (fallback: no flight at all)
        self.published = False  # the holder's entry was seen in the bucket's index (keep)
        self._receiving: Deferred[None] | None = None
        self._ended: Shared[None] = Shared()  # the body arrived whole, or broke off

    async def start(self, info: "LeaseInfo") -> None:
        """Ask the holder named in ``info`` for its flight; on a 200 the
        production's clients tail it from now on. Anything else: nothing."""
        from sparkcache.fetch.cache import Live
        from sparkcache.store.s3.lease import key_hash

        store = self.cache.store
        leases = store.leases
        assert info.peer is not None
        if not store.writable:  # no spool to stream into: the entry comes from the bucket, or not at all
            self._fallback()
            return
        path = FLIGHT_PATH + key_hash(self.key)
        headers = Headers({AUTH_HEADER: [sign(leases.peer_key, b"GET", path.encode(), self.cache.clock.seconds())]})
        self.peer = info.peer
        try:
            # (?key=: the holder's worker processes other than the one holding the lease tail its spool by it.)
            url = f"{info.peer}{path}?key={quote(self.key, safe='')}"
            response = await _client(self.cache).agent.request(b"GET", url.encode(), headers)
        except CancelledError:
            raise
        except Exception as e:
            log.info("could not reach {peer} for {key} ({e}); waiting for its entry", peer=info.peer, key=self.key,
                     e=e.__class__.__name__)
            self._fallback()
            return
        if response.code != 200:
            await discard_body(response)
            level = log.warn if response.code == 403 else log.debug
            level("{peer} has no flight of {key} for us ({code}); waiting for its entry", peer=info.peer,
                  key=self.key, code=response.code)
            self._fallback()
            return
        try:
            raw = (response.headers.getRawHeaders(HEADERS_HEADER) or [b"{}"])[0]
            kept = json.loads(raw[:MAX_HEADERS])
            if not isinstance(kept, dict):
                raise ValueError("not an object")
            kept = {str(k): str(v) for k, v in kept.items()}
            self.spool = store.new_spool("peer-")
        except (ValueError, OSError) as e:
            await discard_body(response)
            log.warn("not streaming {key} from {peer}: {e}", key=self.key, peer=info.peer, e=e)
            self._fallback()
            return
        total = response.length if isinstance(response.length, int) else None
        flight = self.flight = Flight(self.key, self.spool, total, kept, Lanes(store.reactor))
        # The holder sends the last byte of a body to verify only once it matched.
        flight.hold_last = False
        leases.streamed += 1
        log.info("streaming {key} from {peer} while it fetches", key=self.key, peer=info.peer)
        self.shared.settle(Live(flight))
        self._receiving = receive(response, flight, self.cache.clock, self.idle_timeout)
        self._receiving.addCallbacks(self._arrived, self._broke)
        if self.held is not None:  # the other workers' clients of the key tail our spool too
            await self.held.announce(Marker(self.spool.path, total, kept, False))

    def _fallback(self) -> None:
        self.cache.metrics.peer_stream("followed", "fallback")

    def _arrived(self, _: object) -> None:
        flight = self.flight
        assert flight is not None
        if flight.total is not None and flight.written != flight.total:
            self._fail(BodyError(f"the stream from {self.peer} ended after {flight.written} of {flight.total} bytes"))
        self._ended.settle(None)

    def _broke(self, f: Failure) -> None:
        if not f.check(CancelledError):
            why = f.value if f.check(BodyError) else BodyError(str(f.value))
            log.warn("the stream of {key} from {peer} broke off: {e}", key=self.key, peer=self.peer, e=why)
            self._fail(BodyError(f"the stream from {self.peer} broke off: {why}"))
        self._ended.settle(None)

    def _fail(self, e: BodyError) -> None:
        """Abort this host's clients of the stream; the key is free here again."""
        self.broken = True
        if self.flight is not None and not self.flight.finished:
            self.outcome = self.outcome or "error"
            if self.held is not None:  # the other workers' tails end now too
                self.held.abort(str(e)).addErrback(lambda f: None)
            self.leave()
            self.flight.fail(e)

    async def keep(self) -> bool:
        """Once the whole stream arrived: whether the holder's entry is published
        in the bucket yet; when it is and names the bytes streamed (sha256 and
        length), the spool goes into this host's tier first, so that the fill of
        that entry (the polls' next lookup) does not GET the body again."""
        store = self.cache.store
        shared = store.shared_index
        flight = self.flight
        if self.published or shared is None or flight is None:
            return True
        entry = await shared.lookup(self.key)
        if entry is None:
            return False
        self.published = True
        try:
            await flight.flushed()
        except BodyError:
            return True
        if entry.digest != self.spool.hexdigest() or entry.size != flight.written or not store.backed:
            return True  # (conclude finds it differs and aborts the flight)
        try:
            cas: Any = store.cas  # (backed: an S3ContentStore)
            await cas.keep_streamed(self.spool, entry.digest, entry.size)
        except Exception as e:  # the disk: the entry's fill brings the body from the bucket, as before
            log.warn("could not keep {key} streamed from {peer} in the tier: {e}", key=self.key, peer=self.peer, e=e)
            store.note_write_error(e)
        return True

    async def conclude(self, got: Union["Lease", "Result"]) -> "Result":
        """End the flight with the outcome of the wait: the holder's entry
        (once every byte arrived, and only if they are its bytes), or an abort."""
        from sparkcache.fetch.cache import Failed, Hit
        from sparkcache.store.s3.lease import Lease

        if isinstance(got, Lease):  # the holder let go with no entry (or its lease expired)
            await got.release()
            self._fail(BodyError(f"{self.peer} ended its fetch of {self.key} without an entry"))
            return Failed(502, "the other host's fetch ended without an entry")
        if not isinstance(got, Hit):
            self._fail(BodyError(f"the stream of {self.key} from {self.peer} ended without an entry"))
            return got
        await self._ended.wait()
        flight = self.flight
        assert flight is not None
        if flight.finished:  # broken
            return got
        await flight.flushed()
        entry = got.entry
        if entry.size != flight.written or entry.digest != self.spool.hexdigest():
            self._fail(BodyError(f"the stream of {self.key} from {self.peer} differs from its published entry"))
            return got
        self.leave()
        flight.complete(entry)
        self.outcome = "complete"
        return got

    async def close(self) -> None:
        """Whatever happened: nothing left running, the spool gone."""
        if self._receiving is not None and not self._receiving.called:
            self._receiving.cancel()
        self._fail(BodyError(f"stopped while streaming {self.key} from {self.peer}"))
        flight = self.flight
        if flight is not None:
            try:
                await flight.flushed()  # no thread may still write to the descriptor we close
            except BodyError:
                pass
            metrics = self.cache.metrics
            metrics.peer_stream("followed", self.outcome or "error")
            if flight.written:
                metrics.peer_bytes("followed")(flight.written)
            # Readers keep the flight's own descriptor: the file may go now.
            self.cache.store.discard(self.spool)


async def await_lease(cache: "Cache", target: "Target", idle_timeout: float, shared: Shared["Result"],
                      leave: Callable[[], None], held: Held | None = None) -> Union["Lease", "Result"]:
    """The lease on ``target.key``, or the outcome of the holder's fetch: its
    published entry, or (with peer streaming) the holder's flight, streamed.
    ``leave`` frees the key in the caller's Singleflight; ``held``: the
    caller's claim on the key among worker processes, if any."""
    from sparkcache.fetch.cache import Failed

    leases = cache.store.leases
    leases.count = cache.metrics.lease
    key = target.key
    if not leases.peer_key:
        return await leases.wait(key, lambda: cache._published(key))  # type: ignore[no-any-return]
    follow = PeerFollow(cache, target, shared, leave, idle_timeout, held)

    async def found() -> "Result | None":
        if follow.flight is not None:
            # The entry is of no use before the whole stream is here (conclude waits for it
            # too; a stall ends it by the idle timeout), and then the spool may spare its GET.
            await follow._ended.wait()
        if follow.broken:  # its clients were aborted: nothing more to wait for
            return Failed(502, "the stream from the other host broke off")
        if not await follow.keep():
            # (Not in the bucket's index yet; nor in ours: while we stream the key, this
            # host's production of it is ours.)
            return None
        return await cache._published(key)

    try:
        got = await leases.wait(key, found, follow.start)
        if follow.flight is None:
            return got  # type: ignore[no-any-return]
        return await follow.conclude(got)
    finally:
        await follow.close()
