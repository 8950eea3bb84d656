"""What the daemon signs: the upload and download URLs it hands out, and the
JWT-shaped runtime tokens it mints.

One HMAC-SHA256 secret per daemon: a remote's ``signing_secret`` (or
``signing_secret_env``) when configured, else 32 random bytes generated on
first use and kept in the store as a pinned entry (``_gha:signing-secret``),
so URLs and tokens survive a restart. Verification is constant-time and
checks the expiry against the daemon's clock.

Runtime tokens are JWTs (HS256) with the claims BuildKit's ``type=gha``
decodes without verifying (``ac``: a JSON string of ``[{"Scope", "Permission"}]``
as GitHub's are, Permission 1 read, 2 write, 3 both; ``exp``; ``nbf``); the
daemon verifies its own signature before believing any of them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from sparkcache.auth import AuthError
from sparkcache.fetch import Target
from sparkcache.web.signed import check_signature, sign

if TYPE_CHECKING:
    from sparkcache.context import Context

log = Logger()
SECRET_REMOTE = "_gha"
SECRET_KEY = f"{SECRET_REMOTE}:signing-secret"
READ, WRITE = 1, 2


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


class Secrets:
    """The daemon's signing secret: configured, or generated once and stored."""

    def __init__(self, ctx: "Context") -> None:
        self.ctx = ctx
        self._secret: bytes | None = None
        self._lock = DeferredLock()

    async def get(self, configured: str | None = None) -> bytes:
        if configured:
            return configured.encode()
        if self._secret is None:
            await self._lock.acquire()
            try:
                if self._secret is None:
                    self._secret = await self._load_or_make()
            finally:
                self._lock.release()
        return self._secret

    async def _load_or_make(self) -> bytes:
        store = self.ctx.store
        try:
            entry = await store.index.get(SECRET_KEY)
            if entry is not None and entry.status == 200 and store.exists(entry):
                stored = (await store.read(entry, 256)).strip()
                if len(stored) >= 32:
                    return stored
        except Exception as e:
            log.warn("gha: could not read the stored signing secret ({why}); making a new one", why=e)
        secret = binascii.hexlify(os.urandom(32))
        spool = store.new_spool("gha-")
        spool.write(secret)
        # Pinned: eviction or a purge of the cache must not invalidate every URL and token.
        try:
            await self.ctx.cache.adopt(Target(SECRET_KEY, SECRET_REMOTE, "signing-secret", pinned=True), spool,
                                       {"content-type": "application/octet-stream"})
        except Exception as e:
            # A full disk must not stop the cache: this process signs with it
            # anyway; its URLs and tokens end with it.
            log.warn("gha: could not store the signing secret ({why}); it lasts until the daemon stops", why=e)
        return secret


@dataclass(frozen=True)
class Access:
    """Where a caller may read (scopes searched in order) and write (None: nowhere)."""

    read: tuple[str, ...]
    write: str | None


def mint_token(secret: bytes, now: float, ttl: float, write_scope: str | None,
               read_scopes: tuple[str, ...]) -> str:
    scopes = []
    if write_scope is not None:
        scopes.append({"Scope": write_scope, "Permission": READ | WRITE})
    scopes += [{"Scope": s, "Permission": READ} for s in read_scopes if s != write_scope]
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"ac": json.dumps(scopes), "iss": "sparkcache", "nbf": int(now) - 60, "iat": int(now),
              "exp": int(now + ttl)}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{sign(secret, signing_input)}"


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


def verify_token(secret: bytes, token: str, now: float) -> Access:
    """The access a minted token grants; AuthError(401) when it is not ours, or out of its time."""
    signing_input, _, sig = token.rpartition(".")
    if not hmac.compare_digest(sign(secret, signing_input).encode(), sig.encode("utf-8", "replace")):
        raise AuthError(401, "invalid token")
    try:
        claims: Any = json.loads(unb64url(signing_input.split(".")[1]))
        scopes: Any = json.loads(claims["ac"])
        exp, nbf = float(claims["exp"]), float(claims.get("nbf", 0))
    except (ValueError, KeyError, TypeError, IndexError):
        raise AuthError(401, "invalid token") from None
    if not nbf <= now < exp:
        raise AuthError(401, "the token has expired")
    read: list[str] = []
    write: str | None = None
    for s in scopes if isinstance(scopes, list) else []:
        if not isinstance(s, dict) or not isinstance(s.get("Scope"), str) or not isinstance(s.get("Permission"), int):
            continue
        if s["Permission"] & READ:
            read.append(s["Scope"])
        if s["Permission"] & WRITE and write is None:
            write = s["Scope"]
    return Access(tuple(read), write)
