"""``/kv/<remote>/<key>``: one key-value store that ccache, sccache and Gradle all speak.

What each tool sends (logged from the real tools, see PROTOCOLS.md):

- **ccache** (HTTP remote storage): ``GET`` (404 = miss) then ``PUT``, keys
  laid out as ``xx/rest`` (``subdirs``), ``key`` (``flat``) or
  ``ac/<64 hex>`` (``bazel``); Basic (URL user info) or ``bearer-token``.
  A 413 makes it skip the remote for that invocation.
- **Gradle** (HTTP build cache): ``GET``/``PUT`` ``cache/<key>`` with its
  media type, Basic auth sent up front. A 413 or any other error status turns
  the remote cache off for the rest of the build, so the statuses are only
  404 (miss), 413 (too large, refused before the body), 507 (store full),
  and 400/401/403 for what is the client's fault.
- **sccache** (WebDAV through OpenDAL): ``GET .sccache_check`` first, then
  ``GET``/``PUT`` of keys; before a PUT, ``PROPFIND`` of each parent
  directory and ``MKCOL`` of those said missing. There is no directory tree
  here: a PROPFIND of a directory is 404 (of a stored key, a minimal 207), a
  MKCOL is 201 and creates nothing, so every PUT needs no directory at all.

Entries are immutable per key: a second PUT of a key answers 200 and leaves
the stored bytes as they are (ccache and sccache may re-send a result).
Reads are a miss whenever the store cannot answer (see ``_keyed``).
"""

from __future__ import annotations

import re
from email.utils import formatdate
from typing import Any
from xml.sax.saxutils import escape

from klein import Klein
from twisted.web.resource import IResource

from sparkcache.auth import REALM
from sparkcache.config import Config, RemoteConfig
from sparkcache.context import Context
from sparkcache.protocols._keyed import KeyedBlobs, keyed_tables
from sparkcache.protocols.kv.keys import BadKey, collection_of, key_of, options_of
from sparkcache.web.bodies import BodyDecision, InMemory, Refuse, checked
from sparkcache.web.errors import ErrorFormat, ErrorReply, HTTPError, add_error_handling, guarded, render_json
from sparkcache.web.paths import split_raw_path

# ccache and Gradle send Basic credentials (the token as the password) or a
# Bearer token up front; a 401 offers both.
FORMAT = ErrorFormat(
    render_json,
    rules=((BadKey, lambda e, request: ErrorReply(400, str(e))),),
    challenge=(REALM, 'Basic realm="sparkcache"'),
    not_found="no such endpoint; use /kv/<remote>/<key>",
)
GRADLE_TYPE = "application/vnd.gradle.build-cache-artifact.v1"
OCTETS = "application/octet-stream"
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,127}")
ALLOW = "GET, HEAD, PUT, DELETE, PROPFIND, MKCOL, OPTIONS"
# A PROPFIND body is a few hundred bytes of XML this app never reads.
MAX_SMALL_BODY = 64 << 10
METHODS = [m.strip() for m in ALLOW.split(",")]


def stored_type(request: Any, key: str) -> str:
    """The Content-Type to keep with an entry: the client's, when it is a plain media type."""
    raw = request.getHeader(b"content-type")
    value = raw.decode("latin-1").split(";", 1)[0].strip() if isinstance(raw, bytes) else ""
    if _MEDIA_TYPE.fullmatch(value):
        return value
    return GRADLE_TYPE if key.startswith("cache/") else OCTETS


def multistatus(href: str, size: int, modified: float) -> bytes:
    """A one-response 207 body describing a stored key (WebDAV's minimal PROPFIND answer)."""
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<D:multistatus xmlns:D="DAV:"><D:response>'
        f"<D:href>{escape(href)}</D:href>"
        "<D:propstat><D:prop><D:resourcetype/>"
        f"<D:getcontentlength>{size}</D:getcontentlength>"
        f"<D:getlastmodified>{formatdate(modified, usegmt=True)}</D:getlastmodified>"
        "</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat>"
        "</D:response></D:multistatus>\n"
    ).encode()


class KvApp:
    app = Klein()
    add_error_handling(app, FORMAT)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.max_path = ctx.config.server.max_path_length
        self.blobs: dict[str, KeyedBlobs] = {}
        self.reconfigure(ctx.config)
        self._gate = checked(FORMAT, self._body_checks)

    def reconfigure(self, config: Config) -> None:
        """The remotes of ``config`` from now on (Built.reconfigure)."""
        self.blobs = keyed_tables(self.ctx, self.blobs, (r for r in config.remotes.values() if r.type == "kv"), FORMAT)

    def resource(self) -> IResource:
        return guarded(self.app, FORMAT, self.max_path)

    # -- locating ----------------------------------------------------------------------

    def locate(self, request: Any) -> tuple[RemoteConfig, list[str]]:
        """(remote, the segments after it) of ``/kv/<remote>/...``; HTTPError when there is no such remote."""
        segments = split_raw_path(request.uri, self.max_path)  # segments[0] is "kv"
        remote = self.ctx.served_remote(segments[1] if len(segments) > 1 else "", ("kv",), "/kv/<remote>/<key>")
        return remote, segments[2:]

    def key(self, remote: RemoteConfig, rest: list[str]) -> str:
        return key_of(rest, options_of(remote).max_key_length)

    # -- bodies ------------------------------------------------------------------------

    def body_gate(self, request: Any) -> BodyDecision:
        """The checks ``dispatch`` makes before a body is read: a PUT is spooled
        (413 over the remote's ``max_entry_size``, 401/403 without ``write``)."""
        return self._gate(request)

    def _body_checks(self, request: Any) -> BodyDecision:
        remote, rest = self.locate(request)
        if request.method == b"PUT":
            self.key(remote, rest)
            self.ctx.auth.require(request, "write")
            return self.blobs[remote.name].body_gate(request)
        if request.method in (b"GET", b"HEAD"):
            return None
        return InMemory(MAX_SMALL_BODY, Refuse(FORMAT, ErrorReply(413, "request bodies here are at most 64 KiB")))

    # -- routes ------------------------------------------------------------------------

    @app.route("/", branch=True, methods=METHODS)
    async def dispatch(self, request: Any) -> Any:
        remote, rest = self.locate(request)
        method = request.method
        if method == b"OPTIONS":
            request.setHeader(b"Allow", ALLOW.encode())
            request.setHeader(b"DAV", b"1")
            request.setHeader(b"Content-Length", b"0")
            return b""
        if method == b"MKCOL":
            return self.make_collection(request, rest)
        if method == b"PROPFIND" and collection_of(rest):
            self.ctx.auth.require(request, "read")
            raise HTTPError(404, "there are no collections here, only keys")
        key = self.key(remote, rest)
        blobs = self.blobs[remote.name]
        if method in (b"GET", b"HEAD"):
            self.ctx.auth.require(request, "read")
            return await blobs.serve(request, key)
        if method == b"PUT":
            self.ctx.auth.require(request, "write")
            stored = await blobs.put(request, key, {"content-type": stored_type(request, key)})
            request.setResponseCode(201 if stored.created else 200)
            request.setHeader(b"Content-Length", b"0")
            return b""
        if method == b"PROPFIND":
            self.ctx.auth.require(request, "read")
            return await self.propfind(request, blobs, key)
        if method == b"DELETE":
            self.ctx.auth.require(request, "admin")
            await blobs.delete(key)
            request.setResponseCode(204)
            return b""
        raise HTTPError(405, f"{method.decode('latin-1')} is not allowed here", {"Allow": ALLOW})

    def make_collection(self, request: Any, rest: list[str]) -> bytes:
        """MKCOL: every directory exists already (keys need none), so there is nothing to make."""
        self.ctx.auth.require(request, "write")
        if not collection_of(rest) and not collection_of([*rest, ""]):
            raise BadKey("a collection name has characters outside [A-Za-z0-9._~+=:@,!$'()*-]")
        request.setResponseCode(201)
        request.setHeader(b"Content-Length", b"0")
        return b""

    async def propfind(self, request: Any, blobs: KeyedBlobs, key: str) -> bytes:
        entry = await blobs.get(key)
        if entry is None:
            raise HTTPError(404, f"{key!r} is not in {blobs.remote.name!r}")
        body = multistatus(request.uri.split(b"?", 1)[0].decode("latin-1"), entry.size, entry.fetched)
        request.setResponseCode(207)
        request.setHeader(b"Content-Type", b'application/xml; charset="utf-8"')
        request.setHeader(b"Content-Length", str(len(body)).encode())
        return b"" if request.method == b"HEAD" else body
