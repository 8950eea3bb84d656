"""Git smart HTTP, read-only: ``/git/<name>/info/refs`` and ``/git/<name>/git-upload-pack``.

Clones are answered by ``git upload-pack --stateless-rpc`` run on the
pygit2-managed mirror (the IMirrors the app is built with); pushes are refused with a
message naming the upstream. ``/git/register``, ``/git/refresh`` and
``GET /repos`` manage the mirrors. See docs/git.rst.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import IO, Any
from urllib.parse import parse_qs

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IConsumer, IProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from zope.interface import implementer

from sparkcache.context import Context
from sparkcache.git.interfaces import IMirrors, Mirror, MirrorUnavailable, UnknownRepo
from sparkcache.git.packcache import PackCache
from sparkcache.git.pktline import FLUSH, PktError, UploadRequest, parse_request, pkt_line
from sparkcache.git.uploadpack import spawn_upload_pack
from sparkcache.protocols.git import webhook
from sparkcache.protocols.git.policy import require_registration
from sparkcache.protocols.git.errors import ADVERTISEMENT, RESULT, SMART_HTTP
from sparkcache.web.bodies import BodyDecision, checked
from sparkcache.web.errors import HTTPError, add_error_handling, guarded
from sparkcache.web.paths import split_raw_path, vet_request
from sparkcache.web.serve import header

log = Logger()

DEFAULT_MAX_BODY = 64 << 20
# Seconds during which wants that one upstream fetch did not bring do not start another.
MISSING_RETRY = 10.0
_GIT_PROTOCOL = re.compile(r"^[A-Za-z0-9=:._-]{1,256}$")


def git_protocol_of(request: Any) -> str | None:
    """The ``Git-Protocol`` header when well-formed (it goes into a child's environment)."""
    value = header(request, b"git-protocol")
    if value and _GIT_PROTOCOL.match(value):
        return value
    return None


def is_v2(git_protocol: str | None) -> bool:
    return bool(git_protocol) and "version=2" in (git_protocol or "").split(":")


class BodyTooLarge(Exception):
    pass


def decode_body(content: IO[bytes], encoding: str, cap: int) -> bytes:
    """The request body, gunzipped when ``encoding`` says so, at most ``cap`` bytes
    once decoded (blocking: runs in a thread). Raises BodyTooLarge, or
    ValueError for a malformed body or an unknown encoding."""
    content.seek(0)
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        data = content.read(cap + 1)
        if len(data) > cap:
            raise BodyTooLarge()
        return data
    if encoding not in ("gzip", "x-gzip"):
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    z = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = bytearray()
    try:
        while not z.eof:
            chunk = content.read(256 * 1024)
            if not chunk:
                break
            while chunk and not z.eof:
                # max_length bounds the output of this one call: a gzip bomb
                # never inflates past the cap in memory.
                out += z.decompress(chunk, cap + 1 - len(out))
                if len(out) > cap:
                    raise BodyTooLarge()
                chunk = z.unconsumed_tail
    except zlib.error as e:
        raise ValueError(f"malformed gzip body: {e}") from None
    if not z.eof:
        raise ValueError("truncated gzip body")
    return bytes(out)


def missing_objects(path: str, oids: list[str], refs: list[str] | None = None) -> list[str]:
    """The ids among ``oids`` and the ref names among ``refs`` (v2 ``want-ref``)
    that the repository at ``path`` lacks (runs in the git pool)."""
    import pygit2

    repo = pygit2.Repository(path)
    try:
        out = [o for o in oids if o not in repo]
        for name in refs or ():
            try:
                repo.references[name]
            except (KeyError, ValueError, pygit2.InvalidSpecError):
                out.append(name)
        return out
    finally:
        repo.free()


@implementer(IConsumer)
class ResponseConsumer:
    """Hands upload-pack's output to the request, setting the headers (and writing
    ``prefix``) at the first byte, so that a child dying before any output can
    still be answered with a proper error instead of an empty 200."""

    def __init__(self, request: Any, content_type: bytes, prefix: bytes = b"") -> None:
        self.request = request
        self.content_type = content_type
        self.prefix = prefix
        self.written = 0
        self.producer: IProducer | None = None
        request.notifyFinish().addErrback(self._gone)

    def _gone(self, _: Failure) -> None:
        # Client disconnected: end the child now rather than let it compute
        # a pack nobody will read.
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stopProducing()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if getattr(self.request, "_disconnected", False):
            producer.stopProducing()
            return
        self.producer = producer
        self.request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.producer is None:
            return
        self.producer = None
        if not getattr(self.request, "_disconnected", False):
            self.request.unregisterProducer()

    def start(self) -> None:
        self.request.setHeader(b"Content-Type", self.content_type)
        self.request.setHeader(b"Cache-Control", b"no-cache")
        if self.prefix:
            self.request.write(self.prefix)
            self.written += len(self.prefix)

    def write(self, data: bytes) -> None:
        if not self.written:
            self.start()
        self.written += len(data)
        self.request.write(data)


class GitApp:
    app = Klein()

    def __init__(self, ctx: Context, mirrors: IMirrors, reactor: Any, packcache: Any = None) -> None:
        self.ctx = ctx
        # Typed loosely: status, register, serving... are extras of the real Mirrors.
        self.mirrors: Any = mirrors
        self.reactor = reactor
        self.packcache = packcache
        self.reconfigure(ctx.config)
        self.max_path = ctx.config.server.max_path_length
        self._still_missing: dict[str, tuple[float, frozenset[str]]] = {}
        self._gate = checked(SMART_HTTP, self._body_checks)

    def reconfigure(self, config: Any) -> None:
        """A new running configuration (Built.reconfigure); webhooks are read per request."""
        self.max_body = getattr(config.git, "max_upload_pack_body", DEFAULT_MAX_BODY) or DEFAULT_MAX_BODY

    def resource(self) -> IResource:
        return guarded(self.app, SMART_HTTP, self.max_path)

    add_error_handling(app, SMART_HTTP)

    @property
    def git(self) -> Any:
        return self.mirrors

    # -- dispatch ------------------------------------------------------------------

    @app.route("/", branch=True, strict_slashes=False, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
    async def dispatch(self, request: Any) -> Any:
        segments = [s for s in split_raw_path(request.uri, self.max_path) if s]
        query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
        method = request.method
        if getattr(getattr(self.git, "registry", None), "changes", None) is not None:
            # Worker processes: registrations another one made (a memory read when none).
            await self.git.synced()
        if segments[:1] == ["repos"]:
            if segments == ["repos", "hosts"] and hasattr(self.git, "hosts"):
                _only(method, b"GET", b"HEAD")
                self.ctx.auth.require(request, "read")
                view = getattr(self.git, "hosts_view", None)
                return _json(request, await view() if view is not None else self.git.hosts())
            if len(segments) != 1:
                raise HTTPError(404, "no such resource; GET /repos lists the mirrors, GET /repos/hosts the forges")
            _only(method, b"GET", b"HEAD")
            self.ctx.auth.require(request, "read")
            return _json(request, await _maybe(self.git.status()))
        rest = segments[1:]
        if rest == ["webhook"]:
            _only(method, b"POST")
            return await self.webhook(request)
        if rest == ["register"]:
            _only(method, b"POST")
            return await self.register(request, query)
        if rest == ["refresh"]:
            _only(method, b"POST")
            return await self.refresh(request, query)
        if len(rest) >= 3 and rest[-2:] == ["info", "refs"]:
            _only(method, b"GET", b"HEAD")
            service = _param(query, "service")
            name = _repo_name(rest[:-2])
            if service == "git-receive-pack":
                return await self.refuse_push(request, name)
            if service != "git-upload-pack":
                raise HTTPError(403, "only the smart HTTP protocol is served (info/refs?service=git-upload-pack)")
            return await self.advertise(request, name)
        if len(rest) >= 2 and rest[-1] == "git-upload-pack":
            _only(method, b"POST")
            return await self.upload_pack(request, _repo_name(rest[:-1]))
        if len(rest) >= 2 and rest[-1] == "git-receive-pack":
            return await self.refuse_push(request, _repo_name(rest[:-1]))
        raise HTTPError(404, "not a git smart HTTP path; clone http://<cache>/git/<name>")

    def body_gate(self, request: Any) -> BodyDecision:
        """Refuses a POST by the checks ``dispatch`` makes before reading its body
        (scope, repository, size); the small bodies it lets in are parsed in memory."""
        return self._gate(request)

    def _body_checks(self, request: Any) -> BodyDecision:
        vet_request(request, self.max_path)
        segments = [s for s in split_raw_path(request.uri, self.max_path) if s]
        rest = segments[1:]
        if request.method != b"POST" or segments[:1] == ["repos"]:
            return None
        if rest == ["register"]:
            self.ctx.auth.require(request, "write")
        elif rest == ["webhook"]:
            # No token: the forge's signature over the body is the credential.
            length = header(request, b"content-length")
            if length and length.isdigit() and int(length) > webhook.MAX_PAYLOAD:
                raise HTTPError(413, f"webhook payload larger than {webhook.MAX_PAYLOAD} bytes")
        elif rest == ["refresh"]:
            self.ctx.auth.require(request, "read")
        elif len(rest) >= 2 and rest[-1] == "git-upload-pack":
            self.ctx.auth.require(request, "read")
            changes = getattr(getattr(self.git, "registry", None), "changes", None)
            if changes is None or not changes.stale():  # else dispatch looks after the re-read
                self.git.lookup(_repo_name(rest[:-1]))
            self._check_length(request)
        return None

    # -- serving -------------------------------------------------------------------

    async def _mirror(self, name: str) -> Mirror:
        git = self.git
        mirror = git.lookup(name)
        return await _maybe(git.ensure(mirror))  # type: ignore[no-any-return]

    async def advertise(self, request: Any, name: str) -> Any:
        self.ctx.auth.require(request, "read")
        mirror = await self._mirror(name)
        freshen = getattr(self.git, "freshen", None)
        if freshen is not None:
            # A mirror nobody looked at for fetch_interval is checked once before
            # its refs are advertised (idle ones are polled rarely).
            await freshen(mirror)
        git_protocol = git_protocol_of(request)
        # v2: upload-pack's capability advertisement is the whole answer; v0/v1
        # need the smart-HTTP service header before the ref advertisement.
        prefix = b"" if is_v2(git_protocol) else pkt_line(b"# service=git-upload-pack\n") + FLUSH
        out = ResponseConsumer(request, ADVERTISEMENT, prefix)
        await self._run_upload_pack(request, mirror, out, advertise=True, stdin=b"", git_protocol=git_protocol)
        return None

    async def upload_pack(self, request: Any, name: str) -> Any:
        self.ctx.auth.require(request, "read")
        git = self.git
        # A bad body is refused before anything is cloned for it.
        mirror = git.lookup(name)
        git_protocol = git_protocol_of(request)
        version = 2 if is_v2(git_protocol) else 0
        body = await self._read_body(request)
        try:
            parsed = parse_request(body, version)
        except PktError as e:
            raise HTTPError(400, f"malformed upload-pack request: {e}") from None
        mirror = await _maybe(git.ensure(mirror))
        if parsed.command == "fetch" and (parsed.wants or parsed.want_refs):
            await self._fetch_missing(mirror, parsed)
        out = ResponseConsumer(request, RESULT)
        if parsed.command == "fetch" and self.packcache is not None:
            token = self._acquire(mirror)
            try:
                if await self.packcache.serve(request, mirror, body, parsed, git_protocol):
                    return None
            finally:
                self._release(mirror, token)
        await self._run_upload_pack(request, mirror, out, advertise=False, stdin=body, git_protocol=git_protocol)
        return None

    async def _fetch_missing(self, mirror: Mirror, parsed: UploadRequest) -> None:
        """The just-pushed-commit race: a client wants an object that upstream has
        but the mirror has not fetched yet. Fetch once (joining any running fetch),
        then serve whatever the mirror has; upload-pack reports what is still missing."""
        git = self.git
        # want-ref names a ref (a branch pushed a moment ago), not an object.
        missing = await git.run(missing_objects, mirror.path, list(parsed.wants), list(parsed.want_refs))
        if not missing:
            return
        now = self.reactor.seconds()
        recent = self._still_missing.get(mirror.path)
        if recent is not None and now - recent[0] < MISSING_RETRY and set(missing) <= recent[1]:
            # The same unknown ids again right after a fetch that did not bring
            # them: a typo'd or force-pushed-away id must not make every retry
            # hit the forge.
            return
        log.info("{repo}: {n} wanted object(s) or ref(s) not in the mirror; fetching upstream", repo=mirror.name, n=len(missing))
        try:
            await _maybe(git.refresh(mirror))
        except Exception as e:
            log.warn("{repo}: refresh for missing objects failed: {why}", repo=mirror.name, why=str(e) or repr(e))
        wants = set(parsed.wants)
        still = await git.run(missing_objects, mirror.path, [m for m in missing if m in wants],
                              [m for m in missing if m not in wants])
        if len(self._still_missing) > 1000:
            self._still_missing.clear()
        if still:
            self._still_missing[mirror.path] = (now, frozenset(still))
        else:
            self._still_missing.pop(mirror.path, None)

    def _check_length(self, request: Any) -> None:
        length = header(request, b"content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise HTTPError(413, f"upload-pack request body larger than {self.max_body} bytes")

    async def _read_body(self, request: Any) -> bytes:
        self._check_length(request)
        encoding = header(request, b"content-encoding") or ""
        try:
            return await self.ctx.store.in_io(decode_body, request.content, encoding, self.max_body)
        except BodyTooLarge:
            raise HTTPError(413, f"upload-pack request body larger than {self.max_body} bytes once decoded") from None
        except ValueError as e:
            raise HTTPError(415 if "Content-Encoding" in str(e) else 400, str(e)) from None

    async def _run_upload_pack(self, request: Any, mirror: Mirror, out: ResponseConsumer, *, advertise: bool,
                               stdin: bytes, git_protocol: str | None) -> None:
        if getattr(request, "_disconnected", False):
            return
        token = self._acquire(mirror)
        stderr = bytearray()
        done = spawn_upload_pack(self.reactor, mirror.path, advertise=advertise, stdin=stdin,
                                 git_protocol=git_protocol, consumer=out, stderr=stderr)
        # Released when the child is gone, even if this handler is cancelled
        # (client disconnect) first: maintenance must not repack under it.
        status: Deferred[int] = Deferred()

        def ended(code: int) -> int:
            self._release(mirror, token)
            status.callback(code)
            return code

        done.addCallback(ended)
        code = await status
        self._count("advertise" if advertise else "upload-pack", code, out.written)
        if code == 0 or getattr(request, "_disconnected", False):
            return
        if out.written == 0:
            # Nothing sent yet: an ERR packet makes git print the reason
            # ("remote error: ...") instead of a bare protocol error.
            reason = _last_line(stderr) or f"git upload-pack failed with status {code}"
            # The client has no business knowing where the data dir is.
            reason = reason.replace(mirror.path, mirror.name)
            out.prefix = b""
            out.write(pkt_line(f"ERR {reason}\n"[:60000]))
            return
        # Failing after output has started is how upload-pack reports a bad
        # request (an ERR packet, then exit 128): end the response normally so
        # git shows that message. A pack cut short is caught by git's checksum.
        log.info("{repo}: upload-pack exited {code} after {n} bytes: {err}", repo=mirror.name, code=code,
                 n=out.written, err=_last_line(stderr))

    def _count(self, kind: str, code: int, written: int) -> None:
        metrics = getattr(self.ctx, "metrics", None)
        if metrics is None:
            return
        metrics.response("git", kind if code == 0 else "error")
        if written:
            metrics.bytes_counter("git", "mirror")(written)

    def _acquire(self, mirror: Mirror) -> Any:
        """Mark a serve in flight, so maintenance does not prune objects under it."""
        git = self.mirrors
        serving = getattr(git, "serving", None)
        if serving is not None:
            cm = serving(mirror)
            cm.__enter__()
            return cm
        acquire = getattr(git, "acquire", None)
        if acquire is not None:
            acquire(mirror)
        return None

    def _release(self, mirror: Mirror, token: Any) -> None:
        if token is not None:
            token.__exit__(None, None, None)
            return
        release = getattr(self.mirrors, "release", None)
        if release is not None:
            release(mirror)

    async def refuse_push(self, request: Any, name: str) -> bytes:
        self.ctx.auth.require(request, "read")
        mirror = self.git.lookup(name)
        # git prints a text/plain error body line by line as "remote: ...".
        request.setResponseCode(403)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return (f"This is a read-only mirror of {mirror.url}\n"
                f"Push to the upstream instead: git push {mirror.url}\n").encode()

    # -- management ------------------------------------------------------------------

    async def webhook(self, request: Any) -> bytes:
        secrets = getattr(self.ctx.config.git, "webhooks", None) or {}
        if not secrets:
            raise HTTPError(404, "webhooks are not configured (git.webhooks)")
        try:
            body = await self.ctx.store.in_io(decode_body, request.content, "", webhook.MAX_PAYLOAD)
        except BodyTooLarge:
            raise HTTPError(413, f"webhook payload larger than {webhook.MAX_PAYLOAD} bytes") from None
        code, answer = webhook.handle(secrets, request, body, self.git)
        request.setResponseCode(code)
        return _json(request, answer)

    async def register(self, request: Any, query: dict[str, list[str]]) -> bytes:
        self.ctx.auth.require(request, "write")
        url = _param(query, "repo") or _param(query, "url")
        if not url:
            raise HTTPError(400, "give the upstream as ?repo=URL (and optionally &name=NAME)")
        require_registration(self.ctx, request, self.git, url)
        name = _param(query, "name") or None
        git = self.git
        known = {m.url for m in git.mirrors()} if hasattr(git, "mirrors") else set()
        try:
            mirror = await _maybe(git.register(name, url))
        except (UnknownRepo, MirrorUnavailable):
            raise
        except ValueError as e:
            raise HTTPError(409 if "already registered" in str(e) else 400, str(e)) from None
        created = mirror.url not in known
        flushed = getattr(git, "flushed", None)
        if flushed is not None:  # worker processes: the next request may reach another one
            await flushed()
        # Clone now, so the first clone through the cache finds a warm mirror;
        # a failure is logged and retried on first use.
        warm = ensureDeferred(_maybe(git.ensure(mirror)))
        warm.addErrback(lambda f: log.warn("{repo}: first clone failed: {why}", repo=mirror.name,
                                           why=f.getErrorMessage()))
        request.setResponseCode(201 if created else 200)
        return _json(request, {"name": mirror.name, "url": mirror.url, "created": bool(created)})

    async def refresh(self, request: Any, query: dict[str, list[str]]) -> bytes:
        # A read: clients ask for one after a push. What keeps anonymous callers
        # from driving the forge is the mirror's pacing (one fetch in flight, the
        # next min_fetch_interval after it; callers in between join it).
        self.ctx.auth.require(request, "read")
        key = _param(query, "name") or _param(query, "repo")
        if not key:
            raise HTTPError(400, "give ?name=NAME or ?repo=URL")
        git = self.git
        mirror = await self._mirror(key)
        try:
            refs = await _maybe(git.refresh(mirror))
        except (UnknownRepo, MirrorUnavailable):
            raise
        except Exception as e:
            raise HTTPError(502, f"fetching {mirror.url} failed: {e}") from None
        return _json(request, {"name": mirror.name, "url": mirror.url, "refs": refs})


def _last_line(stderr: bytearray) -> str:
    text = bytes(stderr).decode("utf-8", "replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].removeprefix("fatal: ") if lines else ""


async def _maybe(value: Any) -> Any:
    if isinstance(value, Deferred):
        return await value
    if hasattr(value, "__await__"):
        return await value
    return value


def _only(method: bytes, *allowed: bytes) -> None:
    if method not in allowed:
        raise HTTPError(405, f"{method.decode('latin-1')} is not allowed here",
                        {"Allow": ", ".join(m.decode() for m in allowed)})


def _param(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    return values[0] if values else ""


def _repo_name(segments: list[str]) -> str:
    if not segments:
        raise HTTPError(404, "no repository named; clone http://<cache>/git/<name>")
    name = "/".join(segments)
    return name[:-4] if name.endswith(".git") else name


def _json(request: Any, obj: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(obj, default=str).encode() + b"\n"
