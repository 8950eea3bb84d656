"""``GET /admin/export`` and ``POST /admin/import``: air-gap bundles (docs/airgap.rst).

An export lists the chosen entries first (one SQLite query: the snapshot),
makes a ``git bundle`` of each chosen mirror (spawned git, into the spool),
then streams the tar (:class:`sparkcache.store.bundle.BundleWriter`) through
a push producer: a chunk is read only when the client's transport takes more.

An import's body goes straight into a spool (the ``admin`` body gate); the
whole archive is then read and verified in the I/O pool, and only a bundle
verified whole is committed, entry by entry through the store's commit
path, git bundles seeded into their mirrors. A client that leaves midway
does not stop an import that has begun: it ends whole either way.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

import sparkcache
from sparkcache.context import Context
from sparkcache.fetch.produce import shield
from sparkcache.store import Entry, Store
from sparkcache.store import bundle
from sparkcache.web.bodies import BodyDecision, ToSpool, checked, request_spool
from sparkcache.web.errors import JSON, HTTPError
from sparkcache.web.serve import _Producer

log = Logger()


def body_gate(ctx: Context) -> Callable[[Any], BodyDecision]:
    """The ``admin`` segment's body gate: an import's body goes straight into a
    spool, once its token is checked (no byte is stored for a refused one)."""

    def check(request: Any) -> BodyDecision:
        if request.method != b"POST" or request.path.rstrip(b"/") != b"/admin/import":
            return None
        ctx.auth.require(request, "admin")
        return ToSpool(ctx.store)

    return checked(JSON, check)


class AdminBundle:
    """The two handlers, routed by :class:`sparkcache.web.admin.AdminApp` (whose
    error handlers answer what they raise)."""

    def __init__(self, ctx: Context, services: Any = None) -> None:
        """``services``: where the git service (named ``git``) is, for its mirrors."""
        self.ctx = ctx
        self.services = services

    def git_mirrors(self) -> Any:
        """The daemon's git Mirrors, or None without the git protocol."""
        svc = self.services.namedServices.get("git") if self.services is not None else None
        return getattr(svc, "mirrors", None)

    async def export(self, request: Any) -> None:
        ctx = self.ctx
        ctx.auth.require(request, "admin")
        remotes = _args(request, "remote")
        for name in remotes:
            if name not in ctx.config.remotes and name not in ctx.internal_remotes:
                raise HTTPError(404, f"unknown remote {name!r}")
        since = _since(_arg(request, "since"))
        repos = _args(request, "repo")
        mirrors = await self._chosen_mirrors(repos, _arg(request, "git") in ("1", "true", "yes", "all") or bool(repos))
        store = ctx.store
        entries = await bundle.snapshot(store, remotes or None, since)
        now = ctx.clock.seconds()
        git_parts, git_skipped = await self._git_parts(store, mirrors)
        described = self._describe(remotes or sorted({e.remote for e in entries}))

        def build() -> tuple[dict[str, Any], bytes]:  # millions of entries: not on the reactor
            doc = bundle.manifest(sparkcache.__version__, described, entries, git_parts, now)
            doc["git_skipped"] = git_skipped
            return doc, bundle.encode(doc)

        try:
            doc, encoded = await store.in_io(build)
        except BaseException:
            for part in git_parts:
                store.discard(part.spool)
            raise
        writer = bundle.BundleWriter(store, doc, git_parts, now, encoded)
        request.setHeader(b"Content-Type", b"application/x-tar")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        request.setHeader(b"Content-Disposition", f'attachment; filename="sparkcache-{stamp}.tar"'.encode())
        request.setHeader(b"X-Bundle-Entries", str(len(entries)).encode())
        try:
            await send_bundle(request, writer)
        finally:
            writer.close()
            for part in git_parts:
                store.discard(part.spool)
        if writer.missing:
            log.info("export: {n} body(ies) went during the export; named in the trailer", n=len(writer.missing))

    async def import_(self, request: Any) -> bytes:
        ctx = self.ctx
        ctx.auth.require(request, "admin")
        maps = _maps(_args(request, "map"))
        for new in maps.values():
            if new not in ctx.config.remotes and new not in ctx.internal_remotes:
                raise HTTPError(400, f"--map target {new!r} is not a remote of this daemon")
        spool = await request_spool(request, ctx.store)
        try:
            # Its bodies are copied out of the archive before the archive goes: room for as much again.
            room = await ctx.store.make_room(spool.size)
        except BaseException:
            ctx.store.discard(spool)
            raise
        if not room:
            ctx.store.discard(spool)
            raise HTTPError(507, f"not enough free space to import a {spool.size}-byte bundle "
                                 "(it needs as much again while it is unpacked)")
        # Once begun, an import ends whole even if its client leaves.
        report = await shield(Deferred.fromCoroutine(self._import(spool, maps)))
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(report).encode() + b"\n"

    # -- export ---------------------------------------------------------------------------

    async def _chosen_mirrors(self, repos: list[str], want: bool) -> list[Any]:
        if not want:
            return []
        mirrors = self.git_mirrors()
        if mirrors is None:
            raise HTTPError(404, "this daemon has no git mirrors")
        if not repos:
            return list(await mirrors.present(mirrors.mirrors()))  # the cloned ones (stat calls in the pool)
        chosen = []
        for name in repos:
            reg = mirrors.registry.get(name) or mirrors.registry.by_url(name)
            if reg is None:
                raise HTTPError(404, f"unknown git repository {name!r}")
            chosen.append(mirrors.registry.mirror(reg))
        return chosen

    async def _git_parts(self, store: Store, chosen: list[Any]) -> tuple[list[bundle.GitPart], list[dict[str, str]]]:
        from sparkcache.git import airgap  # pygit2 and the git machinery: only when mirrors are exported

        parts: list[bundle.GitPart] = []
        skipped: list[dict[str, str]] = []
        try:
            for mirror in chosen:
                # git replaces the file by its path; discard() closes the descriptor and removes it.
                spool = store.new_spool("export-git-", scratch=True)
                made = Deferred.fromCoroutine(airgap.create_bundle(self.ctx.reactor, mirror, spool.path))
                try:
                    refs, head = await shield(made)
                    size, digest = await store.in_io(_measure, spool.path)
                except airgap.GitBundleError as e:
                    store.discard(spool)
                    skipped.append({"name": mirror.name, "url": mirror.url, "reason": str(e)})
                    continue
                except BaseException:
                    # The client left: the file goes once git is done writing it.
                    made.addBoth(lambda _, spool: store.discard(spool), spool)
                    raise
                parts.append(bundle.GitPart(mirror.name, mirror.url, refs, head, spool, size, digest))
        except BaseException:
            for part in parts:
                store.discard(part.spool)
            raise
        return parts, skipped

    def _describe(self, names: list[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name in names:
            r = self.ctx.config.remotes.get(name)
            if r is not None:
                out.append({"name": name, "type": r.type, "upstream": r.upstream})
            elif name in self.ctx.internal_remotes:
                rtype, _ = self.ctx.internal_remotes[name]
                out.append({"name": name, "type": rtype, "upstream": None, "internal": True})
            else:
                out.append({"name": name, "type": None, "upstream": None})
        return out

    # -- import ---------------------------------------------------------------------------

    async def _import(self, spool: Any, maps: dict[str, str]) -> dict[str, Any]:
        store = self.ctx.store
        try:
            with spool.reader() as reader:
                extracted = await store.in_io(bundle.extract, store, reader)
        except bundle.BundleError as e:
            raise HTTPError(400, f"bad bundle: {e}") from None
        finally:
            store.discard(spool)
        git_files, extracted.git = extracted.git, {}
        try:
            man = extracted.manifest
            entries, skipped_remotes, skipped_entries = await store.in_io(self._plan, man, maps, extracted)
            done = await bundle.commit_entries(store, extracted, entries)
            git = await self._load_git(man["git"], git_files)
        finally:
            extracted.discard(store)
            for f in git_files.values():
                store.discard(f)
        log.info("import: {n} entries imported, {p} already present, {s} skipped", n=done.entries, p=done.present,
                 s=skipped_entries)
        return {"format": man["format"], "source_version": man.get("source_version"), "imported": done.entries,
                "present": done.present, "kept_newer": done.kept_newer, "lost": done.lost,
                "skipped_entries": skipped_entries, "skipped_remotes": skipped_remotes,
                "missing_in_bundle": extracted.missing, "git": git}

    def _plan(self, man: dict[str, Any], maps: dict[str, str],
              extracted: bundle.Extracted) -> tuple[list[Entry], dict[str, str], int]:
        """The entries to commit, under this daemon's remote names, with its freshness
        (in the I/O pool: it reads the configuration only)."""
        ctx = self.ctx
        now = ctx.clock.seconds()
        types = {r.get("name"): r.get("type") for r in man["remotes"] if isinstance(r, dict)}
        skipped: dict[str, str] = {}
        out: list[Entry] = []
        n_skipped = 0
        for doc in man["entries"]:
            e = bundle.entry_from_doc(doc, now)
            if e.digest not in extracted.blobs:
                n_skipped += 1  # named missing in the trailer
                continue
            target = maps.get(e.remote, e.remote)
            why = self._refuse(e.remote, target, types.get(e.remote))
            key = bundle.map_key(e.key, e.remote, target) if why is None else None
            if why is None and key is None:
                why = f"its keys do not name the remote, so they cannot be mapped to {target!r}"
            if why is not None or key is None:
                skipped.setdefault(e.remote, why or "")
                n_skipped += 1
                continue
            expires = e.expires
            remote = ctx.config.remotes.get(target)
            if expires is not None and e.status == 200 and remote is not None:
                # Freshness as this daemon is configured: its TTL from the original fetch.
                expires = e.fetched + remote.cache.mutable_ttl
            out.append(Entry(key, target, e.path, e.status, e.digest, e.size, e.content_type, e.headers, e.fetched,
                             expires, e.etag, e.last_modified, now, e.pinned, e.kept))
        return out, skipped, n_skipped

    def _refuse(self, source: str, target: str, rtype: Any) -> str | None:
        ctx = self.ctx
        remote = ctx.config.remotes.get(target)
        if remote is not None:
            if rtype is not None and remote.type != rtype:
                return f"{target!r} here is a {remote.type} remote, the bundle's {source!r} a {rtype} one"
            return None
        if target in ctx.internal_remotes:
            return None
        return f"no remote {target!r} on this daemon (map it with --map {source}=NAME)"

    async def _load_git(self, docs: list[dict[str, Any]], files: dict[int, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        mirrors = self.git_mirrors()
        if mirrors is not None and docs:  # pygit2: only for a daemon with git (protocols/git/lazy.py)
            from sparkcache.git import airgap
        for n, doc in enumerate(docs):
            row: dict[str, Any] = {"name": doc["name"], "url": doc["url"]}
            out.append(row)
            if mirrors is None:
                row.update(status="skipped", reason="this daemon has no git mirrors")
                continue
            mirror = airgap.target_mirror(mirrors, doc["name"], doc["url"])
            if mirror is None:
                row.update(status="skipped", reason="not in git.repos and not on an allowed host")
                continue
            try:
                await airgap.load_bundle(mirrors, mirror, files[n].path)
            except airgap.GitBundleError as e:
                row.update(status="failed", mirror=mirror.name, reason=str(e))
                continue
            row.update(status="imported", mirror=mirror.name, refs=len(doc.get("refs") or {}))
        return out


def _measure(path: str) -> tuple[int, str]:
    import hashlib

    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class _Chunks:
    """The writer's chunks in the shape serve's push producer pulls from: what is
    available is the next chunk, made when asked for; b"" from the writer is the end."""

    def __init__(self, writer: bundle.BundleWriter) -> None:
        self.writer = writer
        self.wake: Callable[[], None] = lambda: None
        self.waiting = False
        self.pending: bytes | None = None
        self.sent = 0
        self.done = False
        self.error: Exception | None = None

    def _fill(self) -> None:
        while self.pending is None and not self.done and self.error is None and not self.waiting:
            try:
                chunk = self.writer.read()
            except Exception as e:  # a body found short: the response must break off, never end cleanly
                log.error("export cut off: {why}", why=e)
                self.error = e
                return
            if isinstance(chunk, Deferred):  # park until the body is at hand (or read on if it already is)
                self.waiting = True
                chunk.addErrback(lambda f: log.failure("export: bringing a body into the local tier", f))
                chunk.addBoth(self._ready)
            elif chunk:
                self.pending = chunk
            else:
                self.done = True

    def _ready(self, _: object) -> None:
        self.waiting = False
        self.wake()

    def available(self) -> int:
        self._fill()
        return self.sent + len(self.pending or b"")

    def failed(self) -> bool:
        self._fill()
        return self.error is not None

    def read(self, offset: int, n: int) -> bytes:
        chunk, self.pending = self.pending or b"", None
        self.sent += len(chunk)
        return chunk


def send_bundle(request: Any, writer: bundle.BundleWriter) -> Deferred[None]:
    """Stream the archive with backpressure: a chunk is made only when the
    client's transport takes more (serve's push producer)."""
    chunks = _Chunks(writer)
    producer = _Producer(request, chunks.read, 0, None, available=chunks.available, failed=chunks.failed,
                         ended=lambda: chunks.done)
    chunks.wake = producer.wake
    return producer.start()


def _arg(request: Any, name: str) -> str | None:
    values = _args(request, name)
    return values[-1] if values else None


def _args(request: Any, name: str) -> list[str]:
    raw = (getattr(request, "args", None) or {}).get(name.encode(), [])
    try:
        return [v.decode("utf-8") for v in raw if v]
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name!r} must be UTF-8") from None


def _since(value: str | None) -> float | None:
    """``since``: seconds since the epoch, or an ISO 8601 date/time (UTC unless it says)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPError(400, f"since must be seconds since the epoch or an ISO 8601 time, not {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _maps(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise HTTPError(400, f"map takes OLD=NEW, not {item!r}")
        out[old] = new
    return out
