"""Errors in the OCI Distribution JSON form: ``{"errors": [{"code", "message", "detail"}]}``."""

from __future__ import annotations

import json
from typing import Any

from sparkcache.web.errors import ErrorFormat, ErrorReply, HTTPError, add_error_handling, set_headers
from sparkcache.web.paths import BadPath
from sparkcache.web.serve import error_message

# Spec error codes and the HTTP status each usually travels with.
CODES = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 404,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "RANGE_INVALID": 416,
    "UNAVAILABLE": 503,
}


class OCIError(HTTPError):
    """An error a registry client understands; ``status`` defaults from the code."""

    def __init__(self, code: str, message: str, status: int | None = None, detail: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status or CODES.get(code, 400), message, headers)
        self.code = code
        self.detail = detail


def oci_error_body(request: Any, status: int, code: str, message: str, detail: Any = None,
                   headers: dict[str, str] | None = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    body = json.dumps({"errors": [err]}).encode() + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
    for k, v in (headers or {}).items():
        request.setHeader(k.encode(), v.encode())
    request.setHeader(b"Content-Length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body


# Fallback for an AuthError that did not go through sparkcache.protocols.oci.setup.authorize
# (which challenges with the /setup/token realm): registry clients answer a
# Basic challenge with their credentials, which auth.py accepts (token as
# password), whereas Bearer realm="sparkcache" is no URL they could follow.
CHALLENGE = 'Basic realm="sparkcache"'


def code_for_status(status: int, default: str = "UNAVAILABLE") -> str:
    return {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 405: "UNSUPPORTED", 416: "RANGE_INVALID",
            429: "TOOMANYREQUESTS"}.get(status, default)


def as_oci(request: Any, out: bytes | None) -> bytes | None:
    """Re-render an error body from the generic serving helpers (416, a vanished
    cached body) in the OCI form; anything else passes through."""
    code = getattr(request, "code", 200)
    if not isinstance(out, bytes) or code < 400:
        return out
    return oci_error_body(request, code, code_for_status(code), error_message(out))


def render_oci(request: Any, reply: ErrorReply) -> bytes:
    body = oci_error_body(request, reply.status, reply.code or code_for_status(reply.status), reply.message,
                          reply.detail)
    set_headers(request, reply.headers)
    return body


OCI = ErrorFormat(
    render_oci,
    rules=(
        (OCIError, lambda e, request: ErrorReply(e.status, e.message, e.headers, e.code, e.detail)),
        (BadPath, lambda e, request: ErrorReply(e.status, str(e), code="NAME_INVALID")),
    ),
    challenge=CHALLENGE,
)


def oci_errors(app: Any) -> None:
    """Give ``app`` the OCI error handlers (registry clients read nothing else)."""
    add_error_handling(app, OCI)
