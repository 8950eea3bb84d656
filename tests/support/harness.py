"""One daemon in memory, for unit tests: the real service tree, no socket.

``Harness`` builds :class:`sparkcache.service.SparkcacheService` from a config
dict (the same tree ``twistd sparkcache`` runs: pools, store, cache, every
protocol through its ``build()``, /setup, admin, the root resource and the
Site) with no listener. Its upstream client talks to a
:class:`MemoryUpstream` through an in-memory agent, its clock is a
``task.Clock`` (TTLs, read timeouts, idle sweeps, timers), and requests reach
the real Site through :class:`MemoryClient`::

    async def test_x(harness_factory):
        h = await harness_factory({"remotes": {"files": {"type": "generic",
                                                         "upstream": UPSTREAM}}})
        h.upstream.add("/a.bin", b"...")
        resp = await h.get("/api/files/a.bin")
        h.clock.advance(3600)

Git apps read a :class:`FakeMirrors` instead of pygit2 mirrors when one is
given (``mirrors=``); how it reaches them is :func:`with_mirrors`, the one
place that knows.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock
from twisted.web.resource import IResource
from twisted.web.server import Site

from sparkcache.config import Config
from sparkcache.context import Context
from sparkcache.fetch import UpstreamClient
from sparkcache.protocols import PROTOCOLS, load_config_data
from sparkcache.protocols import git as git_protocol
from sparkcache.protocols.base import Built, ProtocolSpec
from sparkcache.service import SparkcacheService
from tests.support.client import Response
from tests.support.memory import MemoryAgent, MemoryClient
from tests.support.memory_upstream import BASE_URL as UPSTREAM, MemoryUpstream

__all__ = ["Harness", "MakeHarness", "UPSTREAM", "app_of", "harness_config", "harness_factory", "with_mirrors"]

CACHE_URL = "http://cache.test"
# Clocks start at a plausible date, not at 0 (HTTP dates and TTLs near 1970 are no case a daemon meets).
EPOCH = 1_700_000_000.0


def harness_config(data_dir: str | Path, config: Mapping[str, Any] | None = None,
                   protocols: Sequence[ProtocolSpec] = PROTOCOLS) -> Config:
    """A validated Config from a config dict, as the daemon would load it, with
    test defaults: ``data_dir`` for storage, no sendfile (there is no socket to
    hand over), a short shutdown deadline, no environment, and no listener."""
    data = copy.deepcopy(dict(config or {}))
    storage = data.setdefault("storage", {})
    storage.setdefault("data_dir", str(data_dir))
    server = data.setdefault("server", {})
    server.setdefault("sendfile", False)
    server.setdefault("shutdown_timeout", "5s")
    server.setdefault("workers", 1)  # one service in memory, whatever the cores
    cfg = load_config_data(data, "harness.yaml", environ={}, protocols=protocols)
    return replace(cfg, server=replace(cfg.server, listen=()))


def with_mirrors(spec: ProtocolSpec, mirrors: Any) -> ProtocolSpec:
    """The git protocol built as usual, with its apps reading ``mirrors``."""

    def build(ctx: Context) -> Built:
        return git_protocol.serve(ctx, mirrors)

    return replace(spec, build=build)


def app_of(resource: Any) -> Any:
    """The app object behind a mounted resource (to look at its state, e.g. OCI
    upload sessions): unwraps Remount, the generic app's hit path, and Klein."""
    resource = getattr(resource, "inner", resource)
    if hasattr(resource, "routed"):
        return resource.app
    return resource._app._instance


class Harness:
    """The daemon in memory; ``request``/``get``/... go to its root over the real Site."""

    def __init__(self, data_dir: str | Path, config: Mapping[str, Any] | None = None, *,
                 upstream: MemoryUpstream | None = None, mirrors: Any = None, clock: Clock | None = None,
                 protocols: Sequence[ProtocolSpec] = PROTOCOLS) -> None:
        self.config = harness_config(data_dir, config, protocols)
        if clock is None:
            clock = Clock()
            clock.advance(EPOCH)
        self.clock = clock
        self.upstream = upstream or MemoryUpstream()
        self.mirrors = mirrors
        if mirrors is not None:
            protocols = [with_mirrors(p, mirrors) if p is git_protocol.SPEC else p for p in protocols]
        client = UpstreamClient(clock, agent=self.upstream.agent)
        self.svc = SparkcacheService(self.config, reactor, clock, protocols, upstream=client)
        self.ctx: Context = self.svc.ctx
        self.store = self.svc.store
        self.cache = self.svc.cache
        self.metrics = self.svc.metrics
        self.client = MemoryClient(MemoryAgent(self.svc.site), CACHE_URL)
        self.base_url = CACHE_URL
        self._ports: list[Any] = []

    async def start(self) -> "Harness":
        self.svc.startService()
        await self.svc.ready
        return self

    async def stop(self) -> None:
        self.upstream.clear()  # nothing held upstream may outlive the test
        for port in self._ports:
            await port.stopListening()
        if self.svc.running:
            await self.svc.stopService()

    async def settle(self) -> None:
        """Wait until every upstream fetch and pack computation has ended (and
        so is committed or discarded): a client can read a miss's last byte
        before the entry is in the index."""
        pending = list(self.cache.running())
        for drain in self.svc.drains:
            pending += drain()
        await DeferredList(pending, consumeErrors=True)

    # -- requests -------------------------------------------------------------

    def open(self, method: str, path: str, body: bytes | None = None,
             headers: Mapping[str, str] | None = None) -> Deferred[Any]:
        """The IResponse as soon as its headers arrive (its body still to read)."""
        return self.client.open(method, path, body, headers)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Deferred[Response]:
        """The whole response (sent at once: start several, await them later)."""
        return self.client.request(method, path, body, headers)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Deferred[Response]:
        return self.client.request("GET", path, None, headers)

    def head(self, path: str, headers: Mapping[str, str] | None = None) -> Deferred[Response]:
        return self.client.request("HEAD", path, None, headers)

    def post(self, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None) -> Deferred[Response]:
        return self.client.request("POST", path, body, headers)

    def put(self, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None) -> Deferred[Response]:
        return self.client.request("PUT", path, body, headers)

    def delete(self, path: str, headers: Mapping[str, str] | None = None) -> Deferred[Response]:
        return self.client.request("DELETE", path, None, headers)

    def serve(self, resource: IResource) -> MemoryClient:
        """A client for another resource built on this daemon's context (an app
        with settings the config does not reach)."""
        return MemoryClient(MemoryAgent(Site(resource)), CACHE_URL)

    def app(self, segment: bytes) -> Any:
        """The app mounted at ``/<segment>/``."""
        return app_of(self.svc.root.apps[segment])

    def listen(self) -> str:
        """Also listen on 127.0.0.1 (for real clients such as git); returns the base URL."""
        listen: Any = reactor.listenTCP  # type: ignore[attr-defined]
        port = listen(0, self.svc.site, interface="127.0.0.1")
        self._ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"


# What harness_factory yields: ``make(config=None, **Harness kwargs)``.
MakeHarness = Callable[..., "Deferred[Harness]"]


@pytest.fixture
def harness_factory(tmp_path: Path) -> Iterator[MakeHarness]:
    """``make(config=None, **Harness kwargs)``: a started Harness (a Deferred: ``await`` it
    in a test, ``pytest_twisted.blockon`` it in a fixture), stopped at teardown. Import it
    into a test module: ``from tests.support.harness import harness_factory  # noqa: F401``."""
    made: list[Harness] = []

    def make(config: Mapping[str, Any] | None = None, **kwargs: Any) -> Deferred[Harness]:
        h = Harness(tmp_path / f"data{len(made)}", config, **kwargs)
        made.append(h)
        return Deferred.fromCoroutine(h.start())

    yield make
    for h in made:
        pytest_twisted.blockon(Deferred.fromCoroutine(h.stop()))
