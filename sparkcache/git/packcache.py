"""The pack cache: identical full clones are computed once and then served from the store.

A full clone (wants, no haves, no shallow/deepen/filter, ``done``) of the
same refs with the same pack-shaping capabilities makes upload-pack produce
the same pack every time, and computing it (counting, delta search,
compression) is what costs a git server its CPU. So the response bytes are
keyed by (mirror, protocol version, normalized request, ref state) and kept
as an ordinary store entry:

- hit: the stored bytes go out through ``serve_hit`` (sendfile for large
  packs), no git process at all;
- miss: one ``git upload-pack`` writes into a spool Flight; the client that
  started it and every identical request arriving meanwhile tail that spool
  (singleflight), each at its own speed; the entry is committed only when
  upload-pack exited 0 and the response ended with its final flush-pkt.
  Otherwise the tailing clients' connections are aborted and nothing is kept.

When refs move the key changes; the superseded entries of that mirror are
dropped on the next commit, and the rest age out (TTL) or fall to LRU
eviction under ``storage.max_size``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from sparkcache.fetch.cache import watch_ends
from sparkcache.fetch.flight import HIGH_WATER, LOW_WATER, BodyError, Flight
from sparkcache.git.pktline import UploadRequest
from sparkcache.store import Entry
from sparkcache.web.respond import serve_hit
from sparkcache.web.serve import send_flight

log = Logger()

REMOTE = "git-packs"
CONTENT_TYPE = "application/x-git-upload-pack-result"
# Keys carry the ref state, so an entry is never wrong, only superseded; the
# TTL bounds how long a superseded one that nobody dropped lingers.
TTL = 86400.0
# upload-pack silent for this long (no pack data, no progress) is presumed stuck.
IDLE_TIMEOUT = 600.0
# Capabilities that describe the client, not the pack it gets.
_IGNORED_CAPS = ("agent=", "session-id=", "trace2")


def cacheable(parsed: UploadRequest) -> bool:
    """Only full clones: anything incremental, shallow or filtered is nearly unique."""
    if parsed.command != "fetch" or not (parsed.wants or parsed.want_refs):
        return False
    if parsed.haves or parsed.shallow_or_filtered or not parsed.done:
        return False
    if parsed.version != 2 and not any(c in ("side-band", "side-band-64k") for c in parsed.capabilities):
        # Without side-band the v0 response is a bare pack with no end marker
        # we could check before committing it.
        return False
    return True


def cache_key(mirror: Any, parsed: UploadRequest, ref_state: str) -> str:
    """Everything that shapes upload-pack's output for a full clone, and nothing else."""
    caps = sorted({c for c in parsed.capabilities if not c.startswith(_IGNORED_CAPS)})
    parts = [
        f"mirror={mirror.name}\0{mirror.path}",
        f"version={parsed.version}",
        "wants=" + ",".join(sorted(set(parsed.wants))),
        "want-refs=" + ",".join(sorted(set(parsed.want_refs))),
        "caps=" + ",".join(caps),
        "args=" + ",".join(sorted(set(parsed.arguments))),
        f"refs={ref_state}",
    ]
    return "git-pack:" + hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def ref_state(repo_path: str) -> str:
    """Blocking (git pool): a hash of HEAD, packed-refs and every loose ref of a bare repo.

    Reading the files is far cheaper than asking git or libgit2 to resolve
    every ref, and any change to a ref changes one of them."""
    h = hashlib.sha256()
    for name in ("HEAD", "packed-refs"):
        try:
            with open(os.path.join(repo_path, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
        except FileNotFoundError:
            h.update(name.encode() + b"\0-\0")
    refs = os.path.join(repo_path, "refs")
    for root, dirs, files in os.walk(refs):
        dirs.sort()
        for fn in sorted(files):
            if fn.endswith(".lock"):
                continue
            p = os.path.join(root, fn)
            try:
                with open(p, "rb") as f:
                    data = f.read()
            except (FileNotFoundError, IsADirectoryError):
                continue
            h.update(os.path.relpath(p, repo_path).encode("utf-8", "surrogateescape") + b"\0" + data + b"\0")
    return h.hexdigest()


@implementer(IConsumer)
class SpoolConsumer:
    """Takes upload-pack's stdout into a Flight, pausing the child while the disk lags.

    Remembers the last bytes, to check the response's final flush-pkt."""

    def __init__(self, flight: Flight, clock: Any, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.flight = flight
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.producer: IPushProducer | None = None
        self.tail = b""
        self.error: str | None = None
        self._paused = False
        self._timer: Any = clock.callLater(idle_timeout, self._idle)
        flight.on_drain = self._maybe_resume

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if self.error is not None:
            producer.stopProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        if self.error is not None or not data:
            return
        try:
            self.flight.data(data)
        except OSError as e:  # disk full, I/O error: stop the child, never commit
            self._stop(f"spool write failed: {e}")
            return
        self.tail = (self.tail + data)[-4:]
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        if self.flight.queued > HIGH_WATER and not self._paused and self.producer is not None:
            self._paused = True
            self.producer.pauseProducing()
            if self._timer is not None and self._timer.active():
                self._timer.cancel()  # waiting on our disk is not a stuck child

    def _maybe_resume(self) -> None:
        if self._paused and self.flight.queued < LOW_WATER:
            self._paused = False
            if self.error is None:
                self._timer = self.clock.callLater(self.idle_timeout, self._idle)
            if self.producer is not None:
                self.producer.resumeProducing()

    def _idle(self) -> None:
        self._stop(f"upload-pack produced nothing for {self.idle_timeout:g}s")

    def _stop(self, why: str) -> None:
        if self.error is None:
            self.error = why
        if self.producer is not None:
            self.producer.stopProducing()

    def close(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.flight.on_drain = lambda: None


class PackCache:
    """Serves identical full-clone upload-pack requests from one stored response."""

    def __init__(self, ctx: Any, reactor: Any) -> None:
        self.ctx, self.reactor = ctx, reactor
        self._flights: dict[str, Flight] = {}
        self._running: set[Deferred[None]] = set()
        # The upload-pack runner; tests wrap it to count computations.
        self.spawn: Callable[..., Deferred[int]] | None = None
        self.extra_config: dict[str, str] | None = None
        self.computed = 0
        git_config = getattr(getattr(ctx, "config", None), "git", None)
        # ``git.pack_cache: false`` turns it off (every clone runs upload-pack).
        self.enabled = bool(getattr(git_config, "pack_cache", True))

    @property
    def _store(self) -> Any:
        return self.ctx.store

    async def serve(self, request: Any, mirror: Any, body: bytes, parsed: Any, git_protocol: str | None) -> bool:
        """Answer ``request`` from the cache (or by computing and storing the pack);
        return False, having written nothing, when the request is not cacheable."""
        if not self.enabled or not isinstance(parsed, UploadRequest) or not cacheable(parsed):
            return False
        try:
            state = await self.ctx.git.run(ref_state, mirror.path)
        except CancelledError:
            raise  # the client went away
        except Exception as e:  # nothing written yet: let upload-pack serve this one directly
            log.warn("pack cache: cannot read the refs of {name}: {e}", name=mirror.name, e=e)
            return False
        key = cache_key(mirror, parsed, state)
        flight = self._flights.get(key)
        if flight is None:
            entry = await self._store.index.get(key)
            now = self.ctx.clock.seconds()
            if entry is not None and entry.status == 200 and entry.fresh(now):
                self._store.index.touch(entry, now)
                await self._send_entry(request, entry)
                return True
            flight = self._flights.get(key)
            if flight is None:
                # A computation may have committed while the index lookup ran.
                latest = self._store.index.peek(key)
                if latest is not None and latest is not entry and latest.status == 200 and latest.fresh(now):
                    await self._send_entry(request, latest)
                    return True
                flight = self._start(key, mirror, body, git_protocol, state, now)
                self.ctx.metrics.response(REMOTE, "miss")
            else:
                self.ctx.metrics.response(REMOTE, "joined")
        else:
            self.ctx.metrics.response(REMOTE, "joined")
        await self._send_flight(request, flight)
        return True

    # -- serving -----------------------------------------------------------------

    def _headers(self, request: Any, state: str) -> None:
        set_header = request.responseHeaders.setRawHeaders
        set_header(b"Content-Type", [CONTENT_TYPE.encode()])
        set_header(b"Cache-Control", [b"no-cache"])
        set_header(b"X-Cache", [state.encode()])

    async def _send_entry(self, request: Any, entry: Entry) -> None:
        if _gone(request):
            return
        out = serve_hit(request, entry, "HIT", self._store, self.ctx.metrics, REMOTE, entry.path,
                        extra_headers={"Cache-Control": "no-cache"}, sendfile=self.ctx.sendfile)
        if isinstance(out, Deferred):
            await out
        elif isinstance(out, bytes) and not _gone(request):
            request.write(out)

    async def _send_flight(self, request: Any, flight: Flight) -> None:
        if _gone(request):
            return  # the computation goes on for the others (and the store)
        self._headers(request, "MISS")
        await send_flight(request, flight, 0, None, self.ctx.metrics.bytes_counter(REMOTE, "upload-pack"))

    # -- computing -----------------------------------------------------------------

    def _start(self, key: str, mirror: Any, body: bytes, git_protocol: str | None, state: str, now: float) -> Flight:
        spool = self._store.new_spool()
        flight = Flight(key, spool, None, {"content-type": CONTENT_TYPE}, self._store.in_io)
        self._flights[key] = flight
        self.computed += 1
        d: Deferred[None] = ensureDeferred(self._compute(flight, mirror, body, git_protocol, state, now))
        self._running.add(d)

        def done(r: object) -> None:
            self._running.discard(d)
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not flight.finished:  # only if _compute itself broke
                flight.fail(BodyError("internal error while computing the pack"))

        d.addErrback(lambda f: log.failure("pack computation for {name} failed", f, name=mirror.name))
        d.addBoth(done)
        return flight

    def _spawn(self) -> Callable[..., Deferred[int]]:
        if self.spawn is None:
            from sparkcache.git.uploadpack import spawn_upload_pack

            self.spawn = spawn_upload_pack
        return self.spawn

    async def _compute(self, flight: Flight, mirror: Any, body: bytes, git_protocol: str | None, state: str,
                       started: float) -> None:
        key, spool = flight.key, flight.spool
        log.info("pack cache: computing a pack for {name}", name=mirror.name)
        consumer = SpoolConsumer(flight, self.reactor)
        # The computation outlives the request that started it (the others
        # tail it), so it marks the mirror in use itself: maintenance must not
        # run a pruning repack while this upload-pack still reads objects.
        git = getattr(self.ctx, "git", None)
        acquire, release = getattr(git, "acquire", None), getattr(git, "release", None)
        if acquire is not None:
            acquire(mirror)
        try:
            try:
                code = await self._spawn()(self.reactor, mirror.path, advertise=False, stdin=body,
                                           git_protocol=git_protocol, consumer=consumer,
                                           extra_config=self.extra_config)
            finally:
                consumer.close()
                if release is not None:
                    release(mirror)
            await flight.flushed()
            if consumer.error is not None:
                raise BodyError(consumer.error)
            if code != 0:
                raise BodyError(f"upload-pack exited with status {code}")
            if consumer.tail != b"0000":
                raise BodyError("upload-pack response did not end with a flush-pkt")
            now = self.ctx.clock.seconds()
            entry = Entry(
                key=key, remote=REMOTE, path=f"{mirror.name}/", status=200, digest=spool.hexdigest(),
                size=flight.written, content_type=CONTENT_TYPE,
                headers={"content-type": CONTENT_TYPE, "x-git-ref-state": state},
                fetched=started, expires=now + TTL, last_access=now,
            )
            old = self._store.index.peek(key)
            committed = await self._store.commit(spool, entry)
            if old is not None and old.digest not in (None, committed.digest):
                await self._store.release_digest(old.digest)
            self._forget(key, flight)
            flight.complete(committed)
            log.info("pack cache: stored {size} bytes for {name}", size=committed.size, name=mirror.name)
        except Exception as e:
            err = e if isinstance(e, BodyError) else BodyError(f"storing failed: {e}")
            log.warn("pack cache: not caching the pack for {name}: {e}", name=mirror.name, e=err)
            self._forget(key, flight)
            flight.fail(err)
            try:
                await flight.flushed()  # no thread may still write to what we discard
            except BodyError:
                pass
            self._store.discard(spool)
            return
        try:
            await self._drop_superseded(mirror, state, started)
        except Exception:
            log.failure("pack cache: dropping superseded packs of {name} failed", name=mirror.name)

    async def _drop_superseded(self, mirror: Any, state: str, started: float) -> None:
        """Packs of this mirror computed against older refs can never be asked for again."""
        path = f"{mirror.name}/"
        for entry in await self._store.index.list_remote(REMOTE):
            if entry.path == path and entry.headers.get("x-git-ref-state") != state and entry.fetched < started:
                await self._store.purge_key(entry.key)

    def _forget(self, key: str, flight: Flight) -> None:
        # Leave the map before waking anyone, so nobody joins a finished flight.
        if self._flights.get(key) is flight:
            del self._flights[key]

    @property
    def inflight(self) -> int:
        return len(self._flights)

    def running(self) -> list[Deferred[None]]:
        """Deferreds that fire when the computations now in progress end."""
        return watch_ends(self._running)


def _gone(request: Any) -> bool:
    return bool(getattr(request, "_disconnected", False)) or getattr(request, "channel", True) is None
