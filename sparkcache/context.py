"""What every protocol app is handed: the shared services of one daemon."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

from sparkcache.auth import Authorizer
from sparkcache.config import Config, RemoteConfig
from sparkcache.fetch import Cache, UpstreamClient
from sparkcache.metrics import Metrics
from sparkcache.store import Store


@dataclass
class Context:
    config: Config
    store: Store
    cache: Cache
    upstream: UpstreamClient
    metrics: Metrics
    auth: Authorizer
    clock: Any
    sendfile: Any = None  # SendfilePool, when large hits may use os.sendfile
    reactor: Any = None  # for spawnProcess and thread pools; the clock when None
    # Every remote type by name (sparkcache.protocols.base.RemoteKind), from the registry.
    remote_types: Mapping[str, Any] = field(default_factory=dict)
    # Remotes a protocol stores under without a ``remotes:`` entry (the seed
    # endpoints' ``seed/bin``...): name -> (type, URL), for GET / and purges.
    internal_remotes: dict[str, tuple[str, str]] = field(default_factory=dict)
    # The running configuration's sources (sparkcache.reload.LiveConfig): ``config``
    # and ``auth`` above are replaced as a whole when it changes (SIGHUP, the
    # remotes API), so look remotes up here per request, never keep them.
    live: Any = None
    # Whether store-wide periodic work (git fetch loop and maintenance, expiry
    # sweeps) runs in this process: with server.workers > 1, in one worker only.
    primary: bool = True

    def remote_url(self, name: str) -> str:
        """Where the remote ``name`` is served (``/api/files/``, ``/v2/cache/``)."""
        kind = self.remote_types.get(self.config.remotes[name].type)
        return (kind.url if kind is not None else "/api/{name}/").format(name=name)

    def served_remote(self, name: str, types: Collection[str], usage: str) -> RemoteConfig:
        """The remote ``name`` of one of ``types``, as a protocol app's path names it;
        HTTPError 404 (saying where it is served when it is of another protocol)
        otherwise. ``usage`` says what a path of this app looks like."""
        from sparkcache.web.errors import HTTPError

        if not name:
            raise HTTPError(404, f"no remote named; use {usage}")
        remote = self.config.remotes.get(name)
        if remote is None:
            raise HTTPError(404, f"unknown remote {name!r}")
        if remote.type not in types:
            raise HTTPError(404, f"remote {remote.name!r} is a type: {remote.type} remote, served at "
                                 f"{self.remote_url(remote.name)}")
        return remote

    def __post_init__(self) -> None:
        if self.reactor is None:
            self.reactor = self.clock
