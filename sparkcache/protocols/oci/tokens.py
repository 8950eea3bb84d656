"""Upstream registry token auth (the Docker ``WWW-Authenticate: Bearer`` flow).

A registry that wants a token answers 401 with
``WWW-Authenticate: Bearer realm="https://auth.example/token",service="reg",scope="repository:x:pull"``.
We then GET ``realm?service=…&scope=…`` — with the remote's basic credentials
when it has some, anonymously otherwise — and send the token as
``Authorization: Bearer``. Tokens are cached per (remote, scope) until their
``expires_in`` (60 s when absent), and one token request per (remote, scope)
runs at a time however many pulls need it. The client's own credentials
never reach upstream: only tokens obtained here are sent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from twisted.logger import Logger
from twisted.web.client import ResponseFailed

from sparkcache.config import RemoteConfig
from sparkcache.fetch.collect import TooLarge, read_small
from sparkcache.fetch.produce import Singleflight
from sparkcache.fetch.upstream import UpstreamClient, UpstreamError, auth_header

log = Logger()

DEFAULT_EXPIRY = 60.0
# Renew a little early so a token does not expire between check and use.
MARGIN = 5.0
MAX_TOKEN_BODY = 1 << 20
_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


class TokenError(Exception):
    """No token could be had: ``down`` when the token server was unreachable or failing."""

    def __init__(self, message: str, down: bool) -> None:
        super().__init__(message)
        self.down = down


@dataclass(frozen=True)
class Challenge:
    realm: str
    service: str | None


def parse_challenge(value: str | None) -> Challenge | None:
    """The Bearer challenge in a WWW-Authenticate value, or None (Basic, malformed)."""
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM.finditer(rest)}
    realm = params.get("realm")
    if not realm or urlsplit(realm).scheme not in ("http", "https") or not urlsplit(realm).hostname:
        return None
    return Challenge(realm.replace('\\"', '"'), params.get("service"))


class TokenAuth:
    def __init__(self, upstream: UpstreamClient, clock: Any) -> None:
        self.upstream = upstream
        self.clock = clock
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        # One token request per (remote, scope) at a time, however many pulls need it.
        self._renewals: Singleflight[tuple[str, str], str] = Singleflight()

    def forget(self, remote: str) -> None:
        """Drop a remote's challenge and tokens (its upstream or credentials changed)."""
        self._challenges.pop(remote, None)
        for key in [k for k in self._tokens if k[0] == remote]:
            del self._tokens[key]

    def cached(self, remote: RemoteConfig, scope: str) -> dict[bytes, bytes]:
        """Authorization headers from a still-valid cached token (no network)."""
        t = self._tokens.get((remote.name, scope))
        if t is not None and self.clock.seconds() < t[1]:
            return {b"Authorization": b"Bearer " + t[0].encode("latin-1")}
        return {}

    def knows(self, remote: RemoteConfig) -> bool:
        """Whether the registry has already asked for Bearer tokens."""
        return remote.name in self._challenges

    def learn(self, remote: RemoteConfig, www_authenticate: str | None) -> bool:
        """Remember the registry's Bearer challenge; False when it is not one."""
        ch = parse_challenge(www_authenticate)
        if ch is None:
            return False
        self._challenges[remote.name] = ch
        return True

    async def renew(self, remote: RemoteConfig, scope: str) -> dict[bytes, bytes]:
        """A fresh token for ``scope`` (after a 401), shared by everyone asking at once."""
        key = (remote.name, scope)
        if key not in self._renewals:
            self._tokens.pop(key, None)
        token = await self._renewals.run(key, lambda: self._fetch(remote, scope))
        return {b"Authorization": b"Bearer " + token.encode("latin-1")}

    async def _fetch(self, remote: RemoteConfig, scope: str) -> str:
        ch = self._challenges.get(remote.name)
        if ch is None:
            raise TokenError("upstream asked for authentication without a Bearer challenge", down=False)
        query = {"scope": scope}
        if ch.service:
            query = {"service": ch.service, "scope": scope}
        sep = "&" if urlsplit(ch.realm).query else "?"
        url = ch.realm + sep + urlencode(query)
        headers: dict[bytes, bytes] = {b"Accept": b"application/json"}
        basic = auth_header(remote.credentials)
        if basic is not None:
            headers[b"Authorization"] = basic
        try:
            response, _ = await self.upstream.request(remote, b"GET", url, headers)
        except UpstreamError as e:
            raise TokenError(f"token server: {e}", down=True) from None
        try:
            body = await read_small(response, MAX_TOKEN_BODY)
        except (TooLarge, ResponseFailed) as e:
            raise TokenError(f"token server: {e}", down=True) from None
        if response.code != 200:
            down = response.code >= 500 or response.code == 429
            raise TokenError(f"token server answered {response.code}", down=down)
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or DEFAULT_EXPIRY)
        except (ValueError, AttributeError, TypeError):
            raise TokenError("token server sent a malformed answer", down=True) from None
        if not isinstance(token, str) or not token:
            raise TokenError("token server sent no token", down=True)
        self._tokens[(remote.name, scope)] = (token, self.clock.seconds() + max(expires_in - MARGIN, 1.0))
        log.debug("got an upstream token for {remote} {scope}", remote=remote.name, scope=scope)
        return token
