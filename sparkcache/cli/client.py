"""The CLI's one HTTP client: the standard library's ``urllib.request``.

Every call answers ``Reply`` (status, headers, body) or raises
``CLIError`` with one line an operator can act on: the daemon could not be
reached, or it answered an error (its JSON ``error`` message, never a body
dump). The token goes in an ``Authorization`` header only; it never appears
in a message.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import quote, urlencode, urlsplit

DEFAULT_URL = "http://127.0.0.1:8090"
DEFAULT_TIMEOUT = 60.0
# An error body is a line of JSON; a larger one is not read whole.
MAX_ERROR_BODY = 64 << 10

# Exit statuses (see docs/cli.rst).
EXIT_ERROR = 1        # the daemon answered an error, or a command found one
EXIT_UNREACHABLE = 3  # no answer at all


class CLIError(Exception):
    """A one-line message for stderr and the process's exit status."""

    def __init__(self, message: str, status: int | None = None, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.exit_code = exit_code


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise CLIError(f"the daemon answered {self.status} with a body that is not JSON") from None

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def path_of(*segments: str) -> str:
    """``/a/b`` from path segments, each percent-encoded (a remote or repo name is one segment)."""
    return "".join("/" + quote(s, safe="") for s in segments)


class Client:
    """Requests to one daemon (``url`` is its base URL, e.g. ``http://cache:8090``)."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CLIError(f"--url must be an http:// or https:// URL, not {url!r}")
        if parts.username or parts.password:
            # A token in a URL ends up in shell history and process listings.
            raise CLIError("--url may not contain credentials: give the token with --token or SPARKCACHE_TOKEN")
        self.base = url.rstrip("/")
        self.token = token or None
        self.timeout = timeout
        # No proxy from the environment: the daemon is on this network, and a
        # CI runner's HTTP(S)_PROXY must not see the admin token.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, query: Mapping[str, str | None] | None = None, *, ok: tuple[int, ...] = ()) -> Reply:
        return self.request("GET", path, query, ok=ok)

    def post(self, path: str, query: Mapping[str, str | None] | None = None, body: Any = None) -> Reply:
        return self.request("POST", path, query, body=body)

    def request(self, method: str, path: str, query: Mapping[str, str | None] | None = None, *,
                body: Any = None, ok: tuple[int, ...] = ()) -> Reply:
        """One exchange. A 4xx/5xx raises CLIError, except the statuses listed in ``ok``."""
        url = self.base + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urlencode(params)
        data = None
        headers = {"Accept": "application/json", "User-Agent": "sparkcache-cli"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return Reply(resp.status, _headers(resp.headers), resp.read())
        except urllib.error.HTTPError as e:
            with e:
                reply = Reply(e.code, _headers(e.headers), e.read(MAX_ERROR_BODY))
            if e.code in ok:
                return reply
            raise CLIError(f"{method} {path}: {e.code} {error_message(reply)}", status=e.code) from None
        except OSError as e:
            raise self._unreachable(e, method, path) from None

    def open(self, method: str, path: str, query: Mapping[str, Any] | None = None, *, body: Any = None,
             headers: Mapping[str, str] | None = None, timeout: float | None = None) -> Any:
        """A response whose body the caller reads as a stream, then closes
        (bodies too large to hold: bundles). ``body``: a file object sent as it
        is read (give its Content-Length in ``headers``). Errors as ``request``."""
        url = self.base + path
        params = [(k, v) for k, vs in (query or {}).items() if vs is not None
                  for v in (vs if isinstance(vs, (list, tuple)) else [vs])]
        if params:
            url += "?" + urlencode(params)
        hdrs = {"User-Agent": "sparkcache-cli", **(headers or {})}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=body, headers=hdrs, method=method)
        try:
            return self._opener.open(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            with e:
                reply = Reply(e.code, _headers(e.headers), e.read(MAX_ERROR_BODY))
            raise CLIError(f"{method} {path}: {e.code} {error_message(reply)}", status=e.code) from None
        except OSError as e:
            raise self._unreachable(e, method, path) from None

    def _unreachable(self, e: OSError, method: str, path: str) -> CLIError:
        """The error for no answer at all (exit status 3)."""
        if isinstance(e, urllib.error.URLError):
            why = _reason(e.reason)
        elif isinstance(e, (socket.timeout, TimeoutError)):
            return CLIError(f"the daemon at {self.base} did not answer {method} {path} within {self.timeout:g}s",
                            exit_code=EXIT_UNREACHABLE)
        else:
            why = _reason(e)
        return CLIError(f"cannot reach the daemon at {self.base}: {why}", exit_code=EXIT_UNREACHABLE)


def error_message(reply: Reply) -> str:
    """The daemon's ``{"error": ...}`` message, else the first line of the body, else the reason."""
    try:
        doc = json.loads(reply.body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return doc["error"]
    text = reply.text().strip().splitlines()
    return text[0][:200] if text else "(no message)"


def _headers(msg: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in (msg.items() if msg is not None else ())}


def _reason(reason: Any) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__
