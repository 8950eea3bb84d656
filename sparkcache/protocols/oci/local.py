"""``type: oci-local`` remotes: push repositories (OCI distribution-spec "push").

The /v2/ router (``sparkcache.protocols.oci``) picks the remote and the
repository name; everything under ``<repo>/`` is answered here. Responses
follow what ``distribution`` answers (202 + ``Location`` + ``Range: 0-N`` +
``Docker-Upload-UUID`` for upload sessions, 201 for a finished blob or
manifest), since that is what clients are tested against.

Storage: every body lives in the content store; index rows name it. Rows are
committed pinned: pushed content exists nowhere else, so neither eviction nor
a cache purge may remove it (deleting a blob or manifest by its key does).

* ``<remote>:<repo>/_layers/sha256:<hex>``      a blob linked into a repository
* ``<remote>:<repo>/_manifests/sha256:<hex>``   a manifest, exact bytes + Content-Type
* ``<remote>:<repo>/_manifests/<tag>``          a tag: same body as its manifest

``_layers``/``_manifests`` cannot be repository path components (those start
with a letter or digit), so one repository's rows never look like another's.
Upload sessions are spool files in memory's keeping until they finish, are
cancelled or sit idle for an hour; a restart clears them (the spool is
emptied at start-up), and the client starts its upload again.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode

from twisted.internet.defer import Deferred, ensureDeferred

from sparkcache.config import RemoteConfig
from sparkcache.context import Context
from sparkcache.fetch import Target
from sparkcache.fetch.flight import BodyError
from sparkcache.fetch.produce import shield
from sparkcache.protocols.oci.errors import OCI, OCIError, as_oci
from sparkcache.protocols.oci.manifests import parse_manifest
from sparkcache.protocols.oci.mirror import accepted_types
from sparkcache.protocols.oci.setup import authorize
from sparkcache.store import Entry, SpoolFile
from sparkcache.web.bodies import BodyDecision, InMemory, Refuse, ToSpool, announced_length, body_size, request_spool
from sparkcache.web.errors import ErrorReply
from sparkcache.web.respond import serve_hit
from sparkcache.web.serve import header

# A repository name (distribution-spec "pulling manifests": <name>) and a tag.
NAME = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
DIGEST = re.compile(r"^sha256:([a-f0-9]{64})$")
ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")

# The spec asks registries to accept manifests of at least 4 MiB; bigger ones
# are read whole to be parsed, so they are refused.
MAX_MANIFEST = 4 << 20
MAX_UPLOADS = 128  # each holds an open spool file
UPLOAD_IDLE = 3600.0
TAGS_PAGE = 1000

BLOB_TYPE = "application/octet-stream"


@dataclass
class Upload:
    uuid: str
    remote: str
    repo: str
    spool: SpoolFile
    touched: float
    busy: bool = False


class LocalRegistry:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.uploads: dict[str, Upload] = {}

    # -- routing ---------------------------------------------------------------------

    def check(self, request: Any, remote: RemoteConfig, repo: str, tail: list[str]) -> None:
        """What every request under ``repo`` passes first: a valid name, the
        remote's allow-list, the scope (write for anything but reads)."""
        if not NAME.match(repo) or len(repo) > 255:
            raise OCIError("NAME_INVALID", f"invalid repository name {repo!r}")
        options = remote.options
        if options is not None and hasattr(options, "allows") and not options.allows(repo):
            raise OCIError("DENIED", f"repository {repo!r} is not allowed in {remote.name!r}", 403)
        base = _base(request, tail)
        # Upload sessions belong to pushers, even for a status GET.
        reading = request.method in (b"GET", b"HEAD") and tail[:2] != ["blobs", "uploads"]
        authorize(self.ctx, request, "read" if reading else "write",
                  f"repository:{_client_prefix(base, repo)}{repo}:{'pull' if reading else 'pull,push'}")

    def body_decision(self, request: Any, remote: RemoteConfig, repo: str, tail: list[str]) -> BodyDecision:
        """Where the body of a request under ``repo`` goes, by the checks its
        handler makes before reading it: blob bytes into a spool (committed or
        made an upload session's without a copy), a manifest into memory."""
        self.check(request, remote, repo, tail)
        method = request.method
        if len(tail) == 2 and tail[0] == "manifests" and method == b"PUT":
            _ref(tail[1])
            _manifest_size(announced_length(request) or 0)
            return InMemory(MAX_MANIFEST, Refuse(OCI, ErrorReply(
                413, f"manifest larger than the {MAX_MANIFEST} byte limit", code="SIZE_INVALID")))
        if len(tail) == 3 and tail[:2] == ["blobs", "uploads"]:
            session = tail[2]
            if session == "" and method == b"POST":
                return ToSpool(self.ctx.store)
            if session != "" and method in (b"PATCH", b"PUT"):
                self._session(remote, repo, session, busy_ok=True)
                return ToSpool(self.ctx.store)
        return None

    async def dispatch(self, request: Any, remote: RemoteConfig, repo: str, tail: list[str]) -> bytes | None:
        self.check(request, remote, repo, tail)
        method = request.method
        base = _base(request, tail)
        if len(tail) == 2 and tail[0] == "manifests":
            ref = tail[1]
            if method in (b"GET", b"HEAD"):
                return await self.get_manifest(request, remote, repo, ref)
            if method == b"PUT":
                return await self.put_manifest(request, remote, repo, ref, base)
            if method == b"DELETE":
                return await self.delete_manifest(request, remote, repo, ref)
            raise _method(method, "GET, HEAD, PUT, DELETE")
        if len(tail) == 2 and tail[0] == "blobs":
            digest = tail[1]
            if method in (b"GET", b"HEAD"):
                return await self.get_blob(request, remote, repo, digest)
            if method == b"DELETE":
                return await self.delete_blob(request, remote, repo, digest)
            raise _method(method, "GET, HEAD, DELETE")
        if len(tail) == 3 and tail[:2] == ["blobs", "uploads"]:
            session = tail[2]
            if session == "":
                if method == b"POST":
                    return await self.start_upload(request, remote, repo, base)
                raise _method(method, "POST")
            if method == b"PATCH":
                return await self.patch_upload(request, remote, repo, session, base)
            if method == b"PUT":
                return await self.finish_upload(request, remote, repo, session, base)
            if method == b"GET":
                return self.upload_status(request, remote, repo, session, base)
            if method == b"DELETE":
                return self.cancel_upload(request, remote, repo, session)
            raise _method(method, "GET, PATCH, PUT, DELETE")
        if tail == ["tags", "list"]:
            if method in (b"GET", b"HEAD"):
                return await self.tags(request, remote, repo, base)
            raise _method(method, "GET, HEAD")
        raise OCIError("NAME_UNKNOWN", f"no such endpoint under repository {repo!r}", 404)

    # -- blobs -------------------------------------------------------------------------

    async def get_blob(self, request: Any, remote: RemoteConfig, repo: str, digest: str) -> bytes | None:
        hexd = _digest(digest)
        entry = await self.ctx.store.index.get(_key(remote, repo, "_layers", digest))
        if entry is None:
            raise OCIError("BLOB_UNKNOWN", f"blob {digest} is not in {repo!r}", detail={"digest": digest})
        return await self._serve(request, remote, entry, "sha256:" + hexd)

    async def delete_blob(self, request: Any, remote: RemoteConfig, repo: str, digest: str) -> bytes:
        _digest(digest)
        if not await self.ctx.store.purge_key(_key(remote, repo, "_layers", digest)):
            raise OCIError("BLOB_UNKNOWN", f"blob {digest} is not in {repo!r}", detail={"digest": digest})
        return _empty(request, 202, {"Docker-Content-Digest": digest})

    async def start_upload(self, request: Any, remote: RemoteConfig, repo: str, base: str) -> bytes:
        args = _query(request)
        mount, source = args.get("mount"), args.get("from")
        if mount is not None and source is not None:
            linked = await self._mount(request, remote, repo, mount, source, base)
            if linked is not None:
                return linked
            # Not mountable: fall through to an ordinary upload session, as the spec says.
        digest = args.get("digest")
        if digest is not None:
            # A monolithic upload: the request's spool is the blob.
            hexd = _digest(digest)
            spool = await request_spool(request, self.ctx.store)
            return await self._commit_blob(request, remote, repo, spool, hexd, base)
        self._sweep()
        if len(self.uploads) >= MAX_UPLOADS:
            raise OCIError("TOOMANYREQUESTS", "too many unfinished uploads; finish or cancel some", 429)
        up = Upload(uuidlib.uuid4().hex, remote.name, repo, self.ctx.store.new_spool("up-"), self.ctx.clock.seconds())
        self.uploads[up.uuid] = up
        # A POST may carry the first bytes already (some clients do).
        await self._append(request, up)
        return self._session_reply(request, up, base, 202)

    async def _mount(self, request: Any, remote: RemoteConfig, repo: str, digest: str, source: str,
                     base: str) -> bytes | None:
        hexd = _digest(digest)
        # ``from`` is named as the client names repositories, which for
        # path routing includes the remote's prefix: strip what this
        # request's own name adds in front of ``repo``.
        prefix = _client_prefix(base, repo)
        if not source.startswith(prefix):
            return None
        source = source[len(prefix):]
        if not NAME.match(source):
            return None
        src = await self.ctx.store.index.get(_key(remote, source, "_layers", digest))
        if src is None or src.digest != hexd:
            return None
        now = self.ctx.clock.seconds()
        if not await self.ctx.store.link(_blob_entry(remote, repo, hexd, src.size, now)):
            return None  # deleted meanwhile: the client uploads it instead
        return _empty(request, 201, {"Location": f"{base}/blobs/{digest}", "Docker-Content-Digest": digest})

    async def patch_upload(self, request: Any, remote: RemoteConfig, repo: str, session: str, base: str) -> bytes:
        up = self._session(remote, repo, session)
        crange = header(request, b"content-range")
        if crange is not None:
            m = re.match(r"^\s*(?:bytes[ =])?\s*(\d+)-(\d+)(?:/(?:\d+|\*))?\s*$", crange)
            if not m or int(m.group(1)) != up.spool.size:
                # The only chunk we can take next starts where the last ended.
                raise OCIError("RANGE_INVALID", f"upload is at {up.spool.size} bytes; Content-Range {crange!r} does not continue it",
                               416, headers=self._session_headers(up, base))
            want = int(m.group(2)) - int(m.group(1)) + 1
            got = body_size(request)
            if got != want:
                raise OCIError("BLOB_UPLOAD_INVALID", f"Content-Range says {want} bytes, body has {got}", 400)
        await self._append(request, up)
        up.touched = self.ctx.clock.seconds()
        return self._session_reply(request, up, base, 202)

    async def finish_upload(self, request: Any, remote: RemoteConfig, repo: str, session: str, base: str) -> bytes:
        up = self._session(remote, repo, session)
        digest = _query(request).get("digest")
        if digest is None:
            raise OCIError("DIGEST_INVALID", "finishing an upload needs ?digest=sha256:<hex>")
        hexd = _digest(digest)
        # The session ends here whatever happens: a failed finish is restarted by
        # clients. Its work goes on when the client leaves, so that the session's
        # spool is committed or discarded, never left behind.
        del self.uploads[up.uuid]

        async def finish() -> bytes:
            await self._append(request, up)
            return await self._commit_blob(request, remote, repo, up.spool, hexd, base)

        return await shield(ensureDeferred(finish()))

    def upload_status(self, request: Any, remote: RemoteConfig, repo: str, session: str, base: str) -> bytes:
        up = self._session(remote, repo, session, busy_ok=True)
        return self._session_reply(request, up, base, 204)

    def cancel_upload(self, request: Any, remote: RemoteConfig, repo: str, session: str) -> bytes:
        up = self._session(remote, repo, session)
        self._drop(up)
        return _empty(request, 204)

    async def _commit_blob(self, request: Any, remote: RemoteConfig, repo: str, spool: SpoolFile, hexd: str,
                           base: str) -> bytes:
        """Commit ``spool`` (consumed either way) as blob ``hexd`` of ``repo``: the file itself, pinned."""
        if spool.hexdigest() != hexd:
            self.ctx.store.discard(spool)
            raise OCIError("DIGEST_INVALID", f"uploaded content has digest sha256:{spool.hexdigest()}, not sha256:{hexd}",
                           detail={"digest": f"sha256:{hexd}"})
        path = f"{repo}/_layers/sha256:{hexd}"
        target = Target(f"{remote.name}:{path}", remote.name, path, expected_digest=hexd, pinned=True)
        try:
            await self.ctx.cache.adopt(target, spool, {"content-type": BLOB_TYPE, "etag": f'"sha256:{hexd}"'})
        except BodyError as e:
            raise OCIError("UNAVAILABLE", f"blob not stored: {e}", 500) from None
        digest = f"sha256:{hexd}"
        return _empty(request, 201, {"Location": f"{base}/blobs/{digest}", "Docker-Content-Digest": digest})

    # -- upload sessions -----------------------------------------------------------------

    def _session(self, remote: RemoteConfig, repo: str, session: str, busy_ok: bool = False) -> Upload:
        up = self.uploads.get(session)
        if up is None or up.remote != remote.name or up.repo != repo:
            raise OCIError("BLOB_UPLOAD_UNKNOWN", f"no upload session {session!r} in {repo!r}")
        if up.busy and not busy_ok:
            raise OCIError("BLOB_UPLOAD_INVALID", "another request is writing to this upload session", 409)
        return up

    def _session_headers(self, up: Upload, base: str) -> dict[str, str]:
        # distribution answers "0-0" for an empty session too; clients expect exactly that.
        return {"Location": f"{base}/blobs/uploads/{up.uuid}", "Range": f"0-{max(up.spool.size - 1, 0)}",
                "Docker-Upload-UUID": up.uuid}

    def _session_reply(self, request: Any, up: Upload, base: str, status: int) -> bytes:
        return _empty(request, status, self._session_headers(up, base))

    def _drop(self, up: Upload) -> None:
        self.uploads.pop(up.uuid, None)
        self.ctx.store.discard(up.spool)

    def _sweep(self) -> None:
        cutoff = self.ctx.clock.seconds() - UPLOAD_IDLE
        for up in [u for u in self.uploads.values() if u.touched < cutoff and not u.busy]:
            self._drop(up)

    def _append(self, request: Any, up: Upload) -> Deferred[None]:
        """Add the request's body to session ``up`` (busy meanwhile). An empty
        session adopts the request's spool as its own, so a monolithic push is
        never copied; later chunks are appended to it in the I/O pool. The work
        goes on when the client leaves (no thread ever writes to a spool
        discarded under it); a failure ends the session."""
        up.busy = True
        return shield(ensureDeferred(self._append_body(request, up)))

    async def _append_body(self, request: Any, up: Upload) -> None:
        store = self.ctx.store
        try:
            if body_size(request) == 0:
                return
            spool = await request_spool(request, store)
            if up.spool.size == 0:
                store.discard(up.spool)
                up.spool = spool
                return
            try:
                await store.in_io(up.spool.append_from, spool)
            finally:
                store.discard(spool)
        except BaseException:
            self._drop(up)
            raise
        finally:
            up.busy = False

    # -- manifests ---------------------------------------------------------------------

    async def get_manifest(self, request: Any, remote: RemoteConfig, repo: str, ref: str) -> bytes | None:
        _ref(ref)
        entry = await self.ctx.store.index.get(_key(remote, repo, "_manifests", ref))
        if entry is None or entry.digest is None:
            raise OCIError("MANIFEST_UNKNOWN", f"manifest {ref!r} is not in {repo!r}", detail={"reference": ref})
        accepted = accepted_types(request)
        ctype = (entry.content_type or "").split(";", 1)[0].strip().lower()
        if accepted is not None and ctype not in accepted:
            raise OCIError("MANIFEST_UNKNOWN", f"manifest {ref!r} is {ctype}, which the request's Accept does not "
                                               "include", detail={"reference": ref})
        return await self._serve(request, remote, entry, "sha256:" + entry.digest)

    async def put_manifest(self, request: Any, remote: RemoteConfig, repo: str, ref: str, base: str) -> bytes:
        is_digest = _ref(ref)
        _manifest_size(body_size(request))
        body: bytes = await self.ctx.store.in_io(_read_all, request.content)
        hexd = hashlib.sha256(body).hexdigest()
        digest = f"sha256:{hexd}"
        if is_digest and ref != digest:
            raise OCIError("DIGEST_INVALID", f"manifest has digest {digest}, not {ref}", detail={"digest": ref})
        # Off the reactor: a 4 MiB JSON document takes a while to parse.
        media_type, refs = await self.ctx.store.in_io(parse_manifest, body, header(request, b"content-type"))
        missing = []
        for kind, d in refs:
            if not DIGEST.match(d):
                raise OCIError("MANIFEST_INVALID", f"unsupported digest {d!r} in manifest")
            kinds = ("_layers",) if kind == "blob" else ("_manifests", "_layers")
            found = False
            for k in kinds:
                if await self.ctx.store.index.get(_key(remote, repo, k, d)) is not None:
                    found = True
                    break
            if not found:
                missing.append(d)
        if missing:
            raise OCIError("MANIFEST_BLOB_UNKNOWN", f"manifest references {len(missing)} unknown blob(s) or manifest(s) "
                           f"in {repo!r}, first {missing[0]}", detail={"digest": missing[0]})
        store = self.ctx.store
        # Manifests are small and parsed, so they arrive in memory: written to
        # a spool here, then committed through the cache like any body.
        spool = store.new_spool("up-")
        try:
            await self.ctx.store.in_io(spool.write, body)
        except BaseException:
            store.discard(spool)
            raise
        path = f"{repo}/_manifests/{digest}"
        target = Target(f"{remote.name}:{path}", remote.name, path, expected_digest=hexd, pinned=True)
        headers = {"content-type": media_type, "docker-content-digest": digest, "etag": f'"{digest}"'}
        try:
            await self.ctx.cache.adopt(target, spool, headers)
        except BodyError as e:
            raise OCIError("UNAVAILABLE", f"manifest not stored: {e}", 500) from None
        now = self.ctx.clock.seconds()
        if not is_digest:
            await store.index.put(_manifest_entry(remote, repo, ref, hexd, len(body), media_type, now))
        return _empty(request, 201, {"Location": f"{base}/manifests/{digest}", "Docker-Content-Digest": digest})

    async def delete_manifest(self, request: Any, remote: RemoteConfig, repo: str, ref: str) -> bytes:
        is_digest = _ref(ref)
        key = _key(remote, repo, "_manifests", ref)
        entry = await self.ctx.store.index.get(key)
        if entry is None:
            raise OCIError("MANIFEST_UNKNOWN", f"manifest {ref!r} is not in {repo!r}", detail={"reference": ref})
        if is_digest:
            # Deleting a manifest untags it everywhere in the repository, as distribution does.
            for tag, hexd in await self._tag_rows(remote, repo):
                if hexd == entry.digest:
                    await self.ctx.store.purge_key(_key(remote, repo, "_manifests", tag))
        await self.ctx.store.purge_key(key)
        return _empty(request, 202)

    # -- listings ----------------------------------------------------------------------

    async def tags(self, request: Any, remote: RemoteConfig, repo: str, base: str) -> bytes:
        args = _query(request)
        n = _page_size(args.get("n"))
        last = args.get("last") or ""
        tags = sorted(t for t, _ in await self._tag_rows(remote, repo) if t > last)
        if not tags and not await self._repo_exists(remote, repo):
            raise OCIError("NAME_UNKNOWN", f"repository {repo!r} is not known in {remote.name!r}", detail={"name": repo})
        page = tags[:n]
        extra = {}
        if len(tags) > n and page:
            extra["Link"] = f'<{base}/tags/list?{urlencode({"n": n, "last": page[-1]})}>; rel="next"'
        return _json(request, {"name": _client_prefix(base, repo) + repo, "tags": page}, extra)

    async def catalog(self, request: Any, remote: RemoteConfig) -> bytes:
        """``{"repositories": [...]}``: repositories of ``remote`` holding at least one manifest."""
        authorize(self.ctx, request, "read", "registry:catalog:*")
        args = _query(request)
        n = _page_size(args.get("n"))
        last = args.get("last") or ""
        # Names as the client writes them: ``/v2/<remote>/_catalog`` lists ``<remote>/<repo>``.
        path = request.path.decode("latin-1")
        prefix = unquote(path[len("/v2/"):-len("_catalog")]) if path.startswith("/v2/") and path.endswith("/_catalog") else ""
        repos = [prefix + r for r in await self.ctx.store.index.prefixes_before(remote.name, "/_manifests/")]
        repos = [r for r in repos if r > last]
        page = repos[:n]
        extra = {}
        if len(repos) > n and page:
            extra["Link"] = f'<{path}?{urlencode({"n": n, "last": page[-1]})}>; rel="next"'
        return _json(request, {"repositories": page}, extra)

    async def _tag_rows(self, remote: RemoteConfig, repo: str) -> list[tuple[str, str | None]]:
        """(tag, hex digest) of every tag of ``repo``: its manifest rows not named by a digest."""
        prefix = f"{repo}/_manifests/"
        rows = await self.ctx.store.list(remote.name, prefix, limit=None)
        return [(e.path[len(prefix):], e.digest) for e in rows if ":" not in e.path[len(prefix):]]

    async def _repo_exists(self, remote: RemoteConfig, repo: str) -> bool:
        return bool(await self.ctx.store.list(remote.name, f"{repo}/_", limit=1))

    # -- serving -------------------------------------------------------------------------

    async def _serve(self, request: Any, remote: RemoteConfig, entry: Entry, digest: str) -> bytes | None:
        self.ctx.store.index.touch(entry, self.ctx.clock.seconds())
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        if request.method == b"HEAD" and not self.ctx.store.exists(entry):
            # HEAD does not open the body: never a 200 that the GET would not give.
            raise OCIError("UNAVAILABLE", "stored body missing", 503)
        out = serve_hit(request, entry, "HIT", self.ctx.store, self.ctx.metrics, remote.name, "",
                        {"Docker-Content-Digest": digest}, sendfile=self.ctx.sendfile)
        if out is None or isinstance(out, bytes):
            return as_oci(request, out)
        return await out  # type: ignore[func-returns-value]  # None once the body is sent


# -- helpers -----------------------------------------------------------------------------


def _key(remote: RemoteConfig, repo: str, kind: str, ref: str) -> str:
    return f"{remote.name}:{repo}/{kind}/{ref}"


def _blob_entry(remote: RemoteConfig, repo: str, hexd: str, size: int, now: float) -> Entry:
    path = f"{repo}/_layers/sha256:{hexd}"
    return Entry(f"{remote.name}:{path}", remote.name, path, 200, hexd, size, BLOB_TYPE,
                 {"content-type": BLOB_TYPE}, now, None, f'"sha256:{hexd}"', None, now, pinned=True)


def _manifest_entry(remote: RemoteConfig, repo: str, ref: str, hexd: str, size: int, media_type: str,
                    now: float) -> Entry:
    path = f"{repo}/_manifests/{ref}"
    return Entry(f"{remote.name}:{path}", remote.name, path, 200, hexd, size, media_type,
                 {"content-type": media_type, "docker-content-digest": f"sha256:{hexd}"}, now, None,
                 f'"sha256:{hexd}"', None, now, pinned=True)


def _digest(digest: str) -> str:
    """The hex of a sha256 digest; OCIError for anything else."""
    m = DIGEST.match(digest)
    if m:
        return m.group(1)
    if ANY_DIGEST.match(digest):
        raise OCIError("DIGEST_INVALID", f"only sha256 digests are supported, got {digest!r}", detail={"digest": digest})
    raise OCIError("DIGEST_INVALID", f"malformed digest {digest!r}", detail={"digest": digest})


def _ref(ref: str) -> bool:
    """Whether a manifest reference is a digest (else a valid tag); OCIError otherwise."""
    if ":" in ref:
        _digest(ref)
        return True
    if not TAG.match(ref):
        raise OCIError("MANIFEST_INVALID" if ref else "NAME_INVALID", f"invalid tag {ref!r}")
    return False


def _base(request: Any, tail: list[str]) -> str:
    """``/v2/<name as the client wrote it>`` for Location headers, from the raw path."""
    path = request.path.decode("latin-1")
    parts = path.split("/")
    n = len(tail)
    if tail and tail[-1] == "" and not path.endswith("/"):
        n -= 1  # ``.../blobs/uploads`` without its trailing slash
    return "/".join(parts[: len(parts) - n])


def _client_prefix(base: str, repo: str) -> str:
    """What the client's name adds before ``repo`` (``<remote>/`` under path routing)."""
    name = unquote(base[len("/v2/"):] if base.startswith("/v2/") else base.lstrip("/"))
    return name[: len(name) - len(repo)] if name.endswith(repo) else ""


def _query(request: Any) -> dict[str, str]:
    raw = request.uri.partition(b"?")[2].decode("latin-1")
    return {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}


def _page_size(n: str | None) -> int:
    if n is None or n == "":
        return TAGS_PAGE
    if not n.isdigit():
        raise OCIError("PAGINATION_NUMBER_INVALID", f"n must be a number, got {n!r}", 400)
    return min(int(n), TAGS_PAGE)


def _manifest_size(size: int) -> None:
    if size > MAX_MANIFEST:
        raise OCIError("SIZE_INVALID", f"manifest of {size} bytes exceeds the {MAX_MANIFEST} byte limit", 413)


def _read_all(content: Any) -> bytes:
    if content is None:
        return b""
    content.seek(0)
    return bytes(content.read(MAX_MANIFEST + 1))


def _method(method: bytes, allow: str) -> OCIError:
    return OCIError("UNSUPPORTED", f"{method.decode('latin-1')} is not allowed here", 405, headers={"Allow": allow})


def _empty(request: Any, status: int, headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
    for k, v in (headers or {}).items():
        # Values come from the raw request path, digests and uuids: already URL-safe.
        request.setHeader(k.encode(), v.encode("latin-1"))
    request.setHeader(b"Content-Length", b"0")
    return b""


def _json(request: Any, obj: Any, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps(obj).encode() + b"\n"
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
    for k, v in (headers or {}).items():
        request.setHeader(k.encode(), v.encode("latin-1"))
    request.setHeader(b"Content-Length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body
