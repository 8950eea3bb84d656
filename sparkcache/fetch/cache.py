"""Freshness and singleflight: decide hit, revalidate, stale or fetch.

Protocol apps hand the cache a CacheRequest (key, upstream URL, freshness
class, optional expected digest) and get back one of:

- ``Hit``: serve this committed entry (``state`` says HIT, STALE or REVALIDATED);
- ``Live``: serve this in-progress Flight by tailing its spool (a MISS);
- ``Failed``: answer with this status and message.

There is at most one upstream fetch per key at a time; everyone else waits
on a Deferred of their own, so a client that goes away cancels nothing shared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Union

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from sparkcache.config import RemoteConfig
from sparkcache.fetch.flight import BodyError, Flight, receive
from sparkcache.fetch.upstream import UpstreamClient, UpstreamError, discard_body
from sparkcache.metrics import Metrics
from sparkcache.store import Entry, Store

log = Logger()

# Headers worth replaying to later clients; hop-by-hop and per-response
# headers (Date, Connection, Set-Cookie, signed redirect details) are not.
KEEP_HEADERS = (
    "content-type", "content-encoding", "content-disposition", "content-language",
    "etag", "last-modified", "x-checksum-sha256", "x-checksum-sha1", "x-checksum-md5",
)


@dataclass(frozen=True)
class CacheRequest:
    remote: RemoteConfig
    key: str
    path: str
    url: str
    ttl: float | None  # freshness of a 200; None means forever
    revalidate: bool = False  # conditional request when stale
    expected_digest: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    keep_headers: tuple[str, ...] = KEEP_HEADERS


@dataclass
class Hit:
    entry: Entry
    state: str  # HIT | STALE | REVALIDATED


@dataclass
class Live:
    flight: Flight
    state: str = "MISS"


@dataclass
class Failed:
    status: int
    message: str
    stale_ok: bool = False  # upstream unreachable / timeout / 5xx / 429
    # Upstream response headers a protocol may need (WWW-Authenticate on a 401).
    headers: dict[str, str] = field(default_factory=dict)


Result = Union[Hit, Live, Failed]


class _Fetch:
    """The shared upstream exchange for one key; waiters get their own Deferreds."""

    def __init__(self) -> None:
        self.outcome: Union[Live, Hit, Failed, None] = None
        self._waiters: list[Deferred[Any]] = []

    def wait(self) -> Deferred[Any]:
        if self.outcome is not None:
            d: Deferred[Any] = Deferred()
            d.callback(self.outcome)
            return d

        def cancel(d: Deferred[Any]) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        d = Deferred(cancel)
        self._waiters.append(d)
        return d

    def resolve(self, outcome: Union[Live, Hit, Failed]) -> None:
        self.outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(outcome)


def _content_length(response: IResponse) -> int | None:
    if response.length is not None and isinstance(response.length, int):
        return response.length
    return None


def watch_ends(running: Iterable[Deferred[Any]]) -> list[Deferred[None]]:
    """A new Deferred per running one, firing (with None) when it ends: waiting
    on these (graceful stop) neither consumes nor cancels the work itself."""
    out: list[Deferred[None]] = []
    for d in running:
        w: Deferred[None] = Deferred()

        def fire(r: object, w: Deferred[None] = w) -> object:
            w.callback(None)
            return r

        d.addBoth(fire)
        out.append(w)
    return out


_VALID_ETAG = re.compile(r'^(W/)?"[^"]*"$')


class Cache:
    def __init__(self, store: Store, upstream: UpstreamClient, clock: Any, metrics: Metrics) -> None:
        self.store = store
        self.upstream = upstream
        self.clock = clock
        self.metrics = metrics
        self._fetches: dict[str, _Fetch] = {}
        self._running: set[Deferred[None]] = set()

    @property
    def inflight(self) -> int:
        return len(self._fetches)

    def fetching(self, key: str) -> bool:
        """Whether an upstream fetch for ``key`` is running now."""
        return key in self._fetches

    async def get(self, req: CacheRequest) -> Result:
        fetch = self._fetches.get(req.key)
        if fetch is not None:
            return await self._join(fetch, None)
        entry = await self.store.index.get(req.key)
        now = self.clock.seconds()
        if entry is not None:
            if entry.status == 200 and entry.fresh(now):
                self.store.index.touch(entry, now)
                return Hit(entry, "HIT")
            if entry.status != 200 and entry.fresh(now):
                return Failed(entry.status, "not found upstream (cached)")
        fetch = self._fetches.get(req.key)
        if fetch is None:
            # Closes the window in which a fetch committed (and left the map)
            # while the index lookup above was in the SQLite thread.
            latest = self.store.index.peek(req.key)
            if latest is not None and latest is not entry and latest.status == 200 and latest.fresh(now):
                return Hit(latest, "HIT")
            fetch = self._start(req, entry if entry is not None and entry.status == 200 else None)
        return await self._join(fetch, entry if entry is not None and entry.status == 200 else None)

    async def _join(self, fetch: _Fetch, stale: Entry | None) -> Result:
        outcome = await fetch.wait()
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

    def _start(self, req: CacheRequest, stale: Entry | None) -> _Fetch:
        fetch = _Fetch()
        self._fetches[req.key] = fetch
        self.metrics.inflight.inc()
        d = ensureDeferred(self._run(req, stale, fetch))

        def cleanup(r: object) -> object:
            self.metrics.inflight.dec()
            self._forget(req.key, fetch)
            self._running.discard(d)
            if fetch.outcome is None:
                fetch.resolve(Failed(502, "internal error while fetching"))
            return None

        self._running.add(d)
        d.addErrback(lambda f: log.failure("fetch of {key} failed", f, key=req.key))
        d.addBoth(cleanup)
        return fetch

    def _expires(self, req: CacheRequest, now: float) -> float | None:
        return None if req.ttl is None else now + req.ttl

    async def _run(self, req: CacheRequest, stale: Entry | None, fetch: _Fetch) -> None:
        headers = dict(req.headers)
        if stale is not None and req.revalidate:
            if stale.etag:
                headers[b"If-None-Match"] = stale.etag.encode("latin-1")
            if stale.last_modified:
                headers[b"If-Modified-Since"] = stale.last_modified.encode("latin-1")
        started = self.clock.seconds()
        try:
            response, _final = await self.upstream.request(req.remote, b"GET", req.url, headers)
        except UpstreamError as e:
            self.metrics.upstream(req.remote.name, e.kind)
            self._settle(req.key, fetch, Failed(504 if e.kind == "timeout" else 502, str(e), stale_ok=True))
            return
        self.metrics.upstream_latency.labels(req.remote.name).observe(self.clock.seconds() - started)
        self.metrics.upstream(req.remote.name, str(response.code))
        code = response.code
        now = self.clock.seconds()
        if code == 304 and stale is not None:
            await discard_body(response)
            fresh = replace(
                stale,
                fetched=now,
                expires=self._expires(req, now),
                last_access=now,
                etag=_header(response, "etag") or stale.etag,
                last_modified=_header(response, "last-modified") or stale.last_modified,
            )
            self._settle(req.key, fetch, Hit(await self.store.index.put(fresh), "REVALIDATED"))
        elif code == 200:
            await self._stream(req, stale, fetch, response, now)
        elif code in (404, 410):
            await discard_body(response)
            if stale is not None:
                await self.store.purge_key(req.key)
            if req.remote.cache.negative_ttl > 0:
                await self.store.index.put(Entry(
                    req.key, req.remote.name, req.path, 404, None, 0, None, {}, now,
                    now + req.remote.cache.negative_ttl, None, None, now,
                ))
            self._settle(req.key, fetch, Failed(404, f"not found upstream ({code})"))
        elif code >= 500 or code == 429:
            await discard_body(response)
            # 429 stays 429 so clients back off; other upstream failures are a bad gateway.
            self._settle(req.key, fetch, Failed(429 if code == 429 else 502, f"upstream answered {code}", stale_ok=True))
        else:
            await discard_body(response)
            challenge = _header(response, "www-authenticate")
            self._settle(req.key, fetch, Failed(code if 400 <= code < 500 else 502, f"upstream answered {code}",
                                                headers={"www-authenticate": challenge} if challenge else {}))

    async def _stream(self, req: CacheRequest, stale: Entry | None, fetch: _Fetch, response: IResponse, now: float) -> None:
        kept = {}
        for name in req.keep_headers:
            v = _header(response, name)
            if v is not None:
                kept[name] = v
        total = _content_length(response)
        spool = self.store.new_spool()
        flight = Flight(req.key, spool, total, kept, self.store.in_io)
        flight.hold_last = req.expected_digest is not None
        fetch.resolve(Live(flight))
        try:
            await receive(response, flight, self.clock, req.remote.read_timeout)
            if total is not None and flight.written != total:
                raise BodyError(f"upstream sent {flight.written} of {total} bytes")
            digest = spool.hexdigest()
            if req.expected_digest is not None and digest != req.expected_digest:
                raise BodyError(f"digest mismatch: expected sha256:{req.expected_digest}, got sha256:{digest}")
            etag = kept.get("etag")
            entry = Entry(
                key=req.key, remote=req.remote.name, path=req.path, status=200, digest=digest,
                size=flight.written, content_type=kept.get("content-type"), headers=kept,
                fetched=now, expires=self._expires(req, now),
                etag=etag if etag and _VALID_ETAG.match(etag) else None,
                last_modified=kept.get("last-modified"), last_access=now,
            )
            committed = await self.store.commit(spool, entry)
            if stale is not None and stale.digest != digest and stale.digest is not None:
                await self.store.release_digest(stale.digest)
            self._forget(req.key, fetch)
            flight.complete(committed)
        except Exception as e:
            if isinstance(e, BodyError):
                log.warn("not caching {key}: {e}", key=req.key, e=e)
            else:
                log.failure("storing {key} failed", key=req.key)
                e = BodyError(f"storing failed: {e}")
            self._forget(req.key, fetch)
            flight.fail(e)
            try:
                await flight.flushed()  # no thread may still be writing to the descriptor we close
            except BodyError:
                pass
            self.store.discard(spool)

    def _settle(self, key: str, fetch: _Fetch, outcome: Union[Hit, Failed]) -> None:
        self._forget(key, fetch)
        fetch.resolve(outcome)

    def _forget(self, key: str, fetch: _Fetch) -> None:
        # Leave the map before waking anyone, so nobody can join a finished flight.
        if self._fetches.get(key) is fetch:
            del self._fetches[key]

    def running(self) -> list[Deferred[None]]:
        """Deferreds of the fetches in progress (each fires when its fetch ends)."""
        return watch_ends(self._running)

    async def stop(self) -> None:
        for d in list(self._running):
            d.cancel()


def _header(response: IResponse, name: str) -> str | None:
    v = response.headers.getRawHeaders(name)
    if not v:
        return None
    return v[0].decode("latin-1") if isinstance(v[0], bytes) else str(v[0])
