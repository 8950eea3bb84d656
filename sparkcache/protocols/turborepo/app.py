"""``/turborepo/<remote>/``: the Turborepo remote cache API (``v8``) on keyed blobs.

turbo is pointed at ``--api=http://cache/turborepo/<remote>`` and sends:

- ``GET /v8/artifacts/status`` → ``{"status": "enabled"}``;
- ``PUT /v8/artifacts/<hash>?teamId=T`` (or ``?slug=T``): a zstd tar with
  ``x-artifact-duration`` (milliseconds the task took) and, when signatures
  are on, ``x-artifact-tag`` (an HMAC of the body turbo verifies on a hit);
  both are stored with the body and returned on ``GET``/``HEAD`` exactly as
  they came, or a signed hit fails;
- ``GET``/``HEAD /v8/artifacts/<hash>?teamId=T``: 200 with the body and those
  headers, 404 on a miss (a failing store is a miss);
- ``POST /v8/artifacts?teamId=T`` ``{"hashes": [...]}``: per hash, its size,
  duration and tag, or an error object on a miss;
- ``POST /v8/artifacts/events``: hit/miss analytics, counted and dropped.

Artifacts are namespaced by team (``teamId`` and ``slug`` name the same
namespace, so ``--team=x`` and ``TURBO_TEAMID=x`` share one); a request with
neither gets a namespace of its own token's. Every request needs a token
(turbo always sends one): ``read`` for downloads, ``write`` for uploads.
Errors are Vercel's ``{"error": {"code", "message"}}``, which turbo prints.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from klein import Klein
from twisted.web.resource import IResource

from sparkcache.auth import AuthError
from sparkcache.context import Context
from sparkcache.config import Config
from sparkcache.protocols._keyed import KeyedBlobs, keyed_tables
from sparkcache.web.bodies import BodyDecision, InMemory, Refuse, checked
from sparkcache.web.errors import ErrorFormat, ErrorReply, HTTPError, add_error_handling, guarded, set_headers
from sparkcache.web.paths import split_raw_path
from sparkcache.web.serve import error_message
from sparkcache.web.setup import query_arg
from sparkcache.web.urls import public_base

TYPE = "turborepo"
ALL_METHODS = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"]
# turbo's hashes are 16 hex digits; other clients of the API use longer ones.
HASH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Vercel team ids (team_...) and slugs.
TEAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# A tag is base64 of an HMAC-SHA256 (44 characters); room for other encodings, never control characters.
TAG = re.compile(r"[\x21-\x7e]{1,512}")
# An events batch or an artifact query is a small JSON document.
MAX_JSON = 1 << 20
MAX_QUERY_HASHES = 1000
ARTIFACT_HEADERS = ("x-artifact-duration", "x-artifact-tag")
# What turbo 2.11's preflight asks for (observed), and the client headers of Vercel's spec.
CORS_HEADERS = "Authorization, Content-Type, User-Agent, x-artifact-duration, x-artifact-tag, x-artifact-sha, " \
    "x-artifact-dirty-hash, x-artifact-client-ci, x-artifact-client-interactive"


# -- Vercel's error form -------------------------------------------------------------------


def _code(status: int) -> str:
    return {400: "bad_request", 401: "not_authorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
            409: "conflict", 413: "payload_too_large", 414: "uri_too_long", 416: "range_not_satisfiable",
            }.get(status, "internal_error" if status >= 500 else "error")


def vercel_error_body(request: Any, status: int, message: str) -> bytes:
    body = json.dumps({"error": {"code": _code(status), "message": message}}).encode() + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body


def render_vercel(request: Any, reply: ErrorReply) -> bytes:
    body = vercel_error_body(request, reply.status, reply.message)
    set_headers(request, reply.headers)
    return body


VERCEL = ErrorFormat(render_vercel, not_found="no such endpoint; turbo uses --api=<cache>/turborepo/<remote>")


def as_vercel(request: Any, out: Any) -> Any:
    """Re-render an error body of the shared serving helpers in Vercel's form."""
    code = getattr(request, "code", 200)
    if not isinstance(out, bytes) or code < 400:
        return out
    return vercel_error_body(request, code, error_message(out))


def _json(request: Any, obj: Any, status: int = 200) -> bytes:
    body = json.dumps(obj).encode()
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body


class TurborepoApp:
    app = Klein()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.max_path = ctx.config.server.max_path_length
        self.blobs: dict[str, KeyedBlobs] = {}
        self.reconfigure(ctx.config)

    def reconfigure(self, config: Config) -> None:
        """The remotes of ``config`` from now on (Built.reconfigure)."""
        self.blobs = keyed_tables(self.ctx, self.blobs, (r for r in config.remotes.values() if r.type == TYPE),
                                  VERCEL)

    def resource(self) -> IResource:
        return guarded(self.app, VERCEL, self.max_path)

    add_error_handling(app, VERCEL)

    # -- routing ----------------------------------------------------------------------

    def locate(self, request: Any) -> tuple[KeyedBlobs, list[str]]:
        """The remote's blobs and the path below ``/turborepo/<remote>/v8/artifacts``."""
        segments = split_raw_path(request.uri, self.max_path)[1:]  # [0] is "turborepo"
        if not segments or segments[0] == "":
            raise HTTPError(404, "no remote named; turbo uses --api=<cache>/turborepo/<remote>")
        blobs = self.blobs.get(segments[0])
        if blobs is None:
            raise HTTPError(404, f"no type: turborepo remote named {segments[0][:80]!r}")
        if segments[1:3] != ["v8", "artifacts"]:
            raise HTTPError(404, "the remote cache API is at v8/artifacts")
        return blobs, [s for s in segments[3:] if s != ""]

    def authorize(self, request: Any, scope: str) -> None:
        # turbo always sends its token; the API has no anonymous side.
        if self.ctx.auth.presented(request) is None:
            raise AuthError(401, "a Bearer token is required (TURBO_TOKEN or --token)")
        self.ctx.auth.require(request, scope)

    def namespace(self, request: Any) -> str:
        team = query_arg(request, "teamId") or query_arg(request, "slug")
        if team is not None:
            if not TEAM.fullmatch(team):
                raise HTTPError(400, "teamId/slug must be 1-100 letters, digits, '.', '_' or '-'")
            return f"t.{team}"
        # No team: the token's own artifacts (Vercel's personal account).
        owner = self.ctx.auth.identify(request) or ""
        return "u." + hashlib.sha256(owner.encode()).hexdigest()[:16]

    def name(self, request: Any, hash_: str) -> str:
        if not HASH.fullmatch(hash_):
            raise HTTPError(400, "an artifact hash is 1-128 letters, digits, '.', '_' or '-'")
        return f"{self.namespace(request)}/{hash_}"

    def body_gate(self, request: Any) -> BodyDecision:
        return checked(VERCEL, self._gate)(request)

    def _gate(self, request: Any) -> BodyDecision:
        blobs, rest = self.locate(request)
        if request.method == b"PUT" and len(rest) == 1 and rest[0] not in ("status", "events"):
            self.authorize(request, "write")
            self.name(request, rest[0])
            return blobs.body_gate(request)
        if request.method == b"POST" and len(rest) <= 1:
            self.authorize(request, "read")
            return InMemory(MAX_JSON, Refuse(VERCEL, ErrorReply(413, f"a JSON body is at most {MAX_JSON} bytes")))
        return None

    @app.route("/", branch=True, methods=ALL_METHODS)
    async def dispatch(self, request: Any) -> Any:
        blobs, rest = self.locate(request)
        method = request.method
        if method == b"OPTIONS":
            return self.preflight(request)
        if rest == ["status"] and method in (b"GET", b"HEAD"):
            self.authorize(request, "read")
            self.namespace(request)
            return _json(request, {"status": "enabled"})
        if rest == ["events"] and method == b"POST":
            self.authorize(request, "read")
            return self.events(request, blobs)
        if rest == [] and method == b"POST":
            self.authorize(request, "read")
            return await self.query(request, blobs)
        if len(rest) == 1 and rest[0] not in ("status", "events"):
            if method in (b"GET", b"HEAD"):
                self.authorize(request, "read")
                return as_vercel(request, await self.download(request, blobs, self.name(request, rest[0])))
            if method == b"PUT":
                self.authorize(request, "write")
                return await self.upload(request, blobs, rest[0])
            raise HTTPError(405, "an artifact answers GET, HEAD and PUT", {"Allow": "GET, HEAD, PUT, OPTIONS"})
        if rest in (["status"], ["events"], []):
            allow = "GET, HEAD" if rest == ["status"] else "POST"
            raise HTTPError(405, f"{method.decode('latin-1')} is not allowed here", {"Allow": allow + ", OPTIONS"})
        raise HTTPError(404, "no such endpoint under v8/artifacts")

    # -- artifacts --------------------------------------------------------------------

    async def download(self, request: Any, blobs: KeyedBlobs, name: str) -> Any:
        entry = await blobs.get(name)
        extra = {"Cache-Control": "no-store"}
        if entry is not None:
            extra.update({h: entry.headers[h] for h in ARTIFACT_HEADERS if entry.headers.get(h)})
        return await blobs.serve(request, name, extra)

    async def upload(self, request: Any, blobs: KeyedBlobs, hash_: str) -> bytes:
        name = self.name(request, hash_)
        kept = {"content-type": "application/octet-stream"}
        duration = request.getHeader(b"x-artifact-duration")
        if duration is not None:
            text = duration.decode("latin-1").strip()
            if not text.isdigit() or len(text) > 15:
                raise HTTPError(400, "x-artifact-duration is a whole number of milliseconds")
            kept["x-artifact-duration"] = text
        tag = request.getHeader(b"x-artifact-tag")
        if tag is not None:
            text = tag.decode("latin-1")
            if not TAG.fullmatch(text):
                raise HTTPError(400, "x-artifact-tag is 1-512 printable characters")
            kept["x-artifact-tag"] = text
        # An artifact is immutable: a second PUT of its hash keeps the first body and tag.
        await blobs.put(request, name, kept)
        url = f"{public_base(request, self.ctx.config.server.public_url)}/turborepo/{blobs.remote.name}" \
              f"/v8/artifacts/{hash_}"
        return _json(request, {"urls": [url]}, 202)

    async def query(self, request: Any, blobs: KeyedBlobs) -> bytes:
        """``POST /v8/artifacts`` ``{"hashes": [...]}``: what the cache holds of each."""
        try:
            doc = json.loads(request.content.read() if request.content is not None else b"")
            hashes = doc["hashes"]
            if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise HTTPError(400, 'the body is {"hashes": ["<hash>", ...]}') from None
        if len(hashes) > MAX_QUERY_HASHES:
            raise HTTPError(400, f"at most {MAX_QUERY_HASHES} hashes per query")
        out: dict[str, Any] = {}
        for h in hashes:
            entry = await blobs.get(self.name(request, h))
            self.ctx.metrics.form(blobs.remote.name, "query", "hit" if entry is not None else "miss")
            if entry is None:
                out[h] = {"error": {"message": "artifact not found"}}
                continue
            duration = int(entry.headers.get("x-artifact-duration") or 0)
            info: dict[str, Any] = {"size": entry.size, "taskDurationMs": duration}
            if entry.headers.get("x-artifact-tag"):
                info["tag"] = entry.headers["x-artifact-tag"]
            out[h] = info
        return _json(request, out)

    def events(self, request: Any, blobs: KeyedBlobs) -> bytes:
        """Cache-usage analytics: counted per event (``HIT``/``MISS`` by source), never stored."""
        try:
            events = json.loads(request.content.read() if request.content is not None else b"")
            if not isinstance(events, list):
                raise TypeError
        except (ValueError, TypeError):
            raise HTTPError(400, "the body is a JSON array of cache events") from None
        for ev in events:
            if isinstance(ev, dict) and ev.get("event") in ("HIT", "MISS") and ev.get("source") in ("LOCAL", "REMOTE"):
                self.ctx.metrics.form(blobs.remote.name, f"event-{ev['source'].lower()}", ev["event"].lower())
        request.setResponseCode(200)
        request.setHeader(b"Content-Length", b"0")
        return b""

    def preflight(self, request: Any) -> bytes:
        """turbo's ``--preflight`` asks before each request (for APIs behind a CDN);
        the answer allows its headers, the Authorization first of all."""
        request.setResponseCode(200)
        for k, v in (("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Headers", CORS_HEADERS),
                     ("Access-Control-Allow-Methods", "GET, HEAD, PUT, POST, OPTIONS"),
                     ("Access-Control-Max-Age", "86400"), ("Content-Length", "0")):
            request.setHeader(k.encode(), v.encode())
        return b""
