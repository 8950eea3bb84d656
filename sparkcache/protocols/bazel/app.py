"""``/bazel/<remote>/[<prefix>/]{ac,cas}/<sha256>``: Bazel's HTTP remote cache.

Bazel (``--remote_cache=http://host/bazel/<remote>[/<prefix>]``) speaks
plain GET/PUT (HEAD too, from newer versions and other clients):

- ``cas/<sha256>`` holds blobs named by their content: an upload whose
  sha256 is not its key is refused (400) and nothing is kept; a second upload
  of a stored key is idempotent (200) and never rewrites the bytes. CAS blobs
  are shared by every prefix of the remote: the name is the content.
- ``ac/<sha256>`` holds ActionResults named by the action's digest; an
  action may be re-run (a flaky one) and its result re-uploaded, so an AC
  entry is overwritten. A prefix (the path after the remote, Bazel's way of
  naming an instance over HTTP) namespaces the AC.
- A PUT must announce its Content-Length (411): Bazel always does, and a
  chunked body could not be refused at ``max_entry_size`` before it is read.

**No AC entry outlives its outputs.** An AC hit makes Bazel skip the action
and fetch its outputs; an output missing then is the "lost inputs" failure
(Bazel 7.4) HTTP caches caused by evicting CAS blobs under live AC entries.
So an AC read checks every CAS blob the ActionResult names (output files,
stdout/stderr, output directories' Trees and their files: see
:mod:`.proto`): when one is gone the AC entry is deleted and the answer is a
miss, so Bazel runs the action and uploads everything again. The check also
touches those blobs, so LRU eviction keeps an action's outputs as recent as
the action. A body that is not an ActionResult names no blobs and is served
as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from klein import Klein
from twisted.logger import Logger
from twisted.web.resource import IResource

from sparkcache.context import Context
from sparkcache.config import Config
from sparkcache.protocols._keyed import KeyedBlobs, keyed_tables
from sparkcache.protocols.bazel.options import BazelOptions, options_of
from sparkcache.protocols.bazel.proto import Digest, NotAMessage, action_result_references, tree_files
from sparkcache.store import Entry
from sparkcache.web.bodies import BodyDecision, announced_length, checked
from sparkcache.web.errors import JSON, HTTPError, add_error_handling, guarded
from sparkcache.web.paths import split_raw_path

log = Logger()
BAZEL_TYPES = ("bazel",)
METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"]
OCTET = "application/octet-stream"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_PREFIX_SEGMENTS = 16
# An ActionResult names its outputs, it does not hold them (Bazel never inlines
# them over HTTP): anything larger is refused, so the read check stays bounded.
AC_LIMIT = 16 << 20
# A Tree lists every file of an output directory; a larger one cannot be checked, so it is a miss.
TREE_LIMIT = 64 << 20
# Bodies up to this size are parsed on the reactor; larger ones in the I/O pool.
INLINE_PARSE = 64 << 10
USAGE = "use /bazel/<remote>/[<prefix>/]ac/<sha256> or /bazel/<remote>/[<prefix>/]cas/<sha256>"

T = TypeVar("T")


@dataclass(frozen=True)
class Address:
    remote: str
    prefix: str  # "" or "a/b"
    kind: str  # "ac" or "cas"
    digest: str

    @property
    def name(self) -> str:
        """The key in the remote: AC per prefix, CAS shared by all prefixes."""
        if self.kind == "cas":
            return cas_name(self.digest)
        return f"{self.prefix}/ac/{self.digest}" if self.prefix else f"ac/{self.digest}"


def cas_name(digest: str) -> str:
    return f"cas/{digest}"


class BazelApp:
    app = Klein()
    add_error_handling(app, JSON)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.blobs: dict[str, KeyedBlobs] = {}
        self.reconfigure(ctx.config)
        self.body_gate = checked(JSON, self._body_checks)

    def reconfigure(self, config: Config) -> None:
        """The remotes of ``config`` from now on (Built.reconfigure)."""
        remotes = {n: r for n, r in config.remotes.items() if r.type in BAZEL_TYPES}
        self.blobs = keyed_tables(self.ctx, self.blobs, remotes.values(), JSON)
        self.options: dict[str, BazelOptions] = {n: options_of(r) for n, r in remotes.items()}
        self.remotes = remotes

    def resource(self) -> IResource:
        return guarded(self.app, JSON, self.ctx.config.server.max_path_length)

    # -- addresses ----------------------------------------------------------------

    def address(self, request: Any) -> Address:
        """The entry a request names, from its raw path (404/400 in JSON otherwise)."""
        segs = split_raw_path(bytes(request.uri), self.ctx.config.server.max_path_length)
        if len(segs) < 2 or segs[0] != "bazel":
            raise HTTPError(404, USAGE)
        remote = segs[1]
        if remote not in self.blobs:
            raise HTTPError(404, f"no type: bazel remote named {remote!r}")
        rest = segs[2:]
        if len(rest) < 2 or rest[-2] not in ("ac", "cas") or not rest[-1]:
            raise HTTPError(404, USAGE)
        kind, digest, prefix = rest[-2], rest[-1], rest[:-2]
        if not SHA256_HEX.fullmatch(digest):
            raise HTTPError(400, f"{kind} keys are sha256 digests: 64 lowercase hex digits, not {digest[:80]!r}")
        if len(prefix) > MAX_PREFIX_SEGMENTS or not all(PREFIX_SEGMENT.fullmatch(s) for s in prefix):
            raise HTTPError(400, f"an instance prefix is at most {MAX_PREFIX_SEGMENTS} segments of "
                                 "letters, digits, '.', '_' and '-'")
        return Address(remote, "/".join(prefix), kind, digest)

    # -- uploads -------------------------------------------------------------------

    def _upload_checks(self, request: Any) -> Address:
        """What a PUT must pass before its body is read: the same in the gate and the handler."""
        addr = self.address(request)
        self.ctx.auth.require(request, "write")
        length = announced_length(request)
        if length is None:
            raise HTTPError(411, "a PUT must announce its Content-Length")
        if addr.kind == "ac" and length > AC_LIMIT:
            self.ctx.metrics.form(addr.remote, "upload", "rejected")
            raise HTTPError(413, f"an ActionResult is at most {AC_LIMIT} bytes")
        return addr

    def _body_checks(self, request: Any) -> BodyDecision:
        if request.method != b"PUT":
            return None
        addr = self._upload_checks(request)
        return self.blobs[addr.remote].body_gate(request)

    # -- routes --------------------------------------------------------------------

    @app.route("/", branch=True, methods=METHODS)
    async def entry(self, request: Any) -> Any:
        method = request.method
        if method == b"PUT":
            return await self.upload(request, self._upload_checks(request))
        if method not in (b"GET", b"HEAD"):
            self.address(request)  # an unknown path is a 404 whatever the method
            raise HTTPError(405, f"{method.decode('latin-1')} is not allowed here", {"Allow": "GET, HEAD, PUT"})
        addr = self.address(request)
        self.ctx.auth.require(request, "read")
        blobs = self.blobs[addr.remote]
        if addr.kind == "ac" and self.options[addr.remote].check_references:
            entry = await blobs.get(addr.name)
            if entry is not None and not await self.outputs_present(blobs, entry):
                self.ctx.metrics.form(addr.remote, "ac", "dangling")
                self.ctx.metrics.form(addr.remote, "entry", "miss")
                try:
                    await blobs.delete(addr.name)
                except Exception:  # a store that fails still answers the miss
                    log.failure("{remote}: deleting a dangling action result failed", remote=addr.remote)
                raise HTTPError(404, f"an output of action {addr.digest} is gone; run it again")
        return await blobs.serve(request, addr.name)

    async def upload(self, request: Any, addr: Address) -> bytes:
        blobs = self.blobs[addr.remote]
        cas = addr.kind == "cas"
        stored = await blobs.put(request, addr.name, {"content-type": OCTET},
                                 expected_sha256=addr.digest if cas else None, overwrite=not cas)
        request.setResponseCode(201 if stored.created else 200)
        request.setHeader(b"Content-Length", b"0")
        return b""

    # -- the reference check ------------------------------------------------------

    async def _parse(self, data: bytes, parse: Callable[[bytes], T]) -> T:
        if len(data) <= INLINE_PARSE:
            return parse(data)
        return await self.ctx.store.in_io(parse, data)

    async def _read(self, entry: Entry, limit: int) -> bytes | None:
        try:
            data = await self.ctx.store.read(entry, limit)
        except OSError:
            return None
        return data if len(data) <= limit else None

    async def outputs_present(self, blobs: KeyedBlobs, entry: Entry) -> bool:
        """Whether every CAS blob the ActionResult ``entry`` names is stored
        (and touched: read together, they are evicted together)."""
        data = await self._read(entry, AC_LIMIT)
        if data is None:
            return False
        try:
            refs = await self._parse(data, action_result_references)
        except NotAMessage:
            return True  # not an ActionResult (a client's own format): it names no blobs
        seen: set[str] = set()
        if not await self._present(blobs, refs.blobs, seen):
            return False
        for tree in refs.trees:
            tree_entry = await blobs.get(cas_name(tree.hash))
            if tree_entry is None:
                return False
            body = await self._read(tree_entry, TREE_LIMIT)
            if body is None:
                return False
            try:
                files = await self._parse(body, tree_files)
            except NotAMessage:
                return False  # Bazel could not read it either
            if not await self._present(blobs, files, seen):
                return False
        return True

    async def _present(self, blobs: KeyedBlobs, digests: Any, seen: set[str]) -> bool:
        d: Digest
        for d in digests:
            if d.hash in seen:
                continue
            seen.add(d.hash)
            if await blobs.get(cas_name(d.hash)) is None:
                return False
        return True
