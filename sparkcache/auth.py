"""Bearer-token authorisation with scopes (read ⊂ write ⊂ admin).

Clients send ``Authorization: Bearer <token>``, or Basic auth with the token
as the password, which is all apt, pip and helm can send. Tokens are compared
in constant time against every configured token, and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from sparkcache.config import AuthConfig

REALM = 'Bearer realm="sparkcache"'


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _fingerprint(token: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest's timing
    # independent of the tokens' lengths too.
    return hashlib.sha256(token.encode()).digest()


class Authorizer:
    def __init__(self, config: AuthConfig) -> None:
        self.anonymous_read = config.anonymous_read
        self._tokens = [(_fingerprint(t.token), t.scopes, t.name) for t in config.tokens]

    def presented(self, request: Any) -> str | None:
        header = request.getHeader(b"authorization")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return value.strip()
        if scheme == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
            except Exception:
                return ""
            return password or user
        return ""

    def scopes(self, token: str) -> frozenset[str] | None:
        fp = _fingerprint(token)
        found: frozenset[str] | None = None
        for candidate, scopes, _name in self._tokens:
            if hmac.compare_digest(fp, candidate) and found is None:
                found = scopes
        return found

    def identify(self, request: Any) -> str | None:
        """The configured name of the token the request presents, or None (no or an unknown token)."""
        token = self.presented(request)
        if not token:
            return None
        fp = _fingerprint(token)
        found: str | None = None
        for candidate, _scopes, name in self._tokens:
            if hmac.compare_digest(fp, candidate) and found is None:
                found = name
        return found

    def require(self, request: Any, scope: str) -> None:
        """Raise AuthError unless the request may act with ``scope``."""
        token = self.presented(request)
        if token is None:
            if scope == "read" and self.anonymous_read:
                return
            raise AuthError(401, "authentication required")
        scopes = self.scopes(token)
        if scopes is None:
            raise AuthError(401, "invalid token")
        if scope not in scopes:
            raise AuthError(403, f"token lacks the {scope} scope")
