"""Errors in each protocol's own format, for every request.

Handlers raise domain errors (HTTPError, AuthError, BadPath, a protocol's
own). :func:`add_error_handling` gives a Klein app ordered handlers that turn
each into an :class:`ErrorReply` and render it with the app's
:class:`ErrorFormat`: first the app's own exceptions, then the ones every app
shares, then werkzeug's routing errors (404, 405, redirects), then a
catch-all, as tahoe-lafs's storage server does. So neither Klein's, werkzeug's
nor twisted.web's HTML pages ever reach a client.

:func:`guarded` vets the raw request before Klein decodes it: Klein answers a
path that is not UTF-8 itself, in text, and logs a traceback per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from sparkcache.auth import REALM, AuthError
from sparkcache.web.paths import BadPath, vet_request
from sparkcache.web.serve import error_body

log = Logger()


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# One header value, or several (git's 401 offers two challenges).
HeaderValue = Union[str, Sequence[str]]


@dataclass(frozen=True)
class ErrorReply:
    """What an error response says, before a format renders it."""

    status: int
    message: str
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    # The protocol's own error code, when the exception names one (OCI's NAME_UNKNOWN...).
    code: str | None = None
    detail: Any = None


ExceptionTypes = Union[type[Exception], tuple[type[Exception], ...]]
# Exception types, and how to turn one of them (and its request) into a reply.
ReplyRule = tuple[ExceptionTypes, Callable[[Any, Any], ErrorReply]]


@dataclass(frozen=True)
class ErrorFormat:
    """How one app answers errors."""

    # Sets the status and headers of the request from the reply; returns the body.
    render: Callable[[Any, ErrorReply], bytes]
    # The app's own exceptions, tried in order before those every app shares.
    rules: Sequence[ReplyRule] = ()
    # The WWW-Authenticate challenge(s) a 401 from AuthError carries.
    challenge: HeaderValue = REALM
    # The message for a path none of the app's routes matches.
    not_found: str = "no such endpoint"

    def all_rules(self) -> list[ReplyRule]:
        """The app's rules, then those every app shares, in the order they are tried."""

        def auth(e: AuthError, request: Any) -> ErrorReply:
            return ErrorReply(e.status, e.message, {"WWW-Authenticate": self.challenge} if e.status == 401 else {})

        return [
            *self.rules,
            (HTTPError, lambda e, request: ErrorReply(e.status, e.message, e.headers)),
            (AuthError, auth),
            (BadPath, lambda e, request: ErrorReply(e.status, str(e))),
            # Before HTTPException, of which both are subclasses.
            (RequestRedirect, lambda e, request: ErrorReply(e.code, f"moved to {e.new_url}", {"Location": e.new_url})),
            (NotFound, lambda e, request: ErrorReply(404, self.not_found)),
            (MethodNotAllowed, _not_allowed),
            (HTTPException, lambda e, request: ErrorReply(e.code or 500, e.description or e.name)),
        ]

    def reply(self, error: Exception, request: Any) -> ErrorReply | None:
        """The reply for ``error`` by the first rule that matches it; None when none does."""
        for types, to_reply in self.all_rules():
            if isinstance(error, types):
                return to_reply(error, request)
        return None


def _not_allowed(e: MethodNotAllowed, request: Any) -> ErrorReply:
    return ErrorReply(405, f"{_method(request)} is not allowed here", {"Allow": ", ".join(e.valid_methods or [])})


def set_headers(request: Any, headers: Mapping[str, HeaderValue]) -> None:
    for name, value in headers.items():
        values = [value] if isinstance(value, str) else list(value)
        request.responseHeaders.setRawHeaders(name.encode("latin-1"), [v.encode("latin-1") for v in values])


def render_json(request: Any, reply: ErrorReply) -> bytes:
    """``{"error": message, "status": status}``: the format of every app without one of its own."""
    body = error_body(request, reply.status, reply.message)
    set_headers(request, reply.headers)
    return body


JSON = ErrorFormat(render_json)

# Headers that describe a body the handler meant to send, not the error body.
_BODY_HEADERS = (b"content-length", b"content-range", b"content-encoding", b"content-disposition", b"etag",
                 b"last-modified")


def send_error(request: Any, fmt: ErrorFormat, reply: ErrorReply) -> bytes:
    """Answer ``request`` with ``reply`` in ``fmt``; the body to write (empty for HEAD).

    A response already under way is cut off instead: the client sees a broken
    transfer rather than an error spliced into a body."""
    if getattr(request, "startedWriting", False):
        log.warn("{method} {path}: {status} {message} after the response started; connection aborted",
                 method=_method(request), path=_path(request), status=reply.status, message=reply.message)
        transport = getattr(getattr(request, "channel", None), "transport", None)
        if transport is not None:
            transport.abortConnection()
        return b""
    for name in _BODY_HEADERS:
        request.responseHeaders.removeHeader(name)
    request.etag = request.lastModified = None
    body = fmt.render(request, reply)
    if not request.responseHeaders.hasHeader(b"content-length"):
        request.setHeader(b"Content-Length", b"%d" % len(body))
    return b"" if request.method == b"HEAD" else body


def internal_error(request: Any, failure: Failure, fmt: ErrorFormat = JSON) -> bytes:
    """An unexpected exception: logged with its traceback, answered 500 in ``fmt``."""
    log.failure("{method} {path} failed", failure, method=_method(request), path=_path(request))
    name = type(failure.value).__name__
    return send_error(request, fmt, ErrorReply(500, f"internal error ({name}); see the cache's log"))


def refuse_path(request: Any, error: BadPath, fmt: ErrorFormat) -> bytes:
    """A request no app may route (see :func:`vet_request`): answered in ``fmt``, logged in one line."""
    log.info("refused {method} {path}: {why}", method=_method(request), path=ascii(_path(request)[:200]),
             why=str(error))
    return send_error(request, fmt, fmt.reply(error, request) or ErrorReply(error.status, str(error)))


def add_error_handling(app: Klein, fmt: ErrorFormat) -> None:
    """Register ``app``'s error handlers, in order, ending in a catch-all; call it
    in the class body, before any other ``handle_errors`` (the first match wins)."""

    def handler(to_reply: Callable[[Any, Any], ErrorReply]) -> Callable[..., bytes]:
        # Klein passes (instance, request, failure) to an app bound to an instance, else (request, failure).
        def handle(*args: Any) -> bytes:
            request, failure = args[-2], args[-1]
            return send_error(request, fmt, to_reply(failure.value, request))

        return handle

    for types, to_reply in fmt.all_rules():
        first, *more = types if isinstance(types, tuple) else (types,)
        app.handle_errors(first, *more)(handler(to_reply))
    app.handle_errors(Exception)(lambda *args: internal_error(args[-2], args[-1], fmt))


class Guarded(Resource):
    """An app's resource behind :func:`vet_request`: a request the app cannot
    route gets a 400 (or 414) in the app's format before Klein decodes it."""

    isLeaf = True

    def __init__(self, inner: IResource, fmt: ErrorFormat, max_path: int) -> None:
        super().__init__()
        self.inner, self.fmt, self.max_path = inner, fmt, max_path

    def render(self, request: Any) -> Any:
        try:
            vet_request(request, self.max_path)
        except BadPath as e:
            return refuse_path(request, e, self.fmt)
        return self.inner.render(request)


def guarded(app: Klein, fmt: ErrorFormat, max_path: int) -> IResource:
    """The resource of a Klein app (bound to its instance) whose errors are in ``fmt``."""
    return Guarded(app.resource(), fmt, max_path)


def _method(request: Any) -> str:
    return bytes(request.method).decode("latin-1")


def _path(request: Any) -> str:
    # Never the query string: it may carry signatures or tokens.
    return bytes(request.uri).split(b"?", 1)[0].decode("latin-1")
