"""What a protocol package exports: one :class:`ProtocolSpec`.

The daemon knows protocols only through these descriptors (listed in
:mod:`sparkcache.protocols`): the config loader asks them for remote types
and sections, the service tree for resources, services and drains, the root
resource for the path segments to mount, ``/setup`` for snippets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Sequence, Union

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.web.resource import IResource

from sparkcache.config import SHARED_KEYS, Config, Loader, Section
from sparkcache.web.bodies import BodyGate

if TYPE_CHECKING:
    from sparkcache.context import Context

# A setup endpoint answers ``/setup/<kind>`` itself: bytes, or a Deferred/coroutine of bytes.
SetupHandler = Callable[[Any], Union[bytes, Awaitable[bytes], Deferred[bytes]]]


# ``RemoteKind.honours`` of a type whose content lives only here: no shared key applies.
UPLOADS_ONLY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RemoteKind:
    """A remote ``type`` a protocol owns (satisfies :class:`sparkcache.config.RemoteType`)."""

    name: str
    # Default mutable_patterns: paths that change in place upstream.
    mutable_patterns: tuple[str, ...] = ()
    # False for content that lives only here (uploads, pushes): no upstream URL.
    needs_upstream: bool = True
    # Entries of remotes of this type exist nowhere else: never evicted or purged as cache.
    pinned: bool = False
    # Reads the type's own keys of a remote section; None when it has none.
    options: Callable[[Loader, Section, str], Any] | None = None
    # Where a remote of this type is served, for ``GET /`` (``{name}`` is the remote).
    url: str = "/api/{name}/"
    # Default ``cache.mutable_ttl`` of a remote of this type (PyPI pages: 10 minutes).
    mutable_ttl: float = 3600.0
    # ``upstream:`` may be a list of URLs, tried in order when one fails
    # (``CacheRequest.mirrors``); a type that cannot use them refuses a list.
    many_upstreams: bool = False
    # Checks a remote against the others once all are read (a group's members):
    # ``check(loader, remote, remotes)`` raises ``loader.error(...)``.
    check: Callable[[Loader, Any, Mapping[str, Any]], None] | None = None
    # The shared keys of a remote section (config.SHARED_KEYS) this type uses;
    # the loader refuses the others by name ("has no effect on type: x
    # remotes"). Default: all of them for a type with an upstream, none for
    # one whose content lives only here (UPLOADS_ONLY). A type that fetches
    # through the engine uses at least config.UPSTREAM_KEYS.
    shared_keys: frozenset[str] | None = None
    # remotes.yaml's ``type: local`` with this ``package``: the type that keeps
    # uploads of it (None: ``<name>-local`` when such a type exists).
    local_type: str | None = None

    @property
    def honours(self) -> frozenset[str]:
        if self.shared_keys is not None:
            return self.shared_keys
        return SHARED_KEYS if self.needs_upstream else UPLOADS_ONLY

    def parse_options(self, loader: Loader, sec: Section) -> Any:
        return self.options(loader, sec, self.name) if self.options is not None else None

    def check_remote(self, loader: Loader, remote: Any, remotes: Mapping[str, Any]) -> None:
        if self.check is not None:
            self.check(loader, remote, remotes)


@dataclass(frozen=True)
class SetupEndpoint:
    """``/setup/<kind>``: a configuration snippet or a login endpoint."""

    handler: SetupHandler
    methods: tuple[str, ...] = ("GET", "HEAD")
    # The scope a caller needs, or None when the handler checks credentials itself.
    scope: str | None = "read"
    # Whether ``/setup/`` lists it now (asked per request: remotes change at runtime); None: always.
    offered: Callable[[], bool] | None = None

    def is_offered(self) -> bool:
        return self.offered is None or self.offered()


@dataclass
class Built:
    """What ``ProtocolSpec.build`` returns for one daemon."""

    # Mounted at each of the spec's segments; None mounts nothing (no remote of its types).
    resource: IResource | None = None
    # Per-segment resources, for a protocol that serves several apps (git: clones, reads).
    mounts: Mapping[bytes, IResource] = field(default_factory=dict)
    # Decides from a request's headers, before any body byte is stored, whether
    # its body is refused, spooled for the handler to commit, or left to the
    # default (sparkcache.web.bodies); ``gates`` per segment, like ``mounts``.
    gate: BodyGate | None = None
    gates: Mapping[bytes, BodyGate] = field(default_factory=dict)
    # Started once the store is open, stopped before it closes.
    services: Sequence[IService] = ()
    # Work a graceful stop waits for: each returns Deferreds that fire when it ends.
    drains: Sequence[Callable[[], list[Deferred[Any]]]] = ()
    setup: Mapping[str, SetupEndpoint] = field(default_factory=dict)
    # Called with each new running configuration (SIGHUP, the remotes API) after
    # ``ctx.config`` is replaced: rebuilds what the apps keep per remote. None
    # for apps that read ``ctx.config`` per request (or that nothing was built for).
    reconfigure: Callable[[Config], None] | None = None


@dataclass(frozen=True)
class ProtocolSpec:
    name: str
    # First path segments this protocol answers (``/v2/...`` → b"v2").
    segments: tuple[bytes, ...]
    build: Callable[["Context"], Built]
    remote_types: tuple[RemoteKind, ...] = ()
    # A top-level config section of its own (``git:``), parsed by ``parse_section``.
    section: str | None = None
    parse_section: Callable[[Loader, Section], Any] | None = None
