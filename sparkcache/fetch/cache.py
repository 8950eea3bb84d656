"""The produce-once engine: freshness, singleflight, spool, commit.

A caller hands ``Cache.get`` what to store (a ``Target``: key, remote, path,
TTL, expected digest) and a ``Source`` that says how its bytes are produced:

- ``Upstream``, the default for a ``CacheRequest``: an upstream HTTP response,
  revalidated conditionally when stale, served stale when upstream fails;
- ``sources.Subprocess``: a child's stdout (git upload-pack computing a pack);
- ``sources.ThreadBuild``: a body written by a worker thread (git archives,
  normalized code-sync uploads);
- ``sources.Upload``: a client's body read from a file object;
- ``sources.Spooled``: a body already complete in a spool file (a request body
  the site wrote there as it arrived), adopted as the production's spool.
  ``Cache.adopt`` commits one under its key whatever is stored there now.

It gets back one of:

- ``Hit``: serve this committed entry (``state`` says HIT, STALE or REVALIDATED);
- ``Live``: serve this in-progress Flight by tailing its spool (a MISS);
- ``Failed``: answer with this status and message.

Whatever the source, there is at most one production per key at a time and
everyone else tails the same spool, waiting on a Deferred of their own, so a
client that goes away cancels nothing shared. There is one commit path: the
body is complete, its length and digest checked, fsynced and renamed into the
content store before its index row appears. A production that fails leaves
nothing behind, and the connections of the clients tailing it are aborted.

While the store cannot write (below its free-space floor, a recent disk
write error, or no room for a body of the announced length even after
eviction), an upstream miss is passed through instead: the body goes from
upstream to the one client that asked, through memory, never stored (a
``Live`` of a ``PassFlight``, state BYPASS), like a proxy cache with a full
disk. Its end is sent only once it arrived whole and matched its digests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Awaitable, BinaryIO, Callable, Union

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from sparkcache.config import RemoteConfig
from sparkcache.fetch import across, peer
from sparkcache.fetch.flight import BodyError, Flight, Lanes, PassFlight, receive
from sparkcache.fetch.produce import Shared, Singleflight, shield, watch_ends
from sparkcache.fetch.upstream import UpstreamClient, UpstreamError, discard_body
from sparkcache.fetch.xlock import Held, KeyLocks, Marker, Tail
from sparkcache.metrics import Metrics
from sparkcache.store import Entry, SpoolFile, Store
from sparkcache.store.space import is_write_error

if TYPE_CHECKING:  # (botocore is imported only with backend s3)
    from sparkcache.store.s3.lease import Lease

log = Logger()

# Target.validate: (the complete body as a seekable, read-only binary file) ->
# None, raising BodyError to refuse the body.
Validator = Callable[[BinaryIO], None]

# Headers worth replaying to later clients; hop-by-hop and per-response
# headers (Date, Connection, Set-Cookie, signed redirect details) are not.
KEEP_HEADERS = (
    "content-type", "content-encoding", "content-disposition", "content-language",
    "etag", "last-modified", "x-checksum-sha256", "x-checksum-sha1", "x-checksum-md5",
)


@dataclass(frozen=True)
class Target:
    """What a production stores: the entry's key, remote and path, how long it
    stays fresh (None: forever), what the body must hash to, when known (its
    sha256 and any ``checks`` in other algorithms), and
    whether the entry is pinned (an upload, a push: it exists nowhere else, so
    it is never evicted; see ``Entry.pinned``)."""

    key: str
    remote: str
    path: str
    ttl: float | None = None
    expected_digest: str | None = None
    pinned: bool = False
    # Not cache, yet evictable (``Entry.kept``: a code-sync upload): no purge removes it.
    kept: bool = False
    # Further digests the body must match, as (hashlib name, hex): npm's sha512
    # ``integrity``, a Maven ``.sha1``. Checked like expected_digest.
    checks: tuple[tuple[str, str], ...] = ()
    # Checks the complete body's content before commit (a Go module zip's
    # layout): called in the I/O pool with the spool as a read-only file, it raises
    # BodyError to refuse the body, which is then handled like a digest mismatch.
    validate: Validator | None = None


@dataclass(frozen=True)
class CacheRequest:
    """A Target fetched from an upstream: what the default ``Upstream`` source asks for."""

    remote: RemoteConfig
    key: str
    path: str
    url: str
    ttl: float | None  # freshness of a 200; None means forever
    revalidate: bool = False  # conditional request when stale
    expected_digest: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    keep_headers: tuple[str, ...] = KEEP_HEADERS
    checks: tuple[tuple[str, str], ...] = ()
    # Tried in order after ``url`` when it fails in a way another copy may not
    # (unreachable, timeout, 5xx, 429): the same path on a remote's further upstreams.
    mirrors: tuple[str, ...] = ()
    # A 404/410 moves on to the next mirror too (Maven: upstreams hold different
    # artifacts); only when every one answered it is the 404 (negatively) cached.
    next_on_404: bool = False
    # Media types a 200 must not have (an HTML error or login page sent for a
    # jar): never stored, the next mirror is tried, and stale may be served.
    refuse_types: tuple[str, ...] = ()
    validate: Validator | None = None  # see Target.validate

    @property
    def target(self) -> Target:
        return Target(self.key, self.remote.name, self.path, self.ttl, self.expected_digest, checks=self.checks,
                      validate=self.validate)


@dataclass
class Hit:
    entry: Entry
    state: str  # HIT | STALE | REVALIDATED


@dataclass
class Live:
    flight: Flight
    state: str = "MISS"
    # This caller's request started the production (the others joined it).
    started: bool = False


@dataclass
class Failed:
    status: int
    message: str
    stale_ok: bool = False  # upstream unreachable / timeout / 5xx / 429
    # Upstream response headers a protocol may need (WWW-Authenticate on a 401).
    headers: dict[str, str] = field(default_factory=dict)


Result = Union[Hit, Live, Failed]


@dataclass
class Body:
    """A source's answer when it has bytes to store.

    ``fill(flight)`` puts the bytes into the flight and returns once all are
    handed over; it raises BodyError for a body that must not be kept. The
    headers are stored with the entry and sent to the clients that tail it.
    ``on_commit`` runs once the entry is visible (the production's clean-up).
    ``spool``: the bytes are already there (an upload): the production adopts
    this spool instead of making one, and ``fill`` only tells the flight.
    """

    headers: dict[str, str]
    fill: Callable[[Flight], Awaitable[Any]]
    total: int | None = None  # the announced length, checked before commit
    on_commit: Callable[[Entry], Awaitable[Any]] | None = None
    spool: SpoolFile | None = None
    # The store's purge epoch the bytes are as of (``Store.epoch``); None:
    # when the production began. A purge after it keeps them from being stored.
    since: int | None = None
    # The bytes can be fetched again (an upstream response): when the store
    # cannot write, they may be passed through to the client instead.
    passable: bool = False


class Source:
    """How the bytes of an entry are produced when the store lacks them (or has them stale)."""

    async def open(self, cache: "Cache", target: Target, stale: Entry | None) -> Union[Body, Hit, Failed]:
        """Begin: a Body to store, or an outcome that needs none (REVALIDATED, a failure)."""
        raise NotImplementedError


def _content_length(response: IResponse) -> int | None:
    if response.length is not None and isinstance(response.length, int):
        return response.length
    return None


_VALID_ETAG = re.compile(r'^(W/)?"[^"]*"$')


class Cache:
    def __init__(self, store: Store, upstream: UpstreamClient, clock: Any, metrics: Metrics,
                 locks: KeyLocks | None = None) -> None:
        self.store = store
        # With worker processes: one production per key across all of them (fetch/across.py).
        self.locks = locks
        self.upstream = upstream
        self.clock = clock
        self.metrics = metrics
        self._producing: Singleflight[str, Result] = Singleflight()
        self._passes: set[Deferred[None]] = set()  # bodies being passed through
        # Productions waiting for or following another worker's: not fetches.
        self._claiming: dict[str, Shared[Result]] = {}
        # Bookkeeping of an upstream exchange (metrics, the origin's health),
        # by key: done once the client has the response's headers, not before.
        self._uncounted: dict[str, list[Callable[[], None]]] = {}

    def count_later(self, key: str, count: Callable[[], None]) -> None:
        """Run ``count`` once the production of ``key`` has its outcome out
        (a Live's headers written to its clients, or any other outcome): a
        miss's first bytes need not wait for its counters (with worker
        processes, a new remote's labelled counters are files to set up)."""
        self._uncounted.setdefault(key, []).append(count)

    def _count_now(self, key: str) -> None:
        for count in self._uncounted.pop(key, ()):
            try:
                count()
            except Exception:
                log.failure("counting an upstream exchange for {key}", key=key)

    @property
    def inflight(self) -> int:
        """Fetches (productions) this process runs now."""
        others = sum(1 for key, shared in self._claiming.items() if self._producing.get(key) is shared)
        return len(self._producing) - others + len(self._passes)

    def fetching(self, key: str) -> bool:
        """Whether a production of ``key`` is running now."""
        return key in self._producing

    def production(self, key: str) -> Shared[Result] | None:
        """The production of ``key`` running now, if any: another host that
        waits for our lease streams its flight (web/peer.py)."""
        return self._producing.get(key)

    async def get(self, req: CacheRequest | Target, source: Source | None = None) -> Result:
        """The entry under ``req.key``: stored and fresh, or produced by ``source``
        (by default, for a CacheRequest, fetched from its upstream)."""
        key = req.key
        shared = self._producing.get(key)
        if shared is not None:
            return await self._join(shared, None, req)
        if isinstance(req, CacheRequest) and source is None:
            known = self.store.index.peek(key)
            if known is None or not known.fresh(self.clock.seconds()):
                # Likely a miss: its upstream connection is made while the index is asked.
                self.upstream.open_ahead(req.remote, req.url)
        held: Held | None = None
        if self.locks is not None and not self.store.backed:
            if self.locks.ranged and self.store.index.surely_absent(key):
                # No row anywhere, and the key's lock is one system call away:
                # no thread round trip before the upstream request.
                entry, held = None, self._claim_now(key)
            else:
                entry, held = await self._lookup_claiming(key)
        elif self.store.index.surely_absent(key):
            entry = None  # (no row, and no thread round trip to learn it)
        else:
            entry = await self.store.index.get(key)
        now = self.clock.seconds()
        if entry is not None and entry.fresh(now):
            await _unclaim(held)
            if entry.status == 200:
                self.store.index.touch(entry, now)
                return Hit(entry, "HIT")
            return Failed(entry.status, "not found upstream (cached)")
        stale = entry if entry is not None and entry.status == 200 else None
        shared = self._producing.get(key)
        if shared is not None:
            await _unclaim(held)
            return await self._join(shared, stale, req)
        # Closes the window in which a production committed (and left the map)
        # while the index lookup above was in the SQLite thread.
        latest = self.store.index.peek(key)
        if latest is not None and latest is not entry and latest.status == 200 and latest.fresh(now):
            await _unclaim(held)
            return Hit(latest, "HIT")
        if isinstance(req, CacheRequest):
            target, src = req.target, source or Upstream(req)
        else:
            assert source is not None, "only a CacheRequest has a default source"
            target, src = req, source
        if isinstance(req, CacheRequest) and source is None and not self.store.writable and req.validate is None:
            self.store.recheck_space()
            await _unclaim(held)
            return await self._pass(req, stale)
        shared = self._producing.start(key, lambda s: self._produce(target, src, stale, s, held=held))
        result = await self._join(shared, stale, req)
        return replace(result, started=True) if isinstance(result, Live) else result

    def start_now(self, req: CacheRequest) -> bool:
        """Start fetching ``req`` from its upstream now, when whether to is
        known on the reactor: no production of its key runs, the key filter
        rules a row out, the store can write and is local, and (with workers)
        the key's lock is one system call away and free. True when started;
        the ``get`` of the same request that follows (from its route, in this
        reactor turn) joins it. So a miss's upstream request goes out before
        its router and handler run, and they overlap upstream's answer."""
        key = req.key
        store = self.store
        if key in self._producing or store.backed or not store.writable:
            return False
        if not store.index.surely_absent(key):
            return False
        held: Held | None = None
        if self.locks is not None:
            if not self.locks.ranged:
                return False
            held = self._claim_now(key)
            if held is None:
                return False
        self._producing.start(key, lambda s: self._produce(req.target, Upstream(req), None, s, held=held))
        return True

    def _claim_now(self, key: str) -> Held | None:
        """(Worker processes, a key the shared key filter says no worker ever
        stored.) The key's lock, taken on the reactor, or None: another worker
        holds it (the production then follows it: ``across.claim``). Whoever
        stores a key adds it to the filter before its row and lets go of the
        lock after, so once the lock is ours, the filter still saying "surely
        absent" means there is no row now either."""
        locks = self.locks
        assert locks is not None
        held = locks.take_now(key)
        if held is not None and not self.store.index.surely_absent(key):
            # (Stored by the worker that let go just before us: rare.) Its
            # production will look the row up before fetching.
            held.release().addErrback(lambda f: log.failure("releasing the lock of {key}", f, key=key))
            return None
        return held

    async def _lookup_claiming(self, key: str) -> tuple[Entry | None, Held | None]:
        """(Worker processes.) The index row of ``key`` and, when it has no
        fresh one, the key's cross-process lock if it is free, taken in the
        SQLite thread right after the read and before a second one
        (``Index.get_or_claim``): one thread round trip where a miss took
        three (lookup; lock; recheck). The lock, once taken, is released
        even if our caller stopped waiting (its client went away)."""
        locks = self.locks
        assert locks is not None
        gone: list[bool] = []

        def own(r: tuple[Entry | None, int | None]) -> tuple[Entry | None, Held | None]:
            entry, fd = r
            held = None if fd is None else locks.held(key, fd)
            if held is not None and gone:
                held.release().addErrback(lambda f: log.failure("releasing the lock of {key}", f, key=key))
                held = None
            return entry, held

        looked = self.store.index.get_or_claim(key, self.clock.seconds(), partial(locks.take, key),
                                               partial(locks.untake, key))
        owned: Deferred[tuple[Entry | None, Held | None]] = looked.addCallback(own)  # type: ignore[assignment]
        try:
            return await shield(owned)
        except CancelledError:
            gone.append(True)
            raise

    async def _join(self, shared: Shared[Result], stale: Entry | None, req: CacheRequest | Target) -> Result:
        outcome = await shared.wait()
        if isinstance(outcome, Live) and isinstance(outcome.flight, PassFlight):
            # A passed-through body has one reader: the first to get it.
            if not outcome.flight.claimed:
                outcome.flight.claimed = True
                return outcome
            if isinstance(req, CacheRequest):
                return await self._pass(req, stale)
            return Failed(503, "the store cannot write right now (disk full?)")
        if isinstance(outcome, Live) and outcome.flight.finished:
            # Joined after the body was done: serve what was committed.
            f = outcome.flight
            if f.error is not None:
                return Failed(502, str(f.error))
            return Hit(f.entry, "HIT")
        if isinstance(outcome, Failed) and outcome.stale_ok and stale is not None:
            log.info("serving stale {key}: {why}", key=stale.key, why=outcome.message)
            return Hit(stale, "STALE")
        return outcome

    async def _produce(self, target: Target, source: Source, stale: Entry | None, shared: Shared[Result],
                       adopting: bool = False, held: Held | None = None) -> Result:
        """Run one production; settles ``shared`` as soon as there is an outcome
        (Live once bytes flow). What it returns is the outcome only if nothing
        settled it before. ``held``: the key's cross-process lock, already
        taken (with the lookup: ``_lookup_claiming``)."""
        lease: Lease | None = None
        counted = False
        try:
            if self.locks is not None and held is None:
                self._claiming[target.key] = shared
                try:
                    claimed = await across.claim(self, self.locks, target.key, stale, adopting,
                                                 lambda tail: ensureDeferred(self._follow(tail, shared)))
                finally:
                    if self._claiming.get(target.key) is shared:
                        del self._claiming[target.key]
                if not isinstance(claimed, Held):
                    return claimed
                held = claimed
            if self._leased(target, source, stale, adopting):
                # Several hosts on one bucket: one of them fetches (store/s3/lease.py).
                self._claiming[target.key] = shared
                try:
                    # (With peer streaming, our clients may tail the holder's flight meanwhile: fetch/peer.py.)
                    got = await peer.await_lease(self, target, _idle_timeout(source), shared,
                                                 lambda: self._producing.leave(target.key, shared), held)
                finally:
                    if self._claiming.get(target.key) is shared:
                        del self._claiming[target.key]
                if isinstance(got, (Hit, Live, Failed)):
                    return got
                lease = got
            self.metrics.inflight.inc()
            counted = True
            # Taken before anything is asked of the source: a purge from now on
            # keeps what this production brings from being stored.
            since = self.store.epoch()
            opening = ensureDeferred(source.open(self, target, stale))
            if held is not None:
                # Once the request is out: handing work to a thread costs the
                # reactor 0.1-0.3 ms here, which upstream's answer now overlaps.
                held.tidy()
            opened = await opening
            if not isinstance(opened, Body):
                return opened
            await self._store(target, stale, shared, opened, since, held)
            # Settled (Live) before the body flowed: this outcome goes to nobody.
            return Failed(502, "internal error while producing")
        except CancelledError:
            return Failed(503, "stopping")
        except Exception:
            log.failure("producing {key} failed", key=target.key)
            return Failed(502, "internal error while producing")
        finally:
            self._count_now(target.key)
            if counted:
                self.metrics.inflight.dec()
            if held is not None:  # after the index row, or instead of it
                await held.release()
            if lease is not None:  # after the entry was published, or instead of it
                await lease.release()

    def _leased(self, target: Target, source: Source, stale: Entry | None, adopting: bool) -> bool:
        """Whether this production takes the cross-host lease first: an upstream
        fetch of an entry the bucket's index shares (immutable, not an upload)."""
        return (self.store.leases is not None and not adopting and stale is None and target.ttl is None
                and not target.pinned and not target.kept and isinstance(source, Upstream))

    async def _published(self, key: str) -> Result | None:
        """The entry another host stored while we waited for its lease (None: none yet)."""
        return across.fresh_outcome(await self.store.index.get(key), self.clock.seconds())

    async def _follow(self, tail: Tail, shared: Shared[Result]) -> Result:
        """Serve another worker's production of the key to ours: a Live over its spool."""
        flight = across.TailFlight(tail)
        shared.settle(Live(flight))
        await across.follow(self, tail, flight, lambda: self._producing.leave(tail.key, shared))
        return Failed(502, "internal error while following")  # settled before: goes to nobody

    async def _store(self, target: Target, stale: Entry | None, shared: Shared[Result], body: Body, since: int,
                     held: Held | None = None) -> None:
        """The one commit path: spool, verify, fsync, rename, index row, in that order."""
        key = target.key
        now = self.clock.seconds()
        if body.passable and body.spool is None and target.validate is None \
                and not await self._room_for(body.total):
            # No room to store it: this one goes straight through (see _pass).
            self._producing.leave(key, shared)
            if held is not None:  # nothing stored: the other workers pass their own through
                await held.release()
            passed, passing = self._start_pass(target, body)
            shared.settle(Live(passed, "BYPASS"))
            self._count_now(key)
            await passing
            return
        try:
            spool = body.spool if body.spool is not None else await self.store.spool()
        except OSError as e:
            self.store.note_write_error(e)
            raise
        try:
            flight = Flight(key, spool, body.total, body.headers, Lanes(self.store.reactor))
        except BaseException:
            self.store.discard(spool)
            raise
        # A body with a digest to match (OCI blobs, npm tarballs) or content to
        # validate holds back its last byte until it passed, so a client never gets a whole bad body.
        flight.hold_last = target.expected_digest is not None or bool(target.checks) or target.validate is not None
        if spool.size == 0:  # an adopted upload is already written: hashed at the check
            for algorithm, _ in target.checks:
                spool.also_hash(algorithm)
        shared.settle(Live(flight))
        self._count_now(key)  # (the clients waiting have their headers by now)
        try:
            if held is not None:  # where the other workers' clients tail it (written beside the first bytes)
                held.announce(Marker(spool.path, body.total, body.headers, flight.hold_last)).addErrback(
                    lambda f: log.failure("announcing {key} to the other workers", f, key=key))
            # With a bucket behind, a large body's parts go up as it downloads.
            self.store.stream_upload(spool, flight, target.expected_digest)
            await self.store.filling(spool, body.fill(flight))
            await flight.flushed()
            if body.total is not None and flight.written != body.total:
                raise BodyError(f"the body ended after {flight.written} of {body.total} bytes")
            digest = spool.hexdigest()
            if target.expected_digest is not None and digest != target.expected_digest:
                raise BodyError(f"digest mismatch: expected sha256:{target.expected_digest}, got sha256:{digest}")
            for algorithm, want in target.checks:
                got = spool.hexdigest_of(algorithm) if spool.hashes(algorithm) else \
                    await self.store.in_io(spool.rehash, algorithm)
                if got != want.lower():
                    raise BodyError(f"digest mismatch: expected {algorithm}:{want}, got {algorithm}:{got}")
            if target.validate is not None:
                await self.store.in_io(_validate, spool, target.validate)
            etag = body.headers.get("etag")
            entry = Entry(
                key=key, remote=target.remote, path=target.path, status=200, digest=digest,
                size=flight.written, content_type=body.headers.get("content-type"), headers=body.headers,
                fetched=now, expires=None if target.ttl is None else now + target.ttl,
                etag=etag if etag and _VALID_ETAG.match(etag) else None,
                last_modified=body.headers.get("last-modified"), last_access=now, pinned=target.pinned,
                kept=target.kept,
            )
            old = stale if stale is not None else self.store.index.peek(key)
            committed = await self.store.commit(spool, entry, body.since if body.since is not None else since)
            if old is not None and old.digest is not None and old.digest != digest:
                await self.store.release_digest(old.digest)
            # Leave the map before waking anyone, so nobody joins a finished flight.
            self._producing.leave(key, shared)
            flight.complete(committed)
        except Exception as e:
            if isinstance(e, BodyError):
                log.warn("not caching {key}: {e}", key=key, e=e)
            elif isinstance(e, CancelledError):
                e = BodyError("stopped before the body was complete")
            else:
                if is_write_error(e):
                    log.warn("not caching {key}: storing failed: {e}", key=key, e=e)
                else:
                    log.failure("storing {key} failed", key=key)
                cause, e = e, BodyError(f"storing failed: {e}")
                e.__cause__ = cause
            if held is not None:  # the other workers' tails end now, not once the marker goes
                held.abort(str(e)).addErrback(lambda f: None)  # (the release that follows removes it)
            self._producing.leave(key, shared)
            flight.fail(e)
            try:
                await flight.flushed()  # no thread may still be writing to the descriptor we close
            except BodyError:
                pass
            self.store.discard(spool)
            # A disk at fault (not the body): store nothing for a while. (After
            # the discard: the room it makes must not count the dead spool.)
            self.store.note_write_error(flight.write_error or e.__cause__ or e)
            return
        if body.on_commit is not None:
            try:
                await body.on_commit(committed)
            except Exception:
                log.failure("after storing {key}", key=key)

    async def adopt(self, target: Target, spool: SpoolFile, headers: dict[str, str]) -> Entry:
        """Commit ``spool``, complete (an upload the site spooled as it arrived),
        under ``target.key``, replacing what is stored there: a production whose
        body is already written, through the one commit path (length and digest
        checked, fsync, rename, index row). A production of the key already
        running is waited for first. The spool is consumed either way; raises
        BodyError when the body is not kept (a digest mismatch)."""
        from sparkcache.fetch.sources import Spooled

        key = target.key
        try:
            while True:
                running = self._producing.get(key)
                if running is None:
                    replaced = await self.store.index.get(key)
                    if key not in self._producing:
                        break
                    continue
                outcome = await running.wait()
                if isinstance(outcome, Live):
                    try:
                        await outcome.flight.wait_done()
                    except BodyError:
                        pass
        except BaseException:
            self.store.discard(spool)
            raise
        shared = self._producing.start(key, lambda s: self._produce(target, Spooled(spool, headers), replaced, s, adopting=True))
        outcome = await shared.wait()
        if isinstance(outcome, Live):
            return (await outcome.flight.wait_done()).entry  # type: ignore[no-any-return]
        raise BodyError(outcome.message if isinstance(outcome, Failed) else "not stored")

    # -- passing through --------------------------------------------------------------

    async def _room_for(self, total: int | None) -> bool:
        """Whether the store can take a body of ``total`` bytes (None: unknown)
        now, evicting for it if it must; the last measurement is enough when
        it shows room to spare (``Store.roomy``)."""
        if not self.store.writable:
            self.store.recheck_space()
            return False
        if self.store.roomy(total or 0):
            return True
        try:
            return await self.store.make_room(total or 0)
        except Exception:
            log.failure("making room for a body")
            return False

    async def _pass(self, req: CacheRequest, stale: Entry | None) -> Result:
        """A miss while the store cannot write: ask upstream for this client alone."""
        try:
            opened = await Upstream(req).open(self, req.target, stale)
            self._count_now(req.key)
        except Exception as e:
            self._count_now(req.key)
            # (A revalidation's or a 404's small index write can fail on a full disk too.)
            if stale is not None:
                return Hit(stale, "STALE")
            log.failure("passing {key} through failed", key=req.key)
            return Failed(502, f"upstream answer not usable while the store cannot write: {e}")
        if not isinstance(opened, Body):
            return opened
        flight, _ = self._start_pass(req.target, opened)
        flight.claimed = True
        return Live(flight, "BYPASS", started=True)

    def _start_pass(self, target: Target, body: Body) -> tuple[PassFlight, Deferred[None]]:
        algorithms = tuple(a for a, _ in target.checks)
        if target.expected_digest is not None:
            algorithms += ("sha256",)
        flight = PassFlight(target.key, body.headers, self.clock, algorithms)
        self.metrics.inflight.inc()
        d = ensureDeferred(self._pass_body(target, body, flight))
        flight.abandon = d.cancel
        self._passes.add(d)

        def ended(_: object) -> None:
            self._passes.discard(d)
            self.metrics.inflight.dec()

        d.addBoth(ended)
        return flight, d

    async def _pass_body(self, target: Target, body: Body, flight: PassFlight) -> None:
        try:
            await body.fill(flight)
            if body.total is not None and flight.written != body.total:
                raise BodyError(f"the body ended after {flight.written} of {body.total} bytes")
            wanted = list(target.checks)
            if target.expected_digest is not None:
                wanted.append(("sha256", target.expected_digest))
            for algorithm, want in wanted:
                got = flight.hexdigest_of(algorithm)
                if got != want.lower():
                    raise BodyError(f"digest mismatch: expected {algorithm}:{want}, got {algorithm}:{got}")
        except CancelledError:
            flight.fail(BodyError("stopped: the client went away or the daemon is stopping"))
            return
        except BodyError as e:
            log.warn("passing {key} through failed: {e}", key=target.key, e=e)
            flight.fail(e)
            return
        except Exception as e:
            log.failure("passing {key} through failed", key=target.key)
            flight.fail(BodyError(f"passing through failed: {e}"))
            return
        flight.complete(None)

    def running(self) -> list[Deferred[None]]:
        """Deferreds of the productions in progress (each fires when its production ends)."""
        return self._producing.ends() + watch_ends(self._passes)

    async def stop(self) -> None:
        self._producing.cancel()
        for d in list(self._passes):
            d.cancel()


class Upstream(Source):
    """An upstream HTTP response: the default source of a CacheRequest.

    A stale entry is revalidated with a conditional request when the request
    says so: 304 refreshes it, 404/410 replace it with a short-lived negative
    entry, and 5xx/429 or an unreachable upstream let the caller serve it stale.
    With ``mirrors``, those failures (and a 404 when ``next_on_404``, and a
    refused media type) move on to the next upstream; the last one's answer counts.
    """

    def __init__(self, req: CacheRequest) -> None:
        self.req = req

    async def open(self, cache: Cache, target: Target, stale: Entry | None) -> Union[Body, Hit, Failed]:
        req, metrics, store = self.req, cache.metrics, cache.store
        since = store.epoch()
        later = partial(cache.count_later, target.key)
        headers = dict(req.headers)
        if stale is not None and req.revalidate:
            if stale.etag:
                headers[b"If-None-Match"] = stale.etag.encode("latin-1")
            if stale.last_modified:
                headers[b"If-Modified-Since"] = stale.last_modified.encode("latin-1")
        urls = (req.url, *req.mirrors)
        for n, url in enumerate(urls):
            last = n == len(urls) - 1
            started = cache.clock.seconds()
            try:
                response, _final = await cache.upstream.request(req.remote, b"GET", url, headers, report=later)
            except UpstreamError as e:
                later(partial(metrics.upstream, req.remote.name, e.kind))
                if last:
                    return Failed(504 if e.kind == "timeout" else 502, str(e), stale_ok=True)
                log.info("{remote}: {why}; trying the next upstream", remote=req.remote.name, why=str(e))
                continue
            later(partial(_count_exchange, metrics, req.remote.name, response.code, cache.clock.seconds() - started))
            if not last and (response.code >= 500 or response.code == 429 or _refused(req, response)
                             or (req.next_on_404 and response.code in (404, 410))):
                await discard_body(response)
                log.info("{remote}: upstream answered {code}; trying the next upstream",
                         remote=req.remote.name, code=response.code)
                continue
            break
        code = response.code
        now = cache.clock.seconds()
        if _refused(req, response):
            await discard_body(response)
            return Failed(502, f"upstream sent {_header(response, 'content-type')} for {req.path}; not stored",
                          stale_ok=True)
        if code == 200:
            kept = {}
            for name in req.keep_headers:
                v = _header(response, name)
                if v is not None:
                    kept[name] = v
            return Body(kept, lambda flight: receive(response, flight, cache.clock, req.remote.read_timeout),
                        # (Subclasses check the whole spooled body: only plain bodies pass.)
                        total=_content_length(response), since=since, passable=type(self) is Upstream)
        await discard_body(response)
        if code == 304 and stale is not None:
            fresh = replace(
                stale,
                fetched=now,
                expires=None if req.ttl is None else now + req.ttl,
                last_access=now,
                etag=_header(response, "etag") or stale.etag,
                last_modified=_header(response, "last-modified") or stale.last_modified,
            )
            if await store.refresh(fresh, since):
                return Hit(fresh, "REVALIDATED")
            # Purged or evicted while revalidating (its body may be gone): fetch it whole.
            log.info("{key} was purged or evicted while being revalidated; fetching it again", key=req.key)
            return await self.open(cache, target, None)
        if code in (404, 410, 451):
            # "Not there" answers, remembered briefly; 451 (unavailable for legal
            # reasons: cargo's third "no such crate") keeps its own status.
            status = 451 if code == 451 else 404
            if stale is not None:
                await store.purge_key(req.key)
            if req.remote.cache.negative_ttl > 0:
                await store.refresh(Entry(
                    req.key, req.remote.name, req.path, status, None, 0, None, {}, now,
                    now + req.remote.cache.negative_ttl, None, None, now,
                ), since)
            return Failed(status, f"not found upstream ({code})")
        if code >= 500 or code == 429:
            # 429 stays 429 (with upstream's Retry-After) so clients back off;
            # other upstream failures are a bad gateway.
            retry = _header(response, "retry-after") if code == 429 else None
            return Failed(429 if code == 429 else 502, f"upstream answered {code}", stale_ok=True,
                          headers={"retry-after": retry} if retry else {})
        challenge = _header(response, "www-authenticate")
        return Failed(code if 400 <= code < 500 else 502, f"upstream answered {code}",
                      headers={"www-authenticate": challenge} if challenge else {})


def _count_exchange(metrics: Metrics, remote: str, code: int, seconds: float) -> None:
    metrics.upstream_latency.labels(remote).observe(seconds)
    metrics.upstream(remote, str(code))


async def _unclaim(held: Held | None) -> None:
    """Let go of a lock taken with the lookup when no production follows."""
    if held is not None:
        await held.release()


def _refused(req: CacheRequest, response: IResponse) -> bool:
    """Whether a 200 has a media type ``req`` refuses to store."""
    if response.code != 200 or not req.refuse_types:
        return False
    ctype = (_header(response, "content-type") or "").split(";")[0].strip().lower()
    return ctype in req.refuse_types


def _idle_timeout(source: Source) -> float:
    """How long a stream from a peer may stall: as long as the upstream body it relays."""
    return source.req.remote.read_timeout if isinstance(source, Upstream) else 60.0


def _validate(spool: SpoolFile, validate: Validator) -> None:
    """Blocking (the I/O pool): run ``validate`` over the spool's bytes."""
    with spool.reader() as f:
        validate(f)  # type: ignore[arg-type]  # SpoolReader is a binary file in all but name


def _header(response: IResponse, name: str) -> str | None:
    v = response.headers.getRawHeaders(name)
    if not v:
        return None
    return v[0].decode("latin-1") if isinstance(v[0], bytes) else str(v[0])
