"""The pack cache: identical full clones are computed once and then served from the store.

A full clone (wants, no haves, no shallow/deepen/filter, ``done``) of the
same refs with the same pack-shaping capabilities makes upload-pack produce
the same pack every time, and computing it (counting, delta search,
compression) is what costs a git server its CPU. So the response bytes are
keyed by (mirror, protocol version, normalized request, ref state) and kept
as an ordinary store entry:

- hit: the stored bytes go out through ``serve_hit`` (sendfile for large
  packs), no git process at all;
- miss: one ``git upload-pack`` is the source of a production in the cache's
  engine (``fetch.sources.Subprocess``): the client that started it and every
  identical request arriving meanwhile tail its spool (singleflight), each at
  its own speed; the entry is committed only when upload-pack exited 0 and the
  response ended with its final flush-pkt. Otherwise the tailing clients'
  connections are aborted and nothing is kept.

When refs move the key changes; the superseded entries of that mirror are
dropped on the next commit, and the rest age out (TTL) or fall to LRU
eviction under ``storage.max_size``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger

from sparkcache.fetch.cache import Failed, Hit, Target
from sparkcache.fetch.sources import Subprocess
from sparkcache.git.interfaces import IMirrors
from sparkcache.git.pktline import FLUSH, UploadRequest
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


class PackCache:
    """Serves identical full-clone upload-pack requests from one stored response,
    produced once by the cache's engine from a ``git upload-pack`` child."""

    def __init__(self, ctx: Any, mirrors: IMirrors, reactor: Any) -> None:
        self.ctx, self.mirrors, self.reactor = ctx, mirrors, reactor
        # The upload-pack runner; tests wrap it to count computations.
        self.spawn: Callable[..., Deferred[int]] | None = None
        self.extra_config: dict[str, str] | None = None
        self.computed = 0
        self.enabled = True
        self.reconfigure(getattr(ctx, "config", None))

    def reconfigure(self, config: Any) -> None:
        # ``git.pack_cache: false`` turns it off (every clone runs upload-pack).
        self.enabled = bool(getattr(getattr(config, "git", None), "pack_cache", True))

    async def serve(self, request: Any, mirror: Any, body: bytes, parsed: Any, git_protocol: str | None) -> bool:
        """Answer ``request`` from the cache (or by computing and storing the pack);
        return False, having written nothing, when the request is not cacheable."""
        if not self.enabled or not isinstance(parsed, UploadRequest) or not cacheable(parsed):
            return False
        try:
            state = await self.mirrors.run(ref_state, mirror.path)
        except CancelledError:
            raise  # the client went away
        except Exception as e:  # nothing written yet: let upload-pack serve this one directly
            log.warn("pack cache: cannot read the refs of {name}: {e}", name=mirror.name, e=e)
            return False
        target = Target(cache_key(mirror, parsed, state), REMOTE, f"{mirror.name}/", TTL)

        async def superseded(entry: Entry) -> None:
            log.info("pack cache: stored {size} bytes for {name}", size=entry.size, name=mirror.name)
            await self._drop_superseded(mirror, state, entry.fetched)

        source = Subprocess(
            lambda consumer: ensureDeferred(self._upload_pack(mirror, body, git_protocol, consumer)),
            {"content-type": CONTENT_TYPE, "x-git-ref-state": state},
            what="upload-pack", idle_timeout=IDLE_TIMEOUT, ends_with=FLUSH, on_commit=superseded,
        )
        result = await self.ctx.cache.get(target, source)
        if isinstance(result, Failed):
            return False  # nothing written yet: upload-pack serves this one directly
        if isinstance(result, Hit):
            await self._send_entry(request, result.entry)
            return True
        self.ctx.metrics.response(REMOTE, "miss" if result.started else "joined")
        if not _gone(request):  # (else the computation goes on for the others, and the store)
            self._headers(request, "MISS")
            await send_flight(request, result.flight, 0, None, self.ctx.metrics.bytes_counter(REMOTE, "upload-pack"))
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
        out = serve_hit(request, entry, "HIT", self.ctx.store, self.ctx.metrics, REMOTE, entry.path,
                        extra_headers={"Cache-Control": "no-cache"}, sendfile=self.ctx.sendfile)
        if isinstance(out, Deferred):
            await out
        elif isinstance(out, bytes) and not _gone(request):
            request.write(out)

    # -- computing -----------------------------------------------------------------

    def _spawn(self) -> Callable[..., Deferred[int]]:
        if self.spawn is None:
            from sparkcache.git.uploadpack import spawn_upload_pack

            self.spawn = spawn_upload_pack
        return self.spawn

    async def _upload_pack(self, mirror: Any, body: bytes, git_protocol: str | None, consumer: IConsumer) -> int:
        log.info("pack cache: computing a pack for {name}", name=mirror.name)
        self.computed += 1
        # The computation outlives the request that started it (the others
        # tail it), so it marks the mirror in use itself: maintenance must not
        # run a pruning repack while this upload-pack still reads objects.
        acquire, release = getattr(self.mirrors, "acquire", None), getattr(self.mirrors, "release", None)
        if acquire is not None:
            acquire(mirror)
        try:
            return await self._spawn()(self.reactor, mirror.path, advertise=False, stdin=body,
                                       git_protocol=git_protocol, consumer=consumer, extra_config=self.extra_config)
        finally:
            if release is not None:
                release(mirror)

    async def _drop_superseded(self, mirror: Any, state: str, started: float) -> None:
        """Packs of this mirror computed against older refs can never be asked for again."""
        path = f"{mirror.name}/"
        store = self.ctx.store
        for entry in await store.index.list_remote(REMOTE):
            if entry.path == path and entry.headers.get("x-git-ref-state") != state and entry.fetched < started:
                await store.purge_key(entry.key)


def _gone(request: Any) -> bool:
    return bool(getattr(request, "_disconnected", False)) or getattr(request, "channel", True) is None
