"""``GET /_peer/flight/<sha256 of a key>``: the body this host is fetching under a lease, for another host.

A host on the same bucket that lost the lease on a key asks its holder
here (fetch/peer.py) and relays what it gets to its own clients while the
holder downloads. The answer is the holder's flight exactly as its own
clients tail it (web/serve.py ``send_flight``): from the spool, at the
pace the bytes arrive, the last byte of a body to verify held back until it
matched, the connection aborted if the fetch fails. The stored headers go
as JSON in ``X-Sparkcache-Peer-Headers``; ``Content-Length`` when known.

- With worker processes the request may reach a worker other than the
  lease holder's: that worker tails the holder's spool file as it would for
  a client of its own (fetch/across.py ``TailFlight``, through the flight
  marker of fetch/xlock.py); the key comes as ``?key=``, checked against the
  hash in the path.
- 404 (JSON) when this host holds no lease on that key, or its production
  has no flight to tail (not started, already over, passed through): the
  other host then waits for the published entry.
- 403 (JSON) without a valid ``X-Sparkcache-Peer`` token (fetch/peer.py
  ``sign``: an HMAC keyed with what every host on the bucket shares), so
  bodies are never served to outsiders. The token is never logged.

Mounted at ``/_peer`` only when ``storage.s3.peer_url`` is set.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from sparkcache.fetch import across
from sparkcache.fetch.across import TailFlight
from sparkcache.fetch.flight import Flight, PassFlight
from sparkcache.fetch.peer import AUTH_HEADER, FLIGHT_PATH, HEADERS_HEADER, refusal
from sparkcache.fetch.xlock import Tail
from sparkcache.store.s3.lease import key_hash
from sparkcache.web.serve import error_body, finish_safely, send_flight

log = Logger()

_FLIGHT = re.compile(r"^" + re.escape(FLIGHT_PATH) + r"([0-9a-f]{64})$")


class PeerFlights(Resource):
    isLeaf = True

    def __init__(self, ctx: Any) -> None:
        super().__init__()
        self.ctx = ctx
        self.served = 0  # flights streamed to other hosts

    def render(self, request: Any) -> Any:
        leases = self.ctx.store.leases
        if request.method != b"GET":
            return error_body(request, 405, "only GET", {"Allow": "GET"})
        why = refusal(leases.peer_key if leases is not None else b"", request.method, request.path,
                      request.getHeader(AUTH_HEADER), self.ctx.clock.seconds())
        if why is not None:
            log.warn("refused a peer request from {ip}: {why}", ip=getattr(request.getClientAddress(), "host", "?"),
                     why=why)
            self._count("refused")
            return error_body(request, 403, why)
        m = _FLIGHT.match(request.path.decode("latin-1"))
        if m is None:
            return error_body(request, 404, "no such endpoint")
        lease = leases.held.get(m.group(1))
        if lease is not None:
            d = ensureDeferred(self._serve(request, lease.key))
        else:
            key = (request.args.get(b"key") or [b""])[0].decode("utf-8", "replace")
            if self.ctx.cache.locks is None or key_hash(key) != m.group(1):
                self._count("fallback")
                return error_body(request, 404, "no flight of that key here")
            d = ensureDeferred(self._serve_sibling(request, key))

        def failed(f: Any) -> None:
            if not f.check(CancelledError):
                log.failure("serving a flight to a peer", f)
            if not getattr(request, "startedWriting", False) and not getattr(request, "_disconnected", False):
                request.write(error_body(request, 500, "internal error"))
                finish_safely(request)

        d.addErrback(failed)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    async def _serve(self, request: Any, key: str) -> None:
        from sparkcache.fetch.cache import Live

        shared = self.ctx.cache.production(key)
        outcome = await shared.wait() if shared is not None else None
        flight = outcome.flight if isinstance(outcome, Live) else None
        if flight is None or flight.finished or isinstance(flight, PassFlight):
            self._count("fallback")  # (the other host waits for the entry)
            request.write(error_body(request, 404, "no flight of that key here now"))
            finish_safely(request)
            return
        await self._send(request, flight)

    async def _serve_sibling(self, request: Any, key: str) -> None:
        """Another worker of this host fetches ``key``: tail its spool file."""
        cache = self.ctx.cache
        locks = cache.locks
        marker = await locks.marker(key)

        async def committed() -> bool:
            row = await cache.store.index.get(key)
            return row is not None and row.status == 200

        tail = Tail(locks, key, marker, committed) if marker is not None and marker.error is None else None
        if tail is not None:
            try:
                await tail.open()
            except FileNotFoundError:  # committed (or dropped) meanwhile
                tail = None
        if tail is None:
            self._count("fallback")  # (the other host waits for the entry)
            request.write(error_body(request, 404, "no flight of that key here now"))
            finish_safely(request)
            return
        flight = TailFlight(tail)
        following = ensureDeferred(across.follow(cache, tail, flight, lambda: None))
        following.addErrback(lambda f: None if f.check(CancelledError) else log.failure("following {key}", f, key=key))
        try:
            await self._send(request, flight)
        finally:
            following.cancel()

    async def _send(self, request: Any, flight: Flight) -> None:
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(HEADERS_HEADER, json.dumps(flight.headers).encode("latin-1", "replace"))
        if flight.total is not None:
            request.setHeader(b"Content-Length", str(flight.total).encode())
        self.served += 1
        sent = 0
        count_bytes = self.ctx.cache.metrics.peer_bytes("served")

        def on_bytes(n: int) -> None:
            nonlocal sent
            sent += n
            count_bytes(n)

        try:
            await send_flight(request, flight, 0, flight.total, on_bytes)
        finally:
            # Whole: every byte of a known length (send_flight aborts the connection when the
            # fetch failed or the peer went away), or of a chunked flight that ended well.
            if flight.total is not None:
                whole = sent == flight.total
            else:
                whole = flight.finished and flight.error is None and sent == flight.written
            self._count("complete" if whole else "error")

    def _count(self, outcome: str) -> None:
        self.ctx.cache.metrics.peer_stream("served", outcome)
