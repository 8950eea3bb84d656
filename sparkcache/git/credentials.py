"""Upstream credentials handed to libgit2 through its credential callback.

The secret lives only in this process's memory: never in a remote URL, a
child's argv or environment, the mirror's config or any file under the data dir.
"""

from __future__ import annotations

import threading
from typing import Any

import pygit2
from pygit2.enums import CredentialType

from sparkcache.git.config import GitCredentials

# libgit2 calls the callback again after each rejected attempt; give up after
# this many so a wrong token fails the fetch instead of looping.
MAX_ATTEMPTS = 3
DEFAULT_TOKEN_USER = "x-access-token"


class Cancelled(Exception):
    """The daemon is stopping: the transfer was abandoned."""


class Callbacks(pygit2.RemoteCallbacks):
    """RemoteCallbacks with our credentials (or none: anonymous access). Once
    ``cancel`` is set, the next progress report aborts the transfer, so a
    stopping daemon does not wait for a large clone to finish."""

    def __init__(self, creds: GitCredentials | None, cancel: threading.Event | None = None) -> None:
        super().__init__()
        self._creds = creds
        self._cancel = cancel
        self.attempts = 0

    def _check(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("the git mirrors are shutting down")

    def transfer_progress(self, stats: Any) -> None:
        self._check()

    def sideband_progress(self, string: str) -> None:
        self._check()

    def certificate_check(self, certificate: Any, valid: bool, host: bytes) -> bool:
        # libgit2's verdict: the TLS chain, or for ssh:// the host key against
        # ~/.ssh/known_hosts. Not pygit2's default (Passthrough), which accepts
        # any SSH host key.
        return bool(valid)

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
