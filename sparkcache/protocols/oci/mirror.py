"""The pull side of a ``type: oci`` remote: manifests, blobs, tags, catalog.

Cache keys and freshness (the store keeps upstream's exact bytes):

- ``oci:<remote>:blob:<hex>`` — blobs, immutable, shared by every repository
  of the remote, sha256-verified while streaming;
- ``oci:<remote>:<name>:manifest:sha256:<hex>`` — manifests by digest, immutable, verified;
- ``oci:<remote>:<name>:tag:<tag>`` — tag → manifest, fresh for ``tag_ttl``;
  then re-checked with a HEAD (which Docker Hub does not count as a pull)
  and fetched again only when the digest changed. A manifest fetched by tag
  is also recorded under its digest, since clients resolve then fetch by digest;
- ``oci:<remote>:<name>:tags?<query>`` and ``oci:<remote>:_catalog?<query>`` —
  fresh for ``tag_ttl``.

``<name>`` is the upstream name (with Docker Hub's ``library/``).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from twisted.logger import Logger

from sparkcache.config import RemoteConfig
from sparkcache.context import Context
from sparkcache.fetch import CacheRequest, Failed, Hit, Live, Result
from sparkcache.fetch.flight import BodyError
from sparkcache.fetch.produce import Singleflight
from sparkcache.fetch.upstream import UpstreamError, discard_body
from sparkcache.protocols.oci.config import OCIOptions, options_of
from sparkcache.protocols.oci.errors import OCIError, as_oci
from sparkcache.protocols.oci.names import check_reference, sha256_hex, upstream_name
from sparkcache.protocols.oci.tokens import TokenAuth, TokenError
from sparkcache.store import Entry, hints
from sparkcache.store.ranges import serving_range
from sparkcache.web.respond import SMALL_BODY, relayed_headers, respond

log = Logger()

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
# The spec lets registries refuse manifests above 4 MiB; we read them whole.
MAX_MANIFEST = 16 << 20
MANIFEST_HEADERS = ("content-type", "docker-content-digest")
LISTING_HEADERS = ("content-type", "etag", "last-modified", "link")
# After a tag re-check found the upstream unreachable (or timing out), stale
# tags of that remote are served without asking again for this long.
DOWN_GRACE = 30.0
# Catalog pages are parsed to apply the allow-list; clients page with ?n= anyway.
MAX_LISTING = 8 << 20


def accepted_types(request: Any) -> set[str] | None:
    """Media types the client accepts, or None for anything (no Accept, */*)."""
    values = request.requestHeaders.getRawHeaders(b"accept") or []
    types: set[str] = set()
    for v in values:
        for part in v.decode("latin-1").split(","):
            t = part.split(";", 1)[0].strip().lower()
            if t:
                types.add(t)
    if not types or "*/*" in types or "application/*" in types:
        return None
    return types


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


class _BodyMissing(Exception):
    """A cached manifest's body is gone (its row has been purged)."""


class Mirror:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.tokens = TokenAuth(ctx.upstream, ctx.clock)
        self._checks: Singleflight[str, Any] = Singleflight()
        # remote → until when its stale tags are served without asking upstream
        self._down_until: dict[str, float] = {}

    async def _down(self, remote: str, now: float) -> bool:
        """Whether ``remote``'s stale tags go without a check now: it timed
        out lately, here or (worker processes) in another worker."""
        if self._down_until.get(remote, 0.0) > now:
            return True
        if self.ctx.cache.locks is None:
            return False
        until = await self.ctx.store.in_io(hints.read_until, self.ctx.store.data_dir, f"oci-down:{remote}")
        if until > now:
            self._down_until[remote] = until
            return True
        return False

    async def _set_down(self, remote: str, until: float | None) -> None:
        if until is None:
            self._down_until.pop(remote, None)
        else:
            self._down_until[remote] = until
        if self.ctx.cache.locks is None:
            return
        try:
            if until is None:
                await self.ctx.store.in_io(hints.clear, self.ctx.store.data_dir, f"oci-down:{remote}")
            else:
                await self.ctx.store.in_io(hints.write_until, self.ctx.store.data_dir, f"oci-down:{remote}", until)
        except OSError as e:  # (a full disk): the other workers learn it themselves
            log.warn("sharing {remote}'s upstream state with the other workers: {e}", remote=remote, e=e)

    def forget(self, remote: str) -> None:
        """Drop what was learnt from a remote's upstream (its settings changed)."""
        self.tokens.forget(remote)
        self._down_until.pop(remote, None)

    # -- upstream ------------------------------------------------------------------

    @staticmethod
    def url(remote: RemoteConfig, *parts: str, query: str = "") -> str:
        assert remote.upstream is not None
        if "/v2/" in urlsplit(remote.upstream).path + "/":
            # Another sparkcache's remote (``<central>/v2/<remote>``, a node-local
            # tier): names go under that prefix, as its path routing expects.
            base = remote.upstream.rstrip("/") + "/"
        else:
            base = (remote.upstream[:-3] if remote.upstream.endswith("/v2") else remote.upstream) + "/v2/"
        return base + "/".join(quote(p, safe="/:@") for p in parts) + (f"?{query}" if query else "")

    async def fetch(self, req: CacheRequest, scope: str) -> Result:
        """``cache.get`` with upstream token auth: one retry after a 401."""
        auth = await self._auth(req.remote, scope)
        result = await self.ctx.cache.get(replace(req, headers={**req.headers, **auth}))
        if isinstance(result, Failed) and result.status == 401 and \
                self.tokens.learn(req.remote, result.headers.get("www-authenticate")):
            auth = await self._token(req.remote, scope)
            result = await self.ctx.cache.get(replace(req, headers={**req.headers, **auth}))
        return result

    async def _auth(self, remote: RemoteConfig, scope: str) -> dict[bytes, bytes]:
        """A cached token, or a new one when the registry is known to want them:
        a new scope then costs no 401 round trip."""
        auth = self.tokens.cached(remote, scope)
        if not auth and self.tokens.knows(remote):
            auth = await self._token(remote, scope)
        return auth

    async def _token(self, remote: RemoteConfig, scope: str) -> dict[bytes, bytes]:
        try:
            return await self.tokens.renew(remote, scope)
        except TokenError as e:
            if e.down:
                raise OCIError("UNAVAILABLE", f"upstream token service: {e}", 502) from None
            raise OCIError("DENIED", f"upstream refused access: {e}", 403) from None

    def _failure(self, remote: RemoteConfig, f: Failed, unknown: str, what: str) -> OCIError:
        self.ctx.metrics.response(remote.name, "error")
        if f.status == 404:
            return OCIError(unknown, f"{what} not found upstream", 404)
        if f.status in (401, 403):
            # Our client cannot fix upstream's credentials: never relay a 401,
            # which would send it into an auth flow with this cache.
            return OCIError("DENIED", f"upstream refused access to {what} ({f.message})", 403)
        if f.status == 429:
            return OCIError("TOOMANYREQUESTS", f"upstream rate limit: {f.message}", 429, headers=relayed_headers(f))
        if 400 <= f.status < 500:
            return OCIError(unknown if f.status == 410 else "UNSUPPORTED" if f.status == 405 else "DENIED",
                            f"{what}: {f.message}", f.status)
        return OCIError("UNAVAILABLE", f"{what}: {f.message}", f.status if f.status >= 500 else 502)

    async def _entry(self, remote: RemoteConfig, result: Result, unknown: str, what: str) -> tuple[Entry, str]:
        """The committed entry behind a result (waiting until the body is complete and verified)."""
        if isinstance(result, Failed):
            raise self._failure(remote, result, unknown, what)
        if isinstance(result, Hit):
            return result.entry, result.state
        try:
            flight = await result.flight.wait_done()
        except BodyError as e:
            self.ctx.metrics.response(remote.name, "error")
            raise OCIError("UNAVAILABLE", f"{what}: {e}", 502) from None
        return flight.entry, "MISS"

    # -- manifests -------------------------------------------------------------------

    def _manifest_request(self, request: Any, remote: RemoteConfig, up: str, ref: str, key: str,
                          ttl: float | None, hexd: str | None) -> CacheRequest:
        extra = sorted((accepted_types(request) or set()) - set(MANIFEST_TYPES))
        accept = ", ".join([*MANIFEST_TYPES, *extra])
        return CacheRequest(
            remote=remote, key=key, path=f"{up}/manifests/{ref}", url=self.url(remote, up, "manifests", ref),
            ttl=ttl, expected_digest=hexd, headers={b"Accept": accept.encode("latin-1")},
            keep_headers=MANIFEST_HEADERS,
        )

    async def manifest(self, request: Any, remote: RemoteConfig, name: str, ref: str) -> bytes:
        try:
            return await self._manifest(request, remote, name, ref)
        except _BodyMissing:
            # The cached body vanished (purged, disk trouble): the row is gone
            # now, so a second go fetches it again.
            try:
                return await self._manifest(request, remote, name, ref)
            except _BodyMissing:
                raise OCIError("UNAVAILABLE", "cached manifest body missing; retry", 503) from None

    async def _manifest(self, request: Any, remote: RemoteConfig, name: str, ref: str) -> bytes:
        kind = check_reference(ref)
        opts = options_of(remote)
        up = upstream_name(name, opts.docker_hub)
        scope = f"repository:{up}:pull"
        what = f"manifest {name}:{ref}" if kind == "tag" else f"manifest {name}@{ref}"
        if kind == "digest":
            hexd = sha256_hex(ref)
            req = self._manifest_request(request, remote, up, ref, _digest_key(remote, up, hexd), None, hexd)
            entry, state = await self._entry(remote, await self.fetch(req, scope), "MANIFEST_UNKNOWN", what)
        else:
            req = self._manifest_request(request, remote, up, ref, f"oci:{remote.name}:{up}:tag:{ref}", opts.tag_ttl, None)
            entry, state = await self._by_tag(remote, req, scope, what)
        return await self._serve_manifest(request, remote, entry, state)

    async def _by_tag(self, remote: RemoteConfig, req: CacheRequest, scope: str, what: str) -> tuple[Entry, str]:
        stale = await self.ctx.store.index.get(req.key)
        now = self.ctx.clock.seconds()
        if stale is not None and stale.status == 200 and not stale.fresh(now) \
                and not self.ctx.cache.fetching(req.key):
            if await self._down(remote.name, now):
                return stale, "STALE"
            state, checked = await self._checks.run(req.key, lambda: self._check_tag(req, stale, scope))
            if checked is not None:
                return checked, state
        result = await self.fetch(req, scope)
        entry, state = await self._entry(remote, result, "MANIFEST_UNKNOWN", what)
        if isinstance(result, Live):
            await self._record_digest(remote, req, entry)
        return entry, state

    async def _check_tag(self, req: CacheRequest, stale: Entry, scope: str) -> tuple[str, Entry | None]:
        """HEAD upstream for a stale tag: (REVALIDATED, entry), (STALE, entry) or (FETCH, None)."""
        remote = req.remote
        since = self.ctx.store.epoch()  # a purge from now on: the stale manifest is not brought back
        try:
            headers = {**req.headers, **await self._auth(remote, scope)}
        except OCIError as e:
            if e.status >= 500:
                return "STALE", stale
            return "FETCH", None
        for attempt in (0, 1):
            try:
                response, _ = await self.ctx.upstream.request(remote, b"HEAD", req.url, headers)
            except UpstreamError as e:
                self.ctx.metrics.upstream(remote.name, e.kind)
                log.info("serving stale {key}: {why}", key=req.key, why=str(e))
                # Each further check would wait for the same connect or read
                # timeout: the remote's stale tags go without one for a while.
                await self._set_down(remote.name, self.ctx.clock.seconds() + DOWN_GRACE)
                return "STALE", stale
            await self._set_down(remote.name, None)
            self.ctx.metrics.upstream(remote.name, str(response.code))
            await discard_body(response)
            code = response.code
            if code == 401 and attempt == 0:
                challenge = response.headers.getRawHeaders(b"www-authenticate", [b""])[0].decode("latin-1")
                if self.tokens.learn(remote, challenge):
                    try:
                        headers = {**req.headers, **await self.tokens.renew(remote, scope)}
                    except TokenError as e:
                        if e.down:
                            return "STALE", stale
                        return "FETCH", None
                    continue
            if code >= 500 or code == 429:
                log.info("serving stale {key}: upstream answered {code} to HEAD", key=req.key, code=code)
                return "STALE", stale
            digest = (response.headers.getRawHeaders(b"docker-content-digest") or [b""])[0].decode("latin-1").strip()
            if code == 200 and digest == f"sha256:{stale.digest}":
                now = self.ctx.clock.seconds()
                fresh = replace(stale, fetched=now, expires=now + (req.ttl or 0), last_access=now)
                if await self.ctx.store.refresh(fresh, since):
                    return "REVALIDATED", fresh
            return "FETCH", None
        return "FETCH", None

    async def _record_digest(self, remote: RemoteConfig, req: CacheRequest, entry: Entry) -> None:
        """Also keep a tag-fetched manifest under its digest (immutable)."""
        if entry.digest is None:
            return
        up = req.path.rsplit("/manifests/", 1)[0]
        key = _digest_key(remote, up, entry.digest)
        if await self.ctx.store.index.get(key) is not None:
            return
        now = self.ctx.clock.seconds()
        # A link: not if the body was purged or evicted since it was committed.
        await self.ctx.store.link(replace(entry, key=key, path=f"{up}/manifests/sha256:{entry.digest}",
                                          fetched=now, expires=None, last_access=now))

    async def _serve_manifest(self, request: Any, remote: RemoteConfig, entry: Entry, state: str) -> bytes:
        assert entry.digest is not None
        ctype = _media_type(entry.content_type or entry.headers.get("content-type"))
        accepted = accepted_types(request)
        if accepted is not None and ctype not in accepted:
            self.ctx.metrics.response(remote.name, "error")
            raise OCIError("MANIFEST_UNKNOWN", f"the manifest is {ctype or 'untyped'}, which the request's Accept "
                                               "does not include", 404)
        if entry.size > MAX_MANIFEST:
            raise OCIError("MANIFEST_INVALID", f"manifest larger than {MAX_MANIFEST} bytes", 502)
        body = await self._manifest_body(request, entry)
        if body is None:
            await self.ctx.store.purge_key(entry.key)
            if state == "MISS":
                raise OCIError("UNAVAILABLE", "cached manifest body missing; retry", 503) from None
            raise _BodyMissing() from None
        if request.method != b"HEAD":
            self.ctx.metrics.bytes_counter(remote.name, "cache" if state != "MISS" else "upstream")(len(body))
        self.ctx.metrics.response(remote.name, state.lower())
        h = request.responseHeaders
        h.setRawHeaders(b"X-Cache", [state.encode()])
        h.setRawHeaders(b"Content-Type", [(entry.content_type or "application/octet-stream").encode("latin-1")])
        h.setRawHeaders(b"Docker-Content-Digest", [f"sha256:{entry.digest}".encode()])
        h.setRawHeaders(b"ETag", [f'"sha256:{entry.digest}"'.encode()])
        h.setRawHeaders(b"Content-Length", [str(entry.size).encode()])
        return body

    async def _manifest_body(self, request: Any, entry: Entry) -> bytes | None:
        """The manifest's bytes (b"" for a HEAD), or None when its body is gone."""
        store = self.ctx.store
        if request.method == b"HEAD":
            # HEAD checks the body is there too: never a 200 the GET would not give.
            return b"" if store.exists(entry) else None
        try:
            if entry.size <= SMALL_BODY:
                # Nearly every manifest: read here, as serve_hit does; one pread
                # from the page cache costs less than a thread hop.
                with store.open_range(entry) as body:
                    return body.read_all()
            return await store.read(entry, MAX_MANIFEST)
        except FileNotFoundError:
            return None

    # -- blobs -------------------------------------------------------------------------

    async def blob(self, request: Any, remote: RemoteConfig, name: str, digest: str) -> bytes | None:
        hexd = sha256_hex(digest)
        up = upstream_name(name, options_of(remote).docker_hub)
        req = CacheRequest(
            remote=remote, key=f"oci:{remote.name}:blob:{hexd}", path=f"{up}/blobs/{digest}",
            url=self.url(remote, up, "blobs", digest), ttl=None, expected_digest=hexd, keep_headers=("content-type",),
        )
        with serving_range(request, req.key):  # backend s3: a Range may come from the bucket
            result = await self.fetch(req, f"repository:{up}:pull")
        if isinstance(result, Hit) and request.method == b"HEAD" and not await self._body_exists(result.entry):
            # A HEAD does not open the body, so check it is there (a GET would
            # fail otherwise), and fetch it again now rather than answer 200.
            result = await self.fetch(req, f"repository:{up}:pull")
        if isinstance(result, Failed):
            raise self._failure(remote, result, "BLOB_UNKNOWN", f"blob {digest}")
        if isinstance(result, Live) and request.method == b"HEAD":
            # Never 200 on HEAD unless the GET would succeed: wait for the verified body.
            entry, _ = await self._entry(remote, result, "BLOB_UNKNOWN", f"blob {digest}")
            result = Hit(entry, "MISS")
        return as_oci(request, await respond(request, result, self.ctx.store, self.ctx.metrics, remote.name, req.path,
                                             {"Docker-Content-Digest": digest}, sendfile=self.ctx.sendfile))

    async def _body_exists(self, entry: Entry) -> bool:
        if self.ctx.store.exists(entry):
            return True
        await self.ctx.store.purge_key(entry.key)
        return False

    # -- listings ----------------------------------------------------------------------

    async def tags(self, request: Any, remote: RemoteConfig, name: str) -> bytes | None:
        up = upstream_name(name, options_of(remote).docker_hub)
        query = _paging(request)
        req = CacheRequest(
            remote=remote, key=f"oci:{remote.name}:{up}:tags" + (f"?{query}" if query else ""), path=f"{up}/tags/list",
            url=self.url(remote, up, "tags", "list", query=query), ttl=options_of(remote).tag_ttl, revalidate=True,
            keep_headers=LISTING_HEADERS,
        )
        return await self._listing(request, remote, req, f"repository:{up}:pull", "NAME_UNKNOWN", f"repository {name}")

    async def catalog(self, request: Any, remote: RemoteConfig) -> bytes | None:
        query = _paging(request)
        req = CacheRequest(
            remote=remote, key=f"oci:{remote.name}:_catalog" + (f"?{query}" if query else ""), path="_catalog",
            url=self.url(remote, "_catalog", query=query), ttl=options_of(remote).tag_ttl, revalidate=True,
            keep_headers=LISTING_HEADERS,
        )
        opts = options_of(remote)
        if not opts.repositories:
            return await self._listing(request, remote, req, "registry:catalog:*", "UNSUPPORTED", "the catalog")
        # Only what the allow-list lets clients pull: the page is read and filtered.
        result = await self.fetch(req, "registry:catalog:*")
        entry, state = await self._entry(remote, result, "UNSUPPORTED", "the catalog")
        if entry.size > MAX_LISTING:
            raise OCIError("UNSUPPORTED", f"upstream catalog page larger than {MAX_LISTING} bytes: ask with ?n=", 502)
        try:
            raw = await self.ctx.store.read(entry, MAX_LISTING)
        except FileNotFoundError:
            await self.ctx.store.purge_key(entry.key)
            raise OCIError("UNAVAILABLE", "cached catalog body missing; retry", 503) from None
        try:
            body = await self.ctx.store.in_io(_filtered_catalog, raw, opts)
        except ValueError:
            raise OCIError("UNAVAILABLE", "upstream catalog is not a JSON catalog", 502) from None
        self.ctx.metrics.response(remote.name, state.lower())
        h = request.responseHeaders
        h.setRawHeaders(b"X-Cache", [state.encode()])
        h.setRawHeaders(b"Content-Type", [b"application/json"])
        link = _next_link(request, entry.headers.get("link"))
        if link:
            h.setRawHeaders(b"Link", [link.encode("latin-1")])
        h.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
        return b"" if request.method == b"HEAD" else body

    async def _listing(self, request: Any, remote: RemoteConfig, req: CacheRequest, scope: str, unknown: str,
                       what: str) -> bytes | None:
        result = await self.fetch(req, scope)
        if isinstance(result, Hit) and request.method == b"HEAD" and not await self._body_exists(result.entry):
            result = await self.fetch(req, scope)
        if isinstance(result, Failed):
            raise self._failure(remote, result, unknown, what)
        headers = result.entry.headers if isinstance(result, Hit) else result.flight.headers
        link = _next_link(request, headers.get("link"))
        return as_oci(request, await respond(request, result, self.ctx.store, self.ctx.metrics, remote.name, req.path,
                                             {"Link": link} if link else None, sendfile=self.ctx.sendfile))


def _digest_key(remote: RemoteConfig, up: str, hexd: str) -> str:
    return f"oci:{remote.name}:{up}:manifest:sha256:{hexd}"


def _filtered_catalog(page: bytes, opts: OCIOptions) -> bytes:
    """An upstream catalog page with only the repositories ``opts`` allows (runs in the IO pool)."""
    doc = json.loads(page)
    repos = doc.get("repositories") if isinstance(doc, dict) else None
    if not isinstance(repos, list):
        raise ValueError("no repositories list")
    hub = opts.docker_hub
    keep = [r for r in repos if isinstance(r, str) and (
        opts.allows(r) or (hub and r.startswith("library/") and "/" not in r[8:] and opts.allows(r[8:])))]
    return json.dumps({"repositories": keep}).encode() + b"\n"


def _next_link(request: Any, link: str | None) -> str | None:
    """Upstream's ``Link: <…?n=…&last=…>; rel="next"`` pointed at the path this client used.

    Only the spec's paging parameters are carried over: the upstream URL and
    anything else in it (a signed token, another host) never reach the client."""
    if not link:
        return None
    m = re.match(r"\s*<([^>]*)>(.*)$", link)
    if m is None:
        return None
    theirs = parse_qs(urlsplit(m.group(1)).query)
    query = [(k, theirs[k][0]) for k in ("n", "last") if theirs.get(k)]
    ns = (request.args or {}).get(b"ns")
    if ns:
        query.append(("ns", ns[0].decode("latin-1")))
    path = request.path.decode("latin-1")
    return f"<{path}?{urlencode(query)}>{m.group(2)}"


def _paging(request: Any) -> str:
    """The spec's paging parameters (n, last), in a fixed order; everything else (ns) is ours."""
    args = request.args or {}
    out = []
    for k in (b"n", b"last"):
        v = args.get(k)
        if v:
            out.append((k.decode(), v[0].decode("utf-8", "replace")))
    return urlencode(out)


