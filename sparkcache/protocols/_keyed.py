"""Keyed blobs: what every build-cache protocol stores (ccache, sccache, Gradle,
Bazel, Turborepo, Nx, GitHub Actions, dagger, the seed endpoints).

A client PUTs a body under a key it computed and later GETs it back. The
rules are the same whichever tool speaks:

- **A body is stored once, whole.** The site spools it as it arrives (a body
  gate from :meth:`KeyedBlobs.body_gate`: ``max_entry_size`` is refused with a
  413 *before* a byte is stored, which is what makes Gradle and ccache turn
  the remote cache off cleanly), hashed while it arrives, and committed
  through the engine's one commit path (``Cache.adopt``): fsync, rename, index
  row. A PUT of a key already stored is idempotent and never rewrites the
  stored bytes (unless the protocol's keys are mutable, ``overwrite=True``).
- **A cache that fails never fails a build.** A read the store cannot answer
  is a miss; a write it cannot take (disk full, over quota) is a clean 5xx or
  413, never a hang, and the spool is gone.
- **Entries are cache, not uploads**: evicted least recently used with the
  rest of the store (they can always be rebuilt), within the remote's
  ``quota`` when it has one, and expired after ``ttl`` when it has one (job
  artifacts' retention). They are never pinned.

A protocol package builds one :class:`KeyedBlobs` per remote and keeps its own
routes, auth challenges and error format; see ``protocols/kv`` for the
smallest user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from sparkcache.config import Loader, RemoteConfig, Section, parse_duration, parse_size
from sparkcache.fetch import Hit, Target
from sparkcache.fetch.flight import BodyError
from sparkcache.store import Entry, SpoolFile
from sparkcache.web.bodies import BodyDecision, Refuse, ToSpool, request_spool
from sparkcache.web.errors import ErrorFormat, ErrorReply, HTTPError
from sparkcache.web.respond import respond

if TYPE_CHECKING:
    from sparkcache.context import Context

log = Logger()

DEFAULT_MAX_ENTRY = 1 << 30


@dataclass(frozen=True)
class KeyedOptions:
    """The keys every keyed-blob remote shares."""

    # Larger bodies are refused (413) before they are read.
    max_entry_size: int = DEFAULT_MAX_ENTRY
    # The remote's entries are evicted, least recently used first, beyond this many bytes.
    quota: int | None = None
    # Entries expire this long after they were stored (artifact retention); None: never.
    ttl: float | None = None

    def redacted(self) -> dict[str, Any]:
        return {"max_entry_size": self.max_entry_size, "quota": self.quota, "ttl": self.ttl}


def read_keyed_options(loader: Loader, sec: Section, default_ttl: float | None = None) -> KeyedOptions:
    """Read ``max_entry_size``, ``quota`` and ``ttl`` from a remote section (a
    type's own options parser calls this, then reads its own keys)."""
    ttl = sec.convert("ttl", parse_duration, default_ttl)
    return KeyedOptions(
        max_entry_size=sec.convert("max_entry_size", parse_size, DEFAULT_MAX_ENTRY),
        quota=sec.convert("quota", parse_size, None),
        ttl=ttl if ttl else None,
    )


def keyed_options(loader: Loader, sec: Section, rtype: str) -> KeyedOptions:
    """A RemoteKind ``options`` parser for a type with no keys of its own."""
    return read_keyed_options(loader, sec)


@dataclass
class Stored:
    """What a PUT did: the entry now under the key, and whether this PUT made it."""

    entry: Entry
    created: bool


class KeyedBlobs:
    """The keyed blobs of one remote (see the module's doc).

    ``key(name)`` is the store key; names are the protocol's (already vetted:
    no control characters, no traversal; the store never makes a path of them).
    """

    def __init__(self, ctx: "Context", remote: RemoteConfig, fmt: ErrorFormat) -> None:
        self.ctx = ctx
        self.remote = remote
        self.fmt = fmt
        opts = remote.options
        self.options: KeyedOptions = opts if isinstance(opts, KeyedOptions) else \
            getattr(opts, "keyed", None) or KeyedOptions()
        self._evicting = False

    def key(self, name: str) -> str:
        return f"{self.remote.name}:{name}"

    # -- writes -----------------------------------------------------------------------

    def body_gate(self, request: Any) -> BodyDecision:
        """Spool a PUT's body as it arrives; over ``max_entry_size`` (announced, or
        once that many bytes came) answer 413 in the protocol's format, having stored nothing."""
        limit = self.options.max_entry_size
        too_large = Refuse(self.fmt, ErrorReply(413, f"entries of {self.remote.name!r} are at most {limit} bytes"))
        announced = request.getHeader(b"content-length")
        if announced is not None and announced.strip().isdigit() and int(announced) > limit:
            self.ctx.metrics.form(self.remote.name, "upload", "rejected")
            return too_large
        return ToSpool(self.ctx.store, limit, too_large)

    async def put(self, request: Any, name: str, headers: Mapping[str, str] | None = None,
                  expected_sha256: str | None = None, overwrite: bool = False) -> Stored:
        """Commit the request's spooled body under ``name``. A key already stored
        is left as it is (``created=False``) unless ``overwrite``. Raises HTTPError:
        400 when the body does not hash to ``expected_sha256``, 507 when the store
        cannot take it."""
        store, metrics = self.ctx.store, self.ctx.metrics
        key = self.key(name)
        if not overwrite:
            existing = await self.get(name)
            if existing is not None:
                spool = await request_spool(request, store)
                store.discard(spool)
                metrics.form(self.remote.name, "upload", "exists")
                return Stored(existing, False)
        spool = await request_spool(request, store)
        return await self.put_spool(spool, name, headers, expected_sha256)

    async def put_spool(self, spool: SpoolFile, name: str, headers: Mapping[str, str] | None = None,
                        expected_sha256: str | None = None) -> Stored:
        """Commit a complete, hashed spool the protocol assembled itself (chunks
        or blocks of an upload) under ``name``, replacing what is there; the
        spool is consumed either way. Raises HTTPError like :meth:`put`."""
        store, metrics = self.ctx.store, self.ctx.metrics
        key = self.key(name)
        size = spool.size
        if size > self.options.max_entry_size:
            store.discard(spool)
            metrics.form(self.remote.name, "upload", "rejected")
            raise HTTPError(413, f"entries of {self.remote.name!r} are at most {self.options.max_entry_size} bytes")
        now = self.ctx.clock.seconds()
        kept = {"last-modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))}
        kept.update({k.lower(): v for k, v in (headers or {}).items()})
        target = Target(key, self.remote.name, name, self.options.ttl, expected_sha256)
        try:
            entry = await self.ctx.cache.adopt(target, spool, kept)
        except BodyError as e:
            metrics.form(self.remote.name, "upload", "rejected")
            if "digest mismatch" in str(e):
                raise HTTPError(400, f"the body does not hash to its key: {e}") from None
            raise HTTPError(507, f"not stored: {e}") from None
        except OSError as e:
            metrics.form(self.remote.name, "upload", "rejected")
            raise HTTPError(507, f"not stored: {e.strerror or e}") from None
        metrics.form(self.remote.name, "upload", "stored")
        metrics.bytes_counter(self.remote.name, "upload")(size)
        self._keep_quota()
        return Stored(entry, True)

    def _keep_quota(self) -> None:
        quota = self.options.quota
        if quota is None or self._evicting:
            return
        self._evicting = True

        async def evict() -> None:
            try:
                n = await self.ctx.store.evict_remote(self.remote.name, quota)
                if n:
                    self.ctx.metrics.evicted.inc(n)
            except Exception:
                log.failure("{remote}: keeping to its quota failed", remote=self.remote.name)
            finally:
                self._evicting = False

        ensureDeferred(evict())

    async def delete(self, name: str) -> int:
        return await self.ctx.store.purge_key(self.key(name))

    # -- reads ------------------------------------------------------------------------

    async def get(self, name: str) -> Entry | None:
        """The stored entry of ``name``, or None: absent, expired, its body gone,
        or the store failing (a build cache that fails is a miss)."""
        try:
            entry = await self.ctx.store.index.get(self.key(name))
        except Exception:
            log.failure("{remote}: reading the index failed; answering a miss", remote=self.remote.name)
            return None
        now = self.ctx.clock.seconds()
        if entry is None or entry.status != 200 or not entry.fresh(now) or not self.ctx.store.exists(entry):
            return None
        self.ctx.store.index.touch(entry, now)
        return entry

    async def serve(self, request: Any, name: str, extra_headers: dict[str, str] | None = None,
                    miss: Callable[[], Any] | None = None) -> Any:
        """Answer a GET/HEAD of ``name``: the body (with its stored headers and
        ``extra_headers``), or ``miss()`` (default: a 404 in the protocol's format)."""
        entry = await self.get(name)
        metrics = self.ctx.metrics
        if entry is None:
            metrics.form(self.remote.name, "entry", "miss")
            if miss is not None:
                return miss()
            raise HTTPError(404, f"{name!r} is not in {self.remote.name!r}")
        metrics.form(self.remote.name, "entry", "hit")
        return await respond(request, Hit(entry, "HIT"), self.ctx.store, metrics, self.remote.name, name,
                             extra_headers, sendfile=self.ctx.sendfile)


def keyed_tables(ctx: "Context", old: Mapping[str, "KeyedBlobs"], remotes: "Iterable[RemoteConfig]",
                 fmt: Any) -> dict[str, "KeyedBlobs"]:
    """The KeyedBlobs of ``remotes`` (one per remote, errors in ``fmt``), keeping
    the object of each remote that did not change (Built.reconfigure)."""
    from sparkcache.protocols._live import refreshed

    return refreshed(old, remotes, lambda r: KeyedBlobs(ctx, r, fmt), lambda b: b.remote)
