"""Daemon-signed URLs: an HMAC-SHA256 over the URL's parts and its expiry,
checked in constant time (the GitHub Actions cache's and dagger's blob URLs)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from sparkcache.auth import AuthError


def sign(secret: bytes, *parts: str) -> str:
    """The URL-safe signature of ``parts`` (joined by newlines) under ``secret``."""
    mac = hmac.new(secret, "\n".join(parts).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def check_signature(secret: bytes, sig: str | None, exp: str | None, now: float, *parts: str) -> None:
    """Raise AuthError(403) unless ``sig`` signs ``parts`` and ``exp``, and ``exp`` has not passed."""
    if not sig or not exp or not (exp.isascii() and exp.isdigit()):
        raise AuthError(403, "this URL is not signed")
    expected = sign(secret, *parts, exp)
    if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
        raise AuthError(403, "the URL's signature does not match")
    if now >= int(exp):
        raise AuthError(403, "the signed URL has expired")
