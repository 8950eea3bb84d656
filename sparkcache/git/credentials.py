"""Upstream credentials handed to libgit2 through its credential callback.

The secret lives only in this process's memory: never in a remote URL, a
child's argv or environment, the mirror's config or any file under the data dir.
"""

from __future__ import annotations

from typing import Any

import pygit2
from pygit2.enums import CredentialType

from sparkcache.git.config import GitCredentials

# libgit2 calls the callback again after each rejected attempt; give up after
# this many so a wrong token fails the fetch instead of looping.
MAX_ATTEMPTS = 3
DEFAULT_TOKEN_USER = "x-access-token"


class Callbacks(pygit2.RemoteCallbacks):
    """RemoteCallbacks with our credentials (or none: anonymous access)."""

    def __init__(self, creds: GitCredentials | None) -> None:
        super().__init__()
        self._creds = creds
        self.attempts = 0

    def credentials(self, url: str, username_from_url: str | None, allowed_types: CredentialType) -> Any:
        self.attempts += 1
        c = self._creds
        if c is None or self.attempts > MAX_ATTEMPTS:
            # Passthrough: libgit2 reports "authentication required" as the fetch error.
            raise pygit2.Passthrough
        if c.token is not None and allowed_types & CredentialType.USERPASS_PLAINTEXT:
            return pygit2.UserPass(c.username or username_from_url or DEFAULT_TOKEN_USER, c.token)
        user = username_from_url or c.username or "git"
        if c.ssh_key is not None and allowed_types & CredentialType.SSH_KEY:
            return pygit2.Keypair(user, c.ssh_public_key, c.ssh_key, c.ssh_key_passphrase or "")
        if allowed_types & CredentialType.USERNAME:
            return pygit2.Username(user)
        raise pygit2.Passthrough


def describe(creds: GitCredentials | None) -> str:
    """For logs and ``GET /repos``: the kind of credentials, never their value."""
    if creds is None:
        return "anonymous"
    if creds.token is not None:
        return "token"
    return "ssh-key"
