"""UpstreamClient.open_ahead against a real server on 127.0.0.1: a connection
opened ahead of a request is the one the request uses (taken as soon as it
is made, or from the pool once idle), at most one is ever opened ahead per
origin, and closing the client leaves none behind."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Site

from sparkcache.config import RemoteConfig
from sparkcache.fetch.upstream import UpstreamClient
from tests.support.memory import REQUEST_DEADLINE, read_body


class Body(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"body"


class CountingSite(Site):
    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


@pytest.fixture
def server() -> Any:
    root = Resource()
    root.putChild(b"f", Body())
    site = CountingSite(root)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    site.url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
    yield site
    port.stopListening()


async def _until(cond: Any) -> None:
    for _ in range(1000):
        if cond():
            return
        await task.deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("never happened")


async def _get(c: UpstreamClient, remote: RemoteConfig, url: str) -> bytes:
    d = Deferred.fromCoroutine(c.request(remote, b"GET", url)).addTimeout(REQUEST_DEADLINE, reactor)
    response, _ = await d
    assert response.code == 200
    return await read_body(response)  # type: ignore[no-any-return]


@pytest.fixture
def client() -> Any:
    c = UpstreamClient(reactor)
    yield c
    pytest_twisted.blockon(c.close())


@pytest_twisted.ensureDeferred
async def test_a_request_takes_the_connection_being_opened_ahead(server: Any, client: UpstreamClient) -> None:
    remote = RemoteConfig("r", "generic", server.url)
    client.open_ahead(remote, server.url + "/f")
    client.open_ahead(remote, server.url + "/f")  # one at a time per origin
    assert await _get(client, remote, server.url + "/f") == b"body"  # (asked before it was made)
    assert server.connections == 1


@pytest_twisted.ensureDeferred
async def test_a_connection_opened_ahead_waits_in_the_pool(server: Any, client: UpstreamClient) -> None:
    remote = RemoteConfig("r", "generic", server.url)
    client.open_ahead(remote, server.url + "/f")
    await _until(lambda: server.connections == 1)
    key = (b"http", b"127.0.0.1", remote_port(server))
    await _until(lambda: client.pool is not None and client.pool._connections.get(key))
    client.open_ahead(remote, server.url + "/f")  # one is idle: nothing more
    assert await _get(client, remote, server.url + "/f") == b"body"
    assert await _get(client, remote, server.url + "/f") == b"body"
    assert server.connections == 1


@pytest_twisted.ensureDeferred
async def test_closing_the_client_cancels_a_connection_being_opened(server: Any) -> None:
    c = UpstreamClient(reactor)
    remote = RemoteConfig("r", "generic", server.url)
    c.open_ahead(remote, server.url + "/f")
    await c.close()
    assert c.pool is not None and not c.pool._opening


def test_a_given_agent_is_left_alone() -> None:
    c = UpstreamClient(task.Clock(), agent=object())  # type: ignore[arg-type]
    c.open_ahead(RemoteConfig("r", "generic", "http://127.0.0.1:9"), "http://127.0.0.1:9/f")  # no pool: nothing


def remote_port(server: Any) -> int:
    return int(server.url.rsplit(":", 1)[1])
