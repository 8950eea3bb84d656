"""Domain errors that handlers raise and each protocol app renders in its format."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def json_errors(app: Any) -> None:
    """Render HTTPError, AuthError and BadPath raised by ``app``'s handlers as JSON."""
    from sparkcache.auth import REALM, AuthError
    from sparkcache.web.paths import BadPath
    from sparkcache.web.serve import error_body

    @app.handle_errors(HTTPError)
    def _http_error(instance: Any, request: Any, failure: Any) -> bytes:
        e = failure.value
        return error_body(request, e.status, e.message, e.headers)

    @app.handle_errors(AuthError)
    def _auth_error(instance: Any, request: Any, failure: Any) -> bytes:
        e = failure.value
        return error_body(request, e.status, e.message, {"WWW-Authenticate": REALM} if e.status == 401 else None)

    @app.handle_errors(BadPath)
    def _bad_path(instance: Any, request: Any, failure: Any) -> bytes:
        return error_body(request, failure.value.status, str(failure.value))


def internal_error(request: Any, failure: Failure) -> bytes:
    """An unexpected exception: logged, and answered with a JSON 500 (Klein's default
    is twisted.web's HTML page). A response already under way is cut off instead,
    so the client sees a broken transfer rather than JSON spliced into it."""
    from werkzeug.exceptions import HTTPException

    from sparkcache.web.serve import error_body

    e: Any = failure.value
    if isinstance(e, HTTPException):
        return error_body(request, e.code or 500, e.description or e.name)
    log.failure("{method} {uri} failed", failure, method=request.method, uri=request.uri)
    if getattr(request, "startedWriting", False):
        transport = getattr(getattr(request, "channel", None), "transport", None)
        if transport is not None:
            transport.abortConnection()
        return b""
    return error_body(request, 500, f"internal error ({type(e).__name__}); see the cache's log")
