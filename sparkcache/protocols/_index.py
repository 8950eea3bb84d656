"""Index remotes: metadata that is rewritten at serve time and names the digests
of the files it lists (Helm ``index.yaml``; next PyPI simple pages with
``#sha256=``, npm packuments, cargo ``config.json``).

The store keeps upstream's exact bytes of an index (so revalidation compares
like with like); what a client gets is derived from them per response:

- **rewritten** (upstream file URLs pointed at this cache), computed in a
  worker thread once per (index body, public base) and kept in a bounded
  memory cache, so concurrent and later requests share one rewrite instead
  of each reading and rewriting the body; an index over ``max_body`` is
  served as stored, unrewritten;
- **digests** of the files it lists, parsed in a worker thread once per
  index body and kept the same way, so a file fetched through the cache is
  verified against what its index says (``CacheRequest.expected_digest``)
  and a mismatch is never cached.

Writing an index remote for a protocol
---------------------------------------
Subclass :class:`IndexRemote` (Helm's is
:class:`sparkcache.protocols.generic.helm.HelmIndex`, about 100 lines) and
write, for one remote of your type:

``is_index(path)``
    Whether ``path`` is metadata that gets rewritten (``simple/<project>/``).
``rewrite(body, public_base)``
    The bytes clients get. Runs in a worker thread: a pure function of its
    arguments and ``self.remote``, no Twisted calls, no I/O. ``public_base``
    is the URL this remote is served at, as the client sees it
    (``https://cache.example/api/charts``), without a trailing slash.
``indexes_listing(path)``
    Remote paths of the indexes that may list the file ``path``, nearest
    first (PyPI: the project page named by the file name; npm: the packument
    of the tarball's package). Cheap, on the reactor; each is looked up in
    the store, so keep it to a few.
``parse_digests(body, index_path)``
    ``{remote path: sha256 hex}`` for the files the index ``index_path``
    lists. Runs in a worker thread, like ``rewrite``. Digests are sha256
    because that is what the fetch engine verifies (``#sha256=``, cargo's
    ``cksum``); metadata that names only other algorithms (npm's sha512
    ``integrity``) cannot be checked until the engine can.

and, when the defaults do not fit, ``classify(path)`` (default: the
``immutable_patterns``/``mutable_patterns`` of the remote, see
:func:`classify_by_patterns`), ``key(path)`` (the store key of an index path;
default ``<remote>:<path>``, the generic app's), ``content_type`` (used when
upstream sent none) and ``max_body``.

Then, in the protocol's app, one :class:`DerivedCache` per app (give it a
thread pool of the protocol's own, a :class:`sparkcache.pools.PoolService`
returned in ``Built.services``), one index remote per remote, and per GET::

    fresh = index.classify(path)                 # None: policy refuses (403)
    req = CacheRequest(..., ttl=fresh.ttl,
                       expected_digest=await index.expected_digest(path))
    result = await ctx.cache.get(req)
    if index.is_index(path):
        return await index.serve(request, result, path, public_base)
    return await respond(request, result, ...)

``serve`` answers with the headers the generic app always used for rewritten
metadata (``X-Cache``, ``X-Artifact-Source``, ``Content-Type``,
``Cache-Control: no-cache``, ``Content-Length``).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar, Union

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.logger import Logger

from sparkcache.config import RemoteConfig
from sparkcache.fetch import Failed, Hit, Live, Result
from sparkcache.fetch.flight import BodyError
from sparkcache.fetch.produce import Singleflight
from sparkcache.store import Entry, Store
from sparkcache.web.errors import HTTPError
from sparkcache.web.respond import relayed_headers, respond
from sparkcache.web.serve import error_body

if TYPE_CHECKING:
    from sparkcache.context import Context

log = Logger()
T = TypeVar("T")
# Runs fn(*args) in a worker thread; the result comes back on the reactor.
Runner = Callable[..., "Deferred[Any]"]

# Metadata larger than this is served as stored: reading and rewriting it would
# hold that much (and more, parsed) in memory.
MAX_INDEX_BODY = 64 << 20
# Rewritten bodies and parsed digests kept in memory, per app.
DERIVED_CACHE_BYTES = 128 << 20


# -- freshness ------------------------------------------------------------------------


@dataclass(frozen=True)
class Immutable:
    """Never changes upstream once published (chart archives, wheels)."""

    # None: fresh forever. An operator's ``cache.immutable_ttl`` re-checks anyway.
    ttl: float | None = None


@dataclass(frozen=True)
class Mutable:
    """Changes in place upstream (indexes): fresh for ``ttl`` seconds, then revalidated."""

    ttl: float


@dataclass(frozen=True)
class Never:
    """Must not be answered from the cache without asking upstream. The fetch
    engine has no pass-through, so it is fetched like the rest (concurrent
    requests still share one fetch) and stored already stale: every later
    request asks upstream again (and stale-on-error still applies)."""

    ttl: float = 0.0


Freshness = Union[Immutable, Mutable, Never]


def classify_by_patterns(remote: RemoteConfig, path: str) -> Freshness | None:
    """The freshness a remote's ``mutable_patterns``/``immutable_patterns`` give
    ``path``; None when they refuse it (outside ``immutable_patterns``, which,
    when given, also list what may be fetched at all)."""
    probe = "/" + path
    if any(p.search(probe) for p in remote.mutable_patterns):
        return Mutable(remote.cache.mutable_ttl)
    if not remote.immutable_patterns or any(p.search(probe) for p in remote.immutable_patterns):
        return Immutable(remote.cache.immutable_ttl or None)
    return None


# -- values derived from stored bodies ----------------------------------------------


class TooLarge(Exception):
    """The stored body is over the limit a derived value may be computed from."""


class DerivedCache:
    """Values computed from stored bodies (a rewritten index, its parsed digests):
    each once per key however many requests want it at the same time, in a
    worker thread, and kept in memory (least recently used out first) up to
    ``max_bytes``.

    Every caller waits on a Deferred of its own, so a client that goes away
    (Klein cancels its handler) cancels only its wait: the computation goes
    on and its result is kept for the next request.
    """

    def __init__(self, store: Store, run: Runner, max_bytes: int = DERIVED_CACHE_BYTES) -> None:
        self.store = store
        self.run = run
        self.max_bytes = max_bytes
        self.size = 0
        self.computed = 0  # computations started (for tests and curious operators)
        self._memo: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._running: Singleflight[str, Any] = Singleflight()

    def get(self, kind: str, entry: Entry, arg: str, limit: int,
            fn: Callable[[bytes], T], size: Callable[[T], int]) -> Deferred[T]:
        """``fn(body)`` of ``entry``'s stored body; ``kind`` and ``arg`` name the
        derivation (``fn`` must depend on nothing else). ``fn`` and ``size`` run in
        the worker thread. Fails with TooLarge when the body is over ``limit``
        bytes, FileNotFoundError when the body is gone from the store."""
        assert entry.digest is not None
        if entry.size > limit:
            return fail(TooLarge(f"{entry.size} bytes is over the limit of {limit}"))
        key = "\0".join((kind, entry.digest, arg))
        kept = self._memo.get(key)
        if kept is not None:
            self._memo.move_to_end(key)
            return succeed(kept[0])
        return self._running.run(key, lambda: self._compute(key, entry, limit, fn, size))

    async def _compute(self, key: str, entry: Entry, limit: int,
                       fn: Callable[[bytes], T], size: Callable[[T], int]) -> T:
        self.computed += 1
        body = await self.store.read(entry, limit)
        if len(body) > limit:
            raise TooLarge(f"over the limit of {limit} bytes")

        def derive() -> tuple[T, int]:
            value = fn(body)
            return value, size(value)

        value, n = await self.run(derive)
        self._keep(key, value, n)
        return value

    def _keep(self, key: str, value: Any, n: int) -> None:
        if n > self.max_bytes // 2:
            return  # would push out everything else for one index
        self._memo[key] = (value, n)
        self.size += n
        while self.size > self.max_bytes:
            _, (_, dropped) = self._memo.popitem(last=False)
            self.size -= dropped


@dataclass
class _Listed:
    """Digests parsed from one index body, and why there are none when it is malformed."""

    digests: dict[str, str]
    problem: str | None = None
    reported: bool = False


def mapping_size(digests: Mapping[str, str]) -> int:
    """About what a {path: digest} dict holds in memory."""
    return sum(len(k) + len(v) + 120 for k, v in digests.items()) + 64


# -- the base -------------------------------------------------------------------------


class IndexRemote(abc.ABC):
    """One remote whose metadata is rewritten at serve time (see the module's doc)."""

    # Served when upstream sent no Content-Type.
    content_type = "application/octet-stream"
    # Indexes over this are served unrewritten, and list no digests.
    max_body = MAX_INDEX_BODY

    def __init__(self, remote: RemoteConfig, ctx: "Context", derived: DerivedCache) -> None:
        self.remote = remote
        self.ctx = ctx
        self.derived = derived

    # -- what a protocol writes -----------------------------------------------------

    @abc.abstractmethod
    def is_index(self, path: str) -> bool:
        """Whether responses for ``path`` are rewritten."""

    @abc.abstractmethod
    def rewrite(self, body: bytes, public_base: str) -> bytes:
        """The body clients get (in a worker thread; pure)."""

    def indexes_listing(self, path: str) -> Sequence[str]:
        """Paths of the indexes that may name the digest of ``path``, nearest first."""
        return ()

    def parse_digests(self, body: bytes, index_path: str) -> Mapping[str, str]:
        """{remote path: sha256 hex} listed by the index at ``index_path`` (in a
        worker thread; pure). May raise on a malformed index: it then lists none."""
        return {}

    def classify(self, path: str) -> Freshness | None:
        """Freshness of ``path``; None when policy refuses it."""
        return classify_by_patterns(self.remote, path)

    def key(self, path: str) -> str:
        """The store key of the (query-less) path of an index."""
        return f"{self.remote.name}:{path}"

    # -- what the base does ------------------------------------------------------------

    def rewritten(self, entry: Entry, public_base: str) -> Deferred[bytes]:
        """The rewritten body of the index ``entry`` (shared, kept; TooLarge over max_body)."""
        return self.derived.get(f"rewrite:{self.remote.name}", entry, public_base, self.max_body,
                                lambda body: self.rewrite(body, public_base), len)

    async def digests(self, entry: Entry, index_path: str) -> Mapping[str, str]:
        """The digests listed by the index ``entry`` stored for ``index_path`` (shared, kept)."""

        def parse(body: bytes) -> _Listed:
            try:
                return _Listed(dict(self.parse_digests(body, index_path)))
            except Exception as e:
                # Kept as "lists none", so a broken index is parsed once, not per request.
                return _Listed({}, f"{type(e).__name__}: {e}")

        listed = await self.derived.get(f"digests:{self.remote.name}", entry, index_path, self.max_body, parse,
                                        lambda listed: mapping_size(listed.digests))
        if listed.problem is not None and not listed.reported:
            listed.reported = True
            log.warn("{remote}: {path} lists no digests: {problem}", remote=self.remote.name, path=index_path,
                     problem=listed.problem)
        return listed.digests

    async def expected_digest(self, path: str) -> str | None:
        """The sha256 hex a stored index says ``path`` has, or None when no stored
        index lists it (or lists it with no digest)."""
        for index_path in self.indexes_listing(path):
            entry = await self.ctx.store.index.get(self.key(index_path))
            if entry is None or entry.status != 200 or entry.digest is None:
                continue
            try:
                listed = await self.digests(entry, index_path)
            except (TooLarge, FileNotFoundError):
                continue
            digest = listed.get(path)
            if digest is not None:
                return digest
        return None

    async def serve(self, request: Any, result: Result, path: str, public_base: str) -> bytes | None:
        """Answer ``request`` with the rewritten index ``result`` (waiting for the
        whole body on a miss); an index over ``max_body`` is served as stored."""
        name = self.remote.name
        metrics, store = self.ctx.metrics, self.ctx.store
        if isinstance(result, Failed):
            metrics.response(name, "error")
            return error_body(request, result.status, result.message, relayed_headers(result))
        if isinstance(result, Live):
            try:
                entry = (await result.flight.wait_done()).entry
            except BodyError as e:
                raise HTTPError(502, str(e)) from None
            state = "MISS"
        else:
            entry, state = result.entry, result.state
        try:
            body = await self.rewritten(entry, public_base)
        except CancelledError:
            raise  # the client left
        except TooLarge:
            return await respond(request, Hit(entry, state), store, metrics, name, path)
        except FileNotFoundError:
            # Purged (or tampered with) under us: drop the row so the next request fetches afresh.
            ensureDeferred(store.purge_key(entry.key)).addErrback(lambda f: log.failure("purge failed", f))
            metrics.response(name, "error")
            return error_body(request, 503, "cached body missing; retry")
        except Exception:
            log.failure("{remote}: rewriting {path} failed; serving it as stored", remote=name, path=path)
            return await respond(request, Hit(entry, state), store, metrics, name, path)
        metrics.response(name, state.lower())
        request.setHeader(b"X-Cache", state.encode())
        request.setHeader(b"X-Artifact-Source", b"cache" if state != "MISS" else b"remote")
        request.setHeader(b"Content-Type", (entry.content_type or self.content_type).encode("latin-1"))
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        metrics.bytes_counter(name, "cache")(len(body))
        return body
