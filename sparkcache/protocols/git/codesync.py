"""Read endpoints over git mirrors, and code sync.

``/archive``, ``/file``, ``/tree-hash``, ``/branch-contains`` read a mirror
with pygit2 in the git pool; archives (and large files) are built once into
the store by the cache's engine (a ``ThreadBuild`` source), keyed by commit
(blob) id, streamed to every request while they are built, and then served
like any cache hit (Range, ETag, sendfile). ``/upload`` turns a tarball into a
normalized tar.gz (built the same way) named by its git tree id,
``/uploads/<id>`` serves it, ``/sync/negotiate`` finds the newest commit a
client and the mirror share, and ``/sync/seed`` creates or updates a mirror
from a ``git bundle``. See docs/git-read-api.rst.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qs

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource

from sparkcache.context import Context
from sparkcache.fetch.cache import Failed, Hit, Result, Target
from sparkcache.fetch.produce import shield
from sparkcache.fetch.sources import ThreadBuild
from sparkcache.git import reads, uploads
from sparkcache.git.interfaces import IMirrors, Mirror, MirrorUnavailable, UnknownRepo
from sparkcache.protocols.git.policy import require_registration
from sparkcache.protocols.git.errors import READ_API
from sparkcache.store import Entry, SpoolFile
from sparkcache.web.bodies import BodyDecision, InMemory, Refuse, ToSpool, announced_length, checked, request_spool
from sparkcache.web.errors import ErrorReply, HTTPError, add_error_handling, guarded
from sparkcache.web.paths import vet_request
from sparkcache.web.respond import guess_type, respond
from sparkcache.web.serve import header

T = TypeVar("T")
log = Logger()

# Files up to this size are answered from memory; larger ones go through the
# store, so they get Range and a file producer instead of one huge write().
INLINE_MAX = 1 << 20
MAX_JSON = 1 << 20
MAX_NEGOTIATE = 10_000
MAX_BUNDLE = 16 << 30
BUILD_SLOTS = 2
# Seconds during which a commit id that one upstream fetch did not bring
# answers 404 without fetching again (as the clone path does).
MISSING_RETRY = 10.0
# Entry.remote for what this app stores: '@' cannot start a remote name, so
# no /api/<remote>/ purge or listing can reach these entries.
GIT_REMOTE = "@git"
UPLOAD_REMOTE = "@upload"
_UPLOAD_ID = re.compile(r"^[0-9a-f]{40}$")
_COMMIT = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


def _json(request: Any, obj: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-cache")
    return json.dumps(obj).encode() + b"\n"


def _arg(request: Any, name: str, default: str | None = None, required: bool = False) -> str | None:
    # From the URL only: twisted.web merges the fields of a form-encoded POST
    # body into request.args, and `curl --data-binary` labels a tarball so.
    values = parse_qs(request.uri.partition(b"?")[2]).get(name.encode())
    if not values:
        if required:
            raise HTTPError(400, f"query parameter {name}= is required")
        return default
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name}= is not valid UTF-8") from None


def _etag_matches(request: Any, etag: str) -> bool:
    inm = header(request, b"if-none-match")
    return bool(inm) and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")])  # type: ignore[union-attr]


def _not_modified(request: Any, etag: str) -> bytes:
    request.setHeader(b"ETag", etag.encode())
    request.setResponseCode(304)
    return b""


def _read_small(content: Any, limit: int) -> bytes:
    content.seek(0)
    data = bytes(content.read(limit + 1))
    if len(data) > limit:
        raise HTTPError(413, f"body larger than {limit} bytes")
    return data


class CodeSyncApp:
    app = Klein()

    def __init__(self, ctx: Context, mirrors: IMirrors, reactor: Any, pool: ThreadPool,
                 limits: uploads.Limits | None = None) -> None:
        self.ctx = ctx
        self._gate = checked(READ_API, self._body_checks)
        # Typed loosely: acquire/release are optional extras of an IMirrors.
        self.mirrors: Any = mirrors
        self.reactor = reactor
        self.pool = pool
        self.limits = limits or uploads.Limits()
        self.build_slots = DeferredSemaphore(BUILD_SLOTS)
        # (mirror path, commit id) → when a fetch last failed to bring it.
        self._missed: dict[tuple[str, str], float] = {}

    def resource(self) -> IResource:
        return guarded(self.app, READ_API, self.ctx.config.server.max_path_length)

    add_error_handling(app, READ_API)

    # -- plumbing -------------------------------------------------------------------------

    def in_pool(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    async def mirror(self, name: str) -> Mirror:
        if getattr(getattr(self.mirrors, "registry", None), "changes", None) is not None:
            await self.mirrors.synced()  # worker processes: registrations another one made
        m = self.mirrors.lookup(name)
        return await shield(self.mirrors.ensure(m))  # type: ignore[no-any-return]

    def guarded(self, mirror: Mirror, d: Deferred[T]) -> Deferred[T]:
        """Mark ``mirror`` in use until ``d`` fires (no pruning repack meanwhile);
        the caller waits on a shielded copy, so a departing client does not end
        the guard while the thread still reads."""
        acquire, release = getattr(self.mirrors, "acquire", None), getattr(self.mirrors, "release", None)
        if acquire is None or release is None:
            return shield(d)
        acquire(mirror)

        def done(r: Any) -> Any:
            release(mirror)
            return r

        return shield(d.addBoth(done))

    def on_mirror(self, mirror: Mirror, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """``fn(mirror.path, *args)`` in the git pool."""
        return self.guarded(mirror, self.mirrors.run(fn, mirror.path, *args))

    async def read(self, mirror: Mirror, fn: Callable[..., T], *args: Any) -> T:
        """``fn(mirror.path, *args)`` in the git pool; when a full commit id is
        unknown (pushed a moment ago), fetch upstream once and try again."""
        try:
            return await self.on_mirror(mirror, fn, *args)
        except reads.UnknownRevision as e:
            spec = e.spec.lower()
            if not reads.is_full_hex(spec):
                raise
            # An id that one fetch did not bring does not start another for a
            # while: random ids must not turn into a stream of upstream fetches.
            key, now = (mirror.path, spec), self.ctx.clock.seconds()
            if now - self._missed.get(key, -MISSING_RETRY) < MISSING_RETRY:
                raise
        try:
            await shield(self.mirrors.refresh(mirror))
        except CancelledError:
            raise
        except Exception as e:
            log.info("refresh of {name} for a missing commit failed: {why}", name=mirror.name, why=e)
        try:
            return await self.on_mirror(mirror, fn, *args)
        except reads.UnknownRevision:
            if len(self._missed) > 10_000:
                self._missed.clear()
            self._missed[key] = self.ctx.clock.seconds()
            raise

    async def cached(self, mirror: Mirror, key: str, build: Callable[[str, Any], Any], headers: dict[str, str],
                     etag: str) -> Result:
        """The store entry under ``key``, or the build that makes it: ``build(mirror.path, out)``
        runs once in the git pool while every request for it tails its output."""

        def in_build_slot(job: Callable[[], Any]) -> Deferred[Any]:
            # Builds take seconds of a git pool thread each: leave the
            # other threads to fetches and quick reads.
            return self.build_slots.run(self.on_mirror, mirror, lambda _path: job())

        source = ThreadBuild(lambda out: build(mirror.path, out), {**headers, "etag": etag}, run=in_build_slot)
        return await self.ctx.cache.get(Target(key, GIT_REMOTE, key), source)

    # -- reads ------------------------------------------------------------------------------

    def _target(self, request: Any) -> tuple[str, str, str]:
        repo = _arg(request, "repo", required=True)
        branch = _arg(request, "branch", "HEAD")
        path = reads.normalize_path(_arg(request, "path", ""))
        assert repo is not None and branch is not None
        return repo, branch, path

    @app.route("/archive", methods=["GET", "HEAD"])
    async def archive(self, request: Any) -> Any:
        self.ctx.auth.require(request, "read")
        repo, branch, subdir = self._target(request)
        mirror = await self.mirror(repo)
        commit, tree, kind = await self.read(mirror, reads.tree_hash, branch, subdir)
        if kind != "tree":
            raise HTTPError(400, f"{subdir!r} is not a directory; use /file")
        # A subdirectory's archive is fixed by the commit (its time) and the tree.
        etag = f'"{commit}:{tree}"' if subdir else f'"{commit}"'
        request.setHeader(b"X-Git-Commit", commit.encode())
        if _etag_matches(request, etag):
            return _not_modified(request, etag)
        base = posixpath.basename((subdir or mirror.name).rstrip("/")).removesuffix(".git") or "archive"
        filename = f"{base}-{commit[:12]}.tar.gz"
        headers = {"content-type": "application/gzip", "content-disposition": f'attachment; filename="{filename}"'}
        key = f"archive/{mirror.name}/{commit}/{tree}.tar.gz" if subdir else f"archive/{mirror.name}/{commit}.tar.gz"
        result = await self.cached(
            mirror, key, lambda path, out: reads.write_archive(path, commit, out, subdir), headers, etag,
        )
        return await respond(request, result, self.ctx.store, self.ctx.metrics, GIT_REMOTE, filename,
                             sendfile=self.ctx.sendfile)

    @app.route("/file", methods=["GET", "HEAD"])
    async def file(self, request: Any) -> Any:
        self.ctx.auth.require(request, "read")
        repo, branch, path = self._target(request)
        mirror = await self.mirror(repo)
        commit, blob, mode, size = await self.read(mirror, reads.file_info, branch, path)
        etag = f'"{blob}"'
        request.setHeader(b"X-Git-Commit", commit.encode())
        request.setHeader(b"X-Git-Mode", b"%o" % mode)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-cache")
        if _etag_matches(request, etag):
            return _not_modified(request, etag)
        if size > INLINE_MAX:
            result = await self.cached(
                mirror, f"file/{mirror.name}/{blob}", lambda p, out: reads.blob_to_file(p, blob, out), {}, etag,
            )
            return await respond(request, result, self.ctx.store, self.ctx.metrics, GIT_REMOTE, path,
                                 sendfile=self.ctx.sendfile)
        data = await self.on_mirror(mirror, reads.read_blob, blob)
        request.setHeader(b"ETag", etag.encode())
        request.setHeader(b"Content-Type", guess_type(path).encode("latin-1"))
        name = posixpath.basename(path).replace('"', "")
        request.setHeader(b"Content-Disposition", f'attachment; filename="{name}"'.encode())
        return data

    @app.route("/tree-hash", methods=["GET", "HEAD"])
    async def tree_hash(self, request: Any) -> Any:
        self.ctx.auth.require(request, "read")
        repo, branch, path = self._target(request)
        mirror = await self.mirror(repo)
        commit, oid, kind = await self.read(mirror, reads.tree_hash, branch, path)
        etag = f'"{oid}"'
        request.setHeader(b"X-Git-Commit", commit.encode())
        if _etag_matches(request, etag):
            return _not_modified(request, etag)
        request.setHeader(b"ETag", etag.encode())
        if (header(request, b"accept") or "").startswith("text/plain"):
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Cache-Control", b"no-cache")
            return oid.encode() + b"\n"
        return _json(request, {"repo": mirror.name, "branch": branch, "commit": commit, "path": path,
                               "type": kind, "hash": oid})

    @app.route("/branch-contains", methods=["GET", "HEAD"])
    async def branch_contains(self, request: Any) -> Any:
        self.ctx.auth.require(request, "read")
        repo, branch, _ = self._target(request)
        commit = _arg(request, "commit", required=True)
        assert commit is not None
        mirror = await self.mirror(repo)
        try:
            tip, full, contained = await self.read(mirror, reads.branch_contains, branch, commit)
        except reads.UnknownRevision as e:
            if e.spec != commit or not reads.is_full_hex(commit.lower()):
                raise
            # The branch resolved but the commit is unknown even after a fetch.
            raise reads.ReadError(404, f"commit {commit} is not in this mirror") from None
        return _json(request, {"repo": mirror.name, "branch": branch, "branch_commit": tip, "commit": full,
                               "contains": contained})

    # -- request bodies -------------------------------------------------------------------

    def body_gate(self, request: Any) -> BodyDecision:
        """Where a request's body goes, by the checks the handlers make before reading it."""
        return self._gate(request)

    def _body_checks(self, request: Any) -> BodyDecision:
        vet_request(request, self.ctx.config.server.max_path_length)
        if request.method != b"POST":
            return None
        if request.path == b"/upload":
            self._upload_args(request)
            return ToSpool(self.ctx.store, self.limits.body, self._too_large(self.limits.body, "upload"))
        if request.path == b"/sync/seed":
            self._seed_args(request)
            return ToSpool(self.ctx.store, MAX_BUNDLE, self._too_large(MAX_BUNDLE, "body"))
        if request.path == b"/sync/negotiate":
            self.ctx.auth.require(request, "read")
            return InMemory(MAX_JSON, self._too_large(MAX_JSON, "body"))
        return None

    @staticmethod
    def _too_large(limit: int, what: str) -> Refuse:
        return Refuse(READ_API, ErrorReply(413, f"{what} larger than {limit} bytes"))

    async def _request_body(self, request: Any, limit: int, what: str) -> SpoolFile:
        """The request's body as a spool of the caller's (the very file it was written to)."""
        spool = await request_spool(request, self.ctx.store)
        if spool.size > limit:
            self.ctx.store.discard(spool)
            raise HTTPError(413, f"{what} larger than {limit} bytes")
        return spool

    # -- code sync -------------------------------------------------------------------------

    def _upload_args(self, request: Any) -> tuple[str | None, str | None]:
        """(repo, base) of an upload, once its scope and announced size are checked."""
        self.ctx.auth.require(request, "write")
        repo, base = _arg(request, "repo"), _arg(request, "base")
        if bool(repo) != bool(base):
            raise HTTPError(400, "an incremental upload needs both repo= and base=")
        length = announced_length(request)
        if length is not None and length > self.limits.body:
            raise HTTPError(413, f"upload larger than {self.limits.body} bytes")
        return repo, base

    @app.route("/upload", methods=["POST"])
    async def upload(self, request: Any) -> Any:
        repo, base = self._upload_args(request)
        spool = await self._request_body(request, self.limits.body, "upload")
        try:
            mirror = await self.mirror(repo) if repo else None
        except BaseException:
            self.ctx.store.discard(spool)
            raise
        # The work outlives a client that goes away mid-way (Klein cancels the
        # handler), so its spool files are always cleaned up by the job itself.
        body, created = await shield(ensureDeferred(self.process_upload(spool, mirror, base)))
        return _json(request, body, 201 if created else 200)

    async def process_upload(self, body: SpoolFile, mirror: Mirror | None,
                             base: str | None) -> tuple[dict[str, Any], bool]:
        """Turn the uploaded tarball in ``body`` (consumed) into a stored, normalized tree."""
        store = self.ctx.store
        blobs = store.new_spool("upload-", scratch=True)
        try:
            with body.reader() as src:
                tree = await self.in_pool(uploads.parse, src, blobs, self.limits)
        except BaseException:
            store.discard(blobs)
            raise
        finally:
            store.discard(body)
        try:
            base_commit = None
            if mirror is not None:
                assert base is not None
                base_commit = await self.read(mirror, lambda p, b: uploads.apply_base(tree, p, b), base)
            upload_id = await self.in_pool(uploads.tree_id, tree.files)
            key = f"upload/{upload_id}"
            headers = {"content-type": "application/gzip",
                       "content-disposition": f'attachment; filename="{upload_id}.tar.gz"'}
            entry, state = await self.cached_upload(key, tree, headers, f'"{upload_id}"', mirror)
        finally:
            store.discard(blobs)
        reply: dict[str, Any] = {"id": upload_id, "sha256": entry.digest, "size": entry.size, "files": len(tree.files),
                                "url": f"/uploads/{upload_id}", "created": state == "MISS", "skipped": tree.skipped}
        if base_commit is not None:
            reply["base"] = base_commit
        return reply, state == "MISS"

    async def cached_upload(self, key: str, tree: uploads.Tree, headers: dict[str, str], etag: str,
                            mirror: Mirror | None) -> tuple[Entry, str]:
        def run(job: Callable[[], Any]) -> Deferred[Any]:
            d = self.in_pool(job)
            return self.guarded(mirror, d) if mirror is not None else d

        source = ThreadBuild(lambda out: uploads.write_normalized(tree, out), {**headers, "etag": etag}, run=run)
        # Kept: no purge of the cache removes an upload (its only copy), though
        # eviction under storage.max_size may (the client can upload it again).
        result = await self.ctx.cache.get(Target(key, UPLOAD_REMOTE, key, kept=True), source)
        if isinstance(result, Hit):
            return result.entry, "HIT"
        if isinstance(result, Failed):
            raise HTTPError(result.status, result.message)
        flight = await result.flight.wait_done()
        return flight.entry, "MISS"

    @app.route("/uploads/<upload_id>", methods=["GET", "HEAD"])
    async def get_upload(self, request: Any, upload_id: str) -> Any:
        self.ctx.auth.require(request, "read")
        if not _UPLOAD_ID.match(upload_id):
            raise HTTPError(404, "an upload id is 40 lowercase hex digits")
        entry = await self.ctx.store.index.get(f"upload/{upload_id}")
        if entry is None or entry.status != 200:
            raise HTTPError(404, f"no upload {upload_id}")
        self.ctx.store.index.touch(entry, self.ctx.clock.seconds())
        return await respond(request, Hit(entry, "HIT"), self.ctx.store, self.ctx.metrics, UPLOAD_REMOTE,
                             f"{upload_id}.tar.gz", sendfile=self.ctx.sendfile)

    @app.route("/sync/negotiate", methods=["POST"])
    async def negotiate(self, request: Any) -> Any:
        self.ctx.auth.require(request, "read")
        raw = await self.in_pool(_read_small, request.content, MAX_JSON)
        try:
            body = json.loads(raw)
            repo, commits = body["repo"], body["commits"]
            assert isinstance(repo, str) and isinstance(commits, list)
            assert all(isinstance(c, str) for c in commits)
        except Exception:
            raise HTTPError(400, 'expected a JSON body {"repo": "...", "commits": ["<id>", ...]}') from None
        if len(commits) > MAX_NEGOTIATE:
            raise HTTPError(400, f"at most {MAX_NEGOTIATE} commits")
        commits = [c.lower() for c in commits]
        bad = [c for c in commits if not _COMMIT.match(c)]
        if bad:
            raise HTTPError(400, f"not a full commit id: {bad[0][:80]!r}")
        mirror = await self.mirror(repo)
        found = await self.on_mirror(mirror, reads.newest_known, commits)
        return _json(request, {"repo": mirror.name, "commit": found,
                               "index": commits.index(found) if found is not None else None})

    def _seed_args(self, request: Any) -> tuple[str, str | None]:
        self.ctx.auth.require(request, "write")
        url = _arg(request, "repo", required=True)
        assert url is not None
        require_registration(self.ctx, request, self.mirrors, url)
        return url, _arg(request, "name")

    @app.route("/sync/seed", methods=["POST"])
    async def seed(self, request: Any) -> Any:
        url, name = self._seed_args(request)
        spool = await self._request_body(request, MAX_BUNDLE, "body")
        result = await shield(ensureDeferred(self.process_seed(spool, url, name)))
        return _json(request, result)

    async def process_seed(self, bundle: SpoolFile, url: str, name: str | None) -> dict[str, Any]:
        """Seed a mirror from the git bundle in ``bundle`` (consumed): git reads that file itself."""
        store = self.ctx.store
        try:
            head = await store.in_io(_head, bundle)
            if not head.startswith((b"# v2 git bundle\n", b"# v3 git bundle\n")):
                raise HTTPError(400, "the body is not a git bundle (git bundle create ...)")
            try:
                mirror = await shield(self.mirrors.seed(url, bundle.path, name))
            except (UnknownRepo, MirrorUnavailable):
                raise
            except ValueError as e:
                raise HTTPError(400, f"bundle rejected: {e}") from None
            refs = await self.on_mirror(mirror, reads.list_refs)
            offered = await store.in_io(_bundle_refs, bundle)
        finally:
            store.discard(bundle)
        # A ref the mirror holds at another value than the bundle's was not moved:
        # the mirror's is newer (or diverged), and seeding only fast-forwards.
        skipped = sorted(n for n, sha in offered.items() if refs.get(n) != sha)
        return {"name": mirror.name, "url": mirror.url, "refs": refs, "skipped": skipped}


def _head(bundle: SpoolFile) -> bytes:
    with bundle.reader() as f:
        return f.read(64)


def _bundle_refs(bundle: SpoolFile) -> dict[str, str]:
    """The refs a bundle's header lists, {refname: id} (blocking: runs in a thread)."""
    out: dict[str, str] = {}
    with bundle.reader() as f:
        f.readline()  # the signature, checked already
        for _ in range(1_000_000):
            line = f.readline(4096).rstrip(b"\n")
            if not line:
                break
            if line[:1] in (b"-", b"@"):
                continue  # a prerequisite, or a v3 capability
            sha, _, name = line.decode("utf-8", "replace").partition(" ")
            if name.startswith("refs/"):
                out[name] = sha
    return out

