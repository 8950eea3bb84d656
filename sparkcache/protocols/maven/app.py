"""``/maven/<remote>/<path>``: a pull-through Maven (and Ivy) repository.

Every path is passed to the remote's upstreams as it is, tried in order; a 404
from one moves on to the next (repositories hold different artifacts), and a
404 from all is cached for ``cache.negative_ttl``. Freshness comes from the
path (:mod:`sparkcache.protocols.maven.paths`).

Checksums are kept consistent with the bytes this cache serves:

- a release or timestamped snapshot file not stored yet is verified while it
  streams against upstream's ``.sha1`` (else ``.sha256``), itself fetched
  through the cache first; a mismatch aborts the client and stores nothing;
- a ``.sha1``/``.md5``/``.sha256``/``.sha512`` of a stored file is computed from
  the stored bytes (in a worker thread, once per body and algorithm), never
  taken from upstream, whose copy may describe other bytes (a snapshot
  republished since, a metadata file changed between the two requests);
- a sidecar of a file not stored is upstream's, cached with that file's freshness.

Upstream's ``X-Checksum-*`` headers are not replayed (they would describe
bytes unverified); an HTML page sent as a 200 for anything but a directory
listing or an ``.html`` file is an error page or a login portal: never stored.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import IResource

from sparkcache.config import Config, RemoteConfig
from sparkcache.context import Context
from sparkcache.fetch import CacheRequest, Failed, Hit, Live, Result
from sparkcache.fetch.cache import KEEP_HEADERS
from sparkcache.fetch.flight import BodyError
from sparkcache.fetch.produce import Singleflight
from sparkcache.protocols.maven.paths import (
    CHECKSUM, NotARepositoryPath, RepoPath, check_segments, classify, parse_sidecar,
)
from sparkcache.store import Entry
from sparkcache.web.errors import JSON, HTTPError, add_error_handling, guarded
from sparkcache.web.paths import quote_segments, split_raw_path
from sparkcache.web.respond import respond

log = Logger()

# Sidecar bodies are a digest and perhaps a file name: anything larger is not one.
MAX_SIDECAR = 4096
# Computed digests kept in memory: (body sha256, algorithm) → hex, about 200 bytes each.
MAX_SUMS = 50_000
HASH_CHUNK = 1 << 20
# Upstream sidecars tried, in order, to verify a file before it is stored.
VERIFY_WITH = ("sha1", "sha256")
KEEP = tuple(h for h in KEEP_HEADERS if not h.startswith("x-checksum-"))
METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]


def outcome(result: Result) -> str:
    """The metrics result of a cache Result: hit, stale, revalidated, miss or error."""
    if isinstance(result, Hit):
        return result.state.lower()
    return "miss" if isinstance(result, Live) else "error"


class MavenApp:
    app = Klein()
    add_error_handling(app, JSON)

    def __init__(self, ctx: Context, run: Callable[..., "Deferred[Any]"] | None = None) -> None:
        """``run`` hashes stored bodies in a worker thread (a pool of the
        protocol's own in the daemon; the store's I/O pool by default)."""
        self.ctx = ctx
        self.run = run or ctx.store.in_io
        self.remotes: dict[str, RemoteConfig] = {}
        self.reconfigure(ctx.config)
        self._sums: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._hashing: Singleflight[tuple[str, str], str] = Singleflight()

    def reconfigure(self, config: Config) -> None:
        """The remotes of ``config`` from now on (Built.reconfigure)."""
        self.remotes = {n: r for n, r in config.remotes.items() if r.type == "maven"}

    def resource(self) -> IResource:
        return guarded(self.app, JSON, self.ctx.config.server.max_path_length)

    # -- dispatch --------------------------------------------------------------------

    def locate(self, request: Any) -> tuple[RemoteConfig, RepoPath]:
        segments = split_raw_path(request.uri, self.ctx.config.server.max_path_length)
        if len(segments) < 2 or segments[1] == "":
            raise HTTPError(404, "no remote named; use /maven/<remote>/<path>")
        remote = self.remotes.get(segments[1])
        if remote is None:
            known = self.ctx.config.remotes.get(segments[1])
            if known is not None:
                raise HTTPError(404, f"remote {known.name!r} is a type: {known.type} remote, served at "
                                     f"{self.ctx.remote_url(known.name)}")
            raise HTTPError(404, f"unknown maven remote {segments[1]!r}")
        rest = segments[2:]
        if not [s for s in rest if s]:
            raise HTTPError(404, f"no path; use /maven/{remote.name}/<group path>/<artifact>/<version>/<file>")
        try:
            check_segments([s for s in rest if s])
        except NotARepositoryPath as e:
            raise HTTPError(400, str(e)) from None
        return remote, classify("/".join(rest))

    @app.route("/", branch=True, methods=METHODS)
    async def dispatch(self, request: Any) -> Any:
        remote, rp = self.locate(request)
        if request.method not in (b"GET", b"HEAD"):
            raise HTTPError(405, f"{request.method.decode('latin-1')} is not allowed: remote {remote.name!r} "
                                 "is a read-through cache", {"Allow": "GET, HEAD"})
        self.ctx.auth.require(request, "read")
        if rp.form == CHECKSUM and rp.algorithm is not None:
            return await self.checksum(request, remote, rp)
        return await self.file(request, remote, rp)

    # -- files -----------------------------------------------------------------------

    def key(self, remote: RemoteConfig, path: str) -> str:
        return f"{remote.name}:{path}"

    def mutable(self, remote: RemoteConfig, rp: RepoPath) -> bool:
        """Mutable by its path, or by the remote's ``mutable_patterns``."""
        return rp.mutable or any(p.search("/" + rp.path) for p in remote.mutable_patterns)

    def cache_request(self, remote: RemoteConfig, rp: RepoPath, checks: tuple[tuple[str, str], ...] = ()
                      ) -> CacheRequest:
        mutable = self.mutable(remote, rp)
        tail = quote_segments(rp.path.split("/"))
        url, *mirrors = (f"{u}/{tail}" for u in remote.upstreams)
        html_ok = rp.listing or rp.path.endswith((".html", ".htm"))
        return CacheRequest(
            remote=remote, key=self.key(remote, rp.path), path=rp.path, url=url,
            ttl=remote.cache.mutable_ttl if mutable else (remote.cache.immutable_ttl or None),
            revalidate=mutable, checks=checks, keep_headers=KEEP, mirrors=tuple(mirrors), next_on_404=True,
            refuse_types=() if html_ok else ("text/html", "application/xhtml+xml"),
        )

    async def file(self, request: Any, remote: RemoteConfig, rp: RepoPath) -> Any:
        checks: tuple[tuple[str, str], ...] = ()
        # A file that changes in place is not checked against its sidecar: the
        # two may change between the requests (its sidecars are computed instead).
        if rp.verifiable and not self.mutable(remote, rp):
            checks = await self.stated_digest(remote, rp)
        result = await self.ctx.cache.get(self.cache_request(remote, rp, checks))
        self.ctx.metrics.form(remote.name, rp.form, outcome(result))
        return await respond(request, result, self.ctx.store, self.ctx.metrics, remote.name, rp.path,
                             sendfile=self.ctx.sendfile)

    async def stated_digest(self, remote: RemoteConfig, rp: RepoPath) -> tuple[tuple[str, str], ...]:
        """What upstream's sidecar says ``rp`` hashes to, as CacheRequest checks:
        () when the file is stored already (or known missing), or upstream has
        no sidecar for it, or none that could be had."""
        key = self.key(remote, rp.path)
        entry = await self.ctx.store.index.get(key)
        if (entry is not None and entry.fresh(self.ctx.clock.seconds())) or self.ctx.cache.fetching(key):
            # Served as stored, or joined (the caller's get() follows in this
            # reactor turn): the production under way was verified when it began.
            return ()
        for algorithm in VERIFY_WITH:
            sidecar = classify(f"{rp.path}.{algorithm}")
            result = await self.ctx.cache.get(self.cache_request(remote, sidecar))
            if isinstance(result, Failed):
                # Missing, or not to be had now (upstream down, an HTML page):
                # the file itself may still be (or be stored, to serve stale).
                continue
            body = await self._small_body(result)
            stated = parse_sidecar(body, algorithm) if body is not None else None
            if stated is not None:
                return ((algorithm, stated),)
            log.warn("{remote}: {path} states no {algorithm} digest; not used to verify",
                     remote=remote.name, path=sidecar.path, algorithm=algorithm)
        return ()

    async def _small_body(self, result: Hit | Live) -> bytes | None:
        if isinstance(result, Live):
            try:
                entry: Entry = (await result.flight.wait_done()).entry
            except BodyError:
                return None
        else:
            entry = result.entry
        if entry.size > MAX_SIDECAR:
            return None
        try:
            return await self.ctx.store.read(entry, MAX_SIDECAR)
        except FileNotFoundError:
            return None

    # -- sidecars ----------------------------------------------------------------------

    async def checksum(self, request: Any, remote: RemoteConfig, rp: RepoPath) -> Any:
        """A digest sidecar: computed from the stored file it names, when there is
        one; else upstream's, through the cache."""
        assert rp.base is not None and rp.algorithm is not None
        entry = await self.stored(remote, rp.base)
        if entry is not None:
            try:
                digest = await self.digest_of(entry, rp.algorithm)
            except FileNotFoundError:
                digest = None
            if digest is not None:
                self.ctx.metrics.form(remote.name, CHECKSUM, "hit")
                self.ctx.metrics.response(remote.name, "hit")
                request.setHeader(b"Content-Type", b"text/plain")
                request.setHeader(b"X-Cache", b"HIT")
                request.setHeader(b"X-Artifact-Source", b"cache")
                request.setHeader(b"Content-Length", str(len(digest)).encode())
                request.setHeader(b"ETag", f'"{rp.algorithm}:{digest}"'.encode())
                return b"" if request.method == b"HEAD" else digest.encode()
        return await self.file(request, remote, rp)

    async def stored(self, remote: RemoteConfig, path: str) -> Entry | None:
        """The stored entry of ``path`` (waiting for a fetch of it under way), or None."""
        key = self.key(remote, path)
        if self.ctx.cache.fetching(key):
            # The client may ask for the sidecar as soon as it has the file's
            # last byte, before the entry is committed: answer for those bytes.
            # fetching() and get() run in one reactor turn, so get() joins that
            # production and never starts one (which would be unverified).
            result = await self.ctx.cache.get(self.cache_request(remote, classify(path)))
            if isinstance(result, Live):
                try:
                    return (await result.flight.wait_done()).entry  # type: ignore[no-any-return]
                except BodyError:
                    return None
            if isinstance(result, Hit):
                return result.entry
            return None
        entry = await self.ctx.store.index.get(key)
        return entry if entry is not None and entry.status == 200 and entry.digest is not None else None

    async def digest_of(self, entry: Entry, algorithm: str) -> str:
        """``algorithm`` hex digest of a stored body (FileNotFoundError when it is gone)."""
        assert entry.digest is not None
        if algorithm == "sha256":
            return entry.digest
        memo = (entry.digest, algorithm)
        kept = self._sums.get(memo)
        if kept is not None:
            self._sums.move_to_end(memo)
            return kept
        digest: str = await self._hashing.run(memo, lambda: self._hash(entry, algorithm))
        self._sums[memo] = digest
        while len(self._sums) > MAX_SUMS:
            self._sums.popitem(last=False)
        return digest

    async def _hash(self, entry: Entry, algorithm: str) -> str:
        body = self.ctx.store.open_range(entry)

        def compute() -> str:
            h = hashlib.new(algorithm)
            offset = body.start
            while True:
                chunk = body.read(offset, HASH_CHUNK)
                if not chunk:
                    return h.hexdigest()
                h.update(chunk)
                offset += len(chunk)

        try:
            digest: str = await self.run(compute)
        finally:
            body.close()
        return digest
