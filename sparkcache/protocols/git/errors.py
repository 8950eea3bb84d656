"""How git's two apps answer errors: JSON, with the mirror's exceptions mapped
to their statuses, and the Basic challenge git needs on a 401."""

from __future__ import annotations

from typing import Any

from sparkcache.auth import REALM
from sparkcache.git import reads, uploads
from sparkcache.git.interfaces import MirrorUnavailable, UnknownRepo
from sparkcache.web.errors import ErrorFormat, ErrorReply, ReplyRule, render_json

ADVERTISEMENT = b"application/x-git-upload-pack-advertisement"
RESULT = b"application/x-git-upload-pack-result"
# git asks for (and its credential helpers supply) Basic credentials only.
BASIC_REALM = 'Basic realm="sparkcache"'


def _unknown(e: UnknownRepo, request: Any) -> ErrorReply:
    return ErrorReply(404, f"unknown repository: {e}" if str(e) else "unknown repository")


MIRROR_RULES: tuple[ReplyRule, ...] = (
    (UnknownRepo, _unknown),
    (MirrorUnavailable, lambda e, request: ErrorReply(503, f"mirror unavailable: {e}", {"Retry-After": "30"})),
)


# /git/... and /repos: clones and fetches, mirror management.
SMART_HTTP = ErrorFormat(render_json, MIRROR_RULES, challenge=(BASIC_REALM, REALM))

# /archive, /file, /tree-hash, /branch-contains, /upload(s), /sync: the read API and code sync.
READ_API = ErrorFormat(
    render_json,
    (*MIRROR_RULES, ((reads.ReadError, uploads.UploadError), lambda e, request: ErrorReply(e.status, e.message))),
    not_found="no such endpoint; see docs/git-read-api.rst",
)
