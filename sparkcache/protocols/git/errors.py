"""How git's two apps answer errors.

Smart HTTP keeps its status codes: git asks its credential helper on a 401,
says "repository not found" on a 404, and scripts check the rest. What the
body says depends on who asks, because git shows so little of a failed request:

- git's ``POST .../git-upload-pack`` (it sends ``Accept:
  application/x-git-upload-pack-result``): git never shows the body of a
  failed POST, only "RPC failed; HTTP 503", but prints an ``ERR`` packet as
  "remote error: <message>". So the error goes as one, in a 200 response, as
  upload-pack's own errors do; a 401 stays a 401 so that git can retry with
  credentials.
- git's ``GET .../info/refs``: git prints a text/plain error body line by line
  as "remote: <line>" before its own message; so the message goes as text.
- Everyone else (curl, scripts, ``/git/register``, ``/repos``, the read API): JSON.
"""

from __future__ import annotations

from typing import Any

from sparkcache.auth import REALM
from sparkcache.git import reads, uploads
from sparkcache.git.interfaces import MirrorLimit, MirrorUnavailable, UnknownRepo
from sparkcache.git.pktline import pkt_line
from sparkcache.web.errors import ErrorFormat, ErrorReply, ReplyRule, render_json, set_headers

ADVERTISEMENT = b"application/x-git-upload-pack-advertisement"
RESULT = b"application/x-git-upload-pack-result"
# git asks for (and its credential helpers supply) Basic credentials only.
BASIC_REALM = 'Basic realm="sparkcache"'
# pkt-line payloads are at most 65516 bytes; no message needs that many.
MAX_ERR = 60000


def _unknown(e: UnknownRepo, request: Any) -> ErrorReply:
    return ErrorReply(404, f"unknown repository: {e}" if str(e) else "unknown repository")


MIRROR_RULES: tuple[ReplyRule, ...] = (
    (UnknownRepo, _unknown),
    # Insufficient Storage: retrying will not help until the operator acts.
    (MirrorLimit, lambda e, request: ErrorReply(507, f"no new mirror: {e}")),
    (MirrorUnavailable, lambda e, request: ErrorReply(503, f"mirror unavailable: {e}", {"Retry-After": "30"})),
)


def _from_git(request: Any) -> bool:
    agent = request.getHeader(b"user-agent") or b""
    return agent.startswith(b"git/") or request.getHeader(b"git-protocol") is not None


def render_git(request: Any, reply: ErrorReply) -> bytes:
    path = bytes(request.path)
    accept = request.getHeader(b"accept") or b""
    if reply.status != 401 and request.method == b"POST" and path.endswith(b"/git-upload-pack") and RESULT in accept:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", RESULT)
        request.setHeader(b"Cache-Control", b"no-store")
        return pkt_line(f"ERR {reply.message}".encode()[:MAX_ERR] + b"\n")
    if path.endswith(b"/info/refs") and _from_git(request):
        request.setResponseCode(reply.status)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        set_headers(request, reply.headers)
        return reply.message.encode("utf-8") + b"\n"
    return render_json(request, reply)


# /git/... and /repos: clones and fetches, mirror management.
SMART_HTTP = ErrorFormat(render_git, MIRROR_RULES, challenge=(BASIC_REALM, REALM))

# /archive, /file, /tree-hash, /branch-contains, /upload(s), /sync: the read API and code sync.
READ_API = ErrorFormat(
    render_json,
    (*MIRROR_RULES, ((reads.ReadError, uploads.UploadError), lambda e, request: ErrorReply(e.status, e.message))),
    not_found="no such endpoint; see docs/git-read-api.rst",
)
