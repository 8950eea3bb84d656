"""Routes of the seed endpoints (see the package's doc and docs/seed.rst).

Binaries and dependency archives are keyed blobs whose names are *mutable*:
sparkwing re-PUTs ``/bin/<pipeline>`` and ``/cache/<lockfile-hash>`` with new
content, and the new body must replace the old (``overwrite=True``); a client
that sends ``X-Checksum-Sha256`` or ``Digest: sha-256=`` has the body checked
against it (400 and nothing kept on a mismatch). Artifacts are keyed blobs of
the ``seed/artifacts`` remote under ``<job>/<path>``, expiring after the
configured retention; a re-upload of a path replaces it.

Names come from the raw request path (vetted by
:func:`sparkcache.web.paths.split_raw_path`: no dot segments, no encoded
separators, no control characters); artifact paths from the query string get
the same rules here. The store never makes a file path of either.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import IResource

from sparkcache.config import RemoteConfig
from sparkcache.context import Context
from sparkcache.protocols._keyed import KeyedBlobs, KeyedOptions
from sparkcache.protocols.generic.app import _expected_sha256
from sparkcache.protocols.seed import ARTIFACTS, BIN, CACHE, SeedConfig
from sparkcache.protocols.seed.tarstream import TarStream, archive_parts
from sparkcache.store import Entry
from sparkcache.timers import Periodic
from sparkcache.web.bodies import BodyDecision, checked
from sparkcache.web.errors import JSON, HTTPError, add_error_handling, guarded
from sparkcache.web.paths import split_raw_path
from sparkcache.web.respond import guess_type
from sparkcache.web.root import Remount
from sparkcache.web.serve import finish_safely, header, send_generated

log = Logger()

MAX_NAME = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
KEYED_SEGMENTS = {"bin": BIN, "cache": CACHE}


class SeedApp:
    app = Klein()
    add_error_handling(app, JSON)

    def __init__(self, ctx: Context, cfg: SeedConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg

        def blobs(remote: str, ttl: float | None) -> KeyedBlobs:
            options = KeyedOptions(max_entry_size=cfg.max_entry_size, quota=cfg.quota, ttl=ttl)
            return KeyedBlobs(ctx, RemoteConfig(remote, "seed", None, options=options), JSON)

        self.blobs = {BIN: blobs(BIN, None), CACHE: blobs(CACHE, None),
                      ARTIFACTS: blobs(ARTIFACTS, cfg.artifact_retention)}
        # So that GET / lists them and /admin/purge?remote= accepts their names.
        ctx.internal_remotes.update({BIN: ("seed", "/bin/"), CACHE: ("seed", "/cache/"),
                                     ARTIFACTS: ("seed", "/artifacts/")})
        self._gate = checked(JSON, self._check_upload)

    def resource(self) -> IResource:
        # The routes name their first segment (/bin, /cache, /artifacts).
        return Remount(guarded(self.app, JSON, self.ctx.config.server.max_path_length))

    def expiry_service(self) -> Periodic:
        return Periodic("seed-artifact-expiry", self.ctx.config.storage.expiry_interval, self.expire,
                        self.ctx.clock)

    # -- names --------------------------------------------------------------------------

    def _segments(self, request: Any) -> list[str]:
        return split_raw_path(request.uri, self.ctx.config.server.max_path_length)

    def _name(self, request: Any) -> str:
        """The name after /bin/ or /cache/ (several segments: keys may hold ``/``)."""
        segments = self._segments(request)[1:]
        if not segments or "" in segments:
            raise HTTPError(400, "expected /<bin|cache>/<name>, a name without empty segments or a trailing slash")
        name = "/".join(segments)
        if len(name) > MAX_NAME:
            raise HTTPError(400, f"names are at most {MAX_NAME} characters")
        return name

    def _job(self, request: Any) -> str:
        segments = self._segments(request)
        if len(segments) != 2 or not segments[1]:
            raise HTTPError(404, "expected /artifacts/<job>")
        if len(segments[1]) > 256:
            raise HTTPError(400, "job IDs are at most 256 characters")
        return segments[1]

    # -- uploads --------------------------------------------------------------------------

    def body_gate(self, request: Any) -> BodyDecision:
        """Uploads: token, name and size checked before a byte of the body is stored."""
        return self._gate(request)

    def _check_upload(self, request: Any) -> BodyDecision:
        segments = self._segments(request)
        first = segments[0] if segments else ""
        if first in KEYED_SEGMENTS and request.method == b"PUT":
            self.ctx.auth.require(request, "write")
            self._name(request)
            return self.blobs[KEYED_SEGMENTS[first]].body_gate(request)
        if first == "artifacts" and request.method == b"POST":
            self.ctx.auth.require(request, "write")
            self._job(request)
            artifact_path(request)
            return self.blobs[ARTIFACTS].body_gate(request)
        return None

    async def _put(self, request: Any, blobs: KeyedBlobs, name: str, shown: str) -> bytes:
        self.ctx.auth.require(request, "write")
        expected = _expected_sha256(request)
        ctype = header(request, b"content-type")
        if not ctype or ctype.startswith("application/x-www-form-urlencoded"):
            # What curl --data-binary says of any file: not the file's type.
            ctype = guess_type(name)
        # Mutable names: a new body under a name replaces the old one.
        stored = await blobs.put(request, name, {"content-type": ctype}, expected, overwrite=True)
        request.setResponseCode(201)
        entry = stored.entry
        return _json(request, {"name": shown, "size": entry.size, "sha256": entry.digest})

    @app.route("/bin/<path:rest>", methods=["GET", "HEAD", "PUT"])
    async def binary(self, request: Any, rest: str) -> Any:
        return await self._keyed(request, BIN)

    @app.route("/cache/<path:rest>", methods=["GET", "HEAD", "PUT"])
    async def archive(self, request: Any, rest: str) -> Any:
        return await self._keyed(request, CACHE)

    async def _keyed(self, request: Any, remote: str) -> Any:
        blobs = self.blobs[remote]
        if request.method == b"PUT":
            name = self._name(request)
            return await self._put(request, blobs, name, name)
        self.ctx.auth.require(request, "read")
        return await blobs.serve(request, self._name(request))

    # -- artifacts ------------------------------------------------------------------------

    @app.route("/artifacts/<job>", methods=["GET", "HEAD", "POST"])
    async def artifacts(self, request: Any, job: str) -> Any:
        if request.method == b"POST":
            self.ctx.auth.require(request, "write")
            job = self._job(request)
            path = artifact_path(request)
            return await self._put(request, self.blobs[ARTIFACTS], f"{job}/{path}", path)
        self.ctx.auth.require(request, "read")
        job = self._job(request)
        pattern = _query(request, "glob")
        if pattern is not None and (not pattern or len(pattern) > MAX_NAME or _CONTROL.search(pattern)):
            raise HTTPError(400, "glob: expected a pattern without control characters")
        entries = await self._listed(job)
        if pattern is None:
            return _json(request, {"job": job, "artifacts": [_listing(job, e) for e in entries]})
        matched = [e for e in entries if fnmatch.fnmatchcase(_relative(job, e), pattern)]
        if not matched:
            self.ctx.metrics.form(ARTIFACTS, "download", "miss")
            raise HTTPError(404, f"no artifact of job {job!r} matches {pattern!r}")
        if len(matched) == 1:
            return await self.blobs[ARTIFACTS].serve(request, matched[0].path)
        return await self._send_tar(request, job, matched)

    async def _listed(self, job: str) -> list[Entry]:
        """The live artifacts of ``job``, by path; none when the store fails (a miss)."""
        try:
            entries = await self.ctx.store.list(ARTIFACTS, prefix=f"{job}/", limit=None)
        except Exception:
            log.failure("seed: listing the artifacts of {job} failed; answering none", job=job)
            return []
        now = self.ctx.clock.seconds()
        return [e for e in entries if e.fresh(now) and self.ctx.store.exists(e)]

    async def _send_tar(self, request: Any, job: str, entries: list[Entry]) -> Any:
        stream = TarStream(self.ctx.store, archive_parts([(_relative(job, e), e) for e in entries]))
        metrics = self.ctx.metrics
        metrics.form(ARTIFACTS, "download", "hit")
        request.setHeader(b"Content-Type", b"application/x-tar")
        request.setHeader(b"Content-Length", str(stream.size).encode())
        request.setHeader(b"Content-Disposition", _disposition(f"{job}.tar"))
        request.setHeader(b"X-Cache", b"HIT")
        if request.method == b"HEAD":
            finish_safely(request)
            return None
        d: Deferred[None] = send_generated(request, stream.read, stream.size,
                                           metrics.bytes_counter(ARTIFACTS, "cache"))
        try:
            await d
        finally:
            stream.close()
        return None

    async def expire(self) -> None:
        """Remove artifacts past their retention (reads already stopped seeing them)."""
        now = self.ctx.clock.seconds()
        store = self.ctx.store
        for entry in await store.list(ARTIFACTS, limit=None):
            if not entry.fresh(now):
                await store.purge_key(entry.key)

    @app.route("/artifacts/", methods=["GET", "HEAD", "POST"])
    def no_job(self, request: Any) -> Any:
        raise HTTPError(404, "expected /artifacts/<job>")


def artifact_path(request: Any) -> str:
    """The ``path`` query argument of an upload: relative, without dot or empty
    segments, backslashes or control characters (it becomes a tar member name)."""
    path = _query(request, "path")
    if not path:
        raise HTTPError(400, "expected ?path=<relative path of the artifact>")
    if len(path) > MAX_NAME:
        raise HTTPError(400, f"artifact paths are at most {MAX_NAME} characters")
    if _CONTROL.search(path) or "\\" in path:
        raise HTTPError(400, "artifact paths may not hold control characters or backslashes")
    if path.startswith("/"):
        raise HTTPError(400, "artifact paths are relative (no leading /)")
    if any(s in ("", ".", "..") for s in path.split("/")):
        raise HTTPError(400, "artifact paths may not hold '.', '..' or empty segments")
    return path


def _query(request: Any, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    try:
        return bytes(values[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name}: not valid UTF-8") from None


def _relative(job: str, entry: Entry) -> str:
    return entry.path[len(job) + 1:]


def _listing(job: str, entry: Entry) -> dict[str, Any]:
    return {"path": _relative(job, entry), "size": entry.size, "sha256": entry.digest,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.fetched))}


def _disposition(filename: str) -> bytes:
    return ('attachment; filename="%s"' % filename.replace('"', "")).encode("utf-8")


def _json(request: Any, obj: Any) -> bytes:
    body = json.dumps(obj).encode() + b"\n"
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body
