"""The contract between the mirror machinery and the apps that read mirrors.

``sparkcache.git.mirrors`` provides IMirrors; the git protocol app and the
code-sync/read-endpoint app are both built with it (``protocols.git.build``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import Interface

T = TypeVar("T")


class UnknownRepo(Exception):
    """No registered repository by that name/URL, and none may be created on first use."""


class MirrorLimit(Exception):
    """No more mirrors may be created at run time (``git.max_mirrors`` or ``git.max_size``)."""


class MirrorUnavailable(Exception):
    """The mirror does not exist yet and could not be cloned (upstream unreachable, auth...)."""


@dataclass(frozen=True)
class Mirror:
    name: str   # registration name (or host/path for allow-listed hosts)
    url: str    # upstream URL, credentials never included
    path: str   # absolute path of the bare repository under <data_dir>/git/


class IMirrors(Interface):
    def lookup(name_or_url: str) -> Mirror:
        """The registered mirror for a name, ``host/owner/repo`` or URL, created on first use
        if the configuration allows it; raise UnknownRepo otherwise. Does not clone."""

    def ensure(mirror: Mirror) -> "Deferred[Mirror]":
        """Make sure the bare repository exists on disk (clone on first use or after the
        data dir was wiped); fires with the mirror, or fails with MirrorUnavailable."""

    def refresh(mirror: Mirror) -> "Deferred[dict[str, str]]":
        """Fetch upstream now, joining any fetch already running for this mirror;
        fires with the ref tips {refname: hex}."""

    def seed(url: str, bundle_path: str, name: str | None = None) -> "Deferred[Mirror]":
        """Create or update the mirror for ``url`` from a git bundle file."""

    def run(fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        """Run ``fn(*args)`` in the git thread pool (pygit2 work never runs on the reactor)."""
