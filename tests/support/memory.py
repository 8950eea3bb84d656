"""HTTP without sockets: an IAgent whose connections end in a server factory of this process.

Modelled on treq's ``RequestTraversalAgent`` (iosim transports between a real
client ``Agent`` and a real ``Site``), with one difference: treq's agent moves
bytes only when the test calls ``flush()``, which fits handlers that answer at
once. sparkcache answers from its SQLite, I/O and git thread pools, on the real
reactor, so here every write, close and producer change schedules a pump on
that reactor instead: a response arrives as soon as the server writes it, and a
test simply awaits it.

    agent = MemoryAgent(site)                  # any server factory: Site, SparkSite
    client = MemoryClient(agent, "http://cache.test")
    resp = await client.request("GET", "/health")     # a tests.support.client.Response

``MemoryClient`` sends bytes and returns bytes exactly (no treq content
decoding or redirect following: a test sees what the server sent).

Only the URL's path and Host reach the server; every host name and port lead
to the same factory (give a Site a resource that looks at Host to tell
upstreams apart). Connections are not persistent: one request each, as a
killed client or an aborting server is easy to see that way.
"""

from __future__ import annotations

import http.client
from typing import Any, Mapping

from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IProtocol, IProtocolFactory, ISSLTransport, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from twisted.web.http_headers import Headers
from zope.interface import directlyProvides, implementer

from sparkcache.store.s3.bodies import BytesProducer

from tests.support.client import Response

# A backstop, not a measurement: a request that never ends fails the test
# instead of hanging the run (unit tests have no watchdog).
REQUEST_DEADLINE = 60.0
# Pump rounds per reactor turn: enough for a whole small response, few enough
# that thread-pool results and timers get their turn between rounds.
ROUNDS_PER_TURN = 64


class _Transport(iosim.FakeTransport):
    """An iosim transport that asks its connection for a pump whenever it has
    something to deliver, and whose abort is a reset, not a clean close."""

    connection: "Connection"

    def write(self, data: bytes) -> None:
        super().write(data)
        self.connection.wake()

    def loseConnection(self) -> None:
        super().loseConnection()
        self.connection.wake()

    def abortConnection(self) -> None:
        # Both ends see a lost connection (as after a TCP reset), never ConnectionDone.
        self.disconnectReason = ConnectionLost("aborted")  # type: ignore[assignment]
        self.connection.peer(self).disconnectReason = ConnectionLost("aborted by the peer")  # type: ignore[assignment]
        self.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        self.connection.wake()


class Connection:
    """One client/server pair joined by an iosim pump that runs on the reactor."""

    def __init__(self, reactor: Any, server: IProtocol, client: IProtocol, https: bool) -> None:
        self.reactor = reactor
        client_addr = IPv4Address("TCP", "127.0.0.1", 31337)
        server_addr = IPv4Address("TCP", "127.0.0.1", 443 if https else 80)
        self.server_io = _Transport(server, isServer=True, hostAddress=server_addr, peerAddress=client_addr)
        self.client_io = _Transport(client, isServer=False, hostAddress=client_addr, peerAddress=server_addr)
        self.server_io.connection = self.client_io.connection = self
        if https:
            directlyProvides(self.server_io, ISSLTransport)
            directlyProvides(self.client_io, ISSLTransport)
        self._call: Any = None
        # iosim advances this clock by 0 each round; nothing of ours runs on it.
        self.pump = iosim.connect(server, self.server_io, client, self.client_io, greet=False, clock=Clock())
        self.wake()

    def peer(self, io: _Transport) -> _Transport:
        return self.client_io if io is self.server_io else self.server_io

    @property
    def closed(self) -> bool:
        return bool(self.server_io.disconnected and self.client_io.disconnected)

    def reset(self) -> None:
        """The client goes away with a reset (a killed process), mid-response or not."""
        self.client_io.abortConnection()

    def wake(self) -> None:
        if self._call is None and not self.closed:
            self._call = self.reactor.callLater(0, self._run)

    def _run(self) -> None:
        self._call = None
        for _ in range(ROUNDS_PER_TURN):
            if not self.pump.pump():
                return
        self.wake()  # still moving: carry on next turn


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, agent: "MemoryAgent", https: bool) -> None:
        self.agent, self.https = agent, https

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 80))
        assert client is not None
        server = self.agent.server_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 31337))
        assert server is not None
        self.agent.connections.append(Connection(self.agent.reactor, server, client, self.https))
        return succeed(client)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, agent: "MemoryAgent") -> None:
        self.agent = agent

    def endpointForURI(self, uri: URI) -> _Endpoint:
        return _Endpoint(self.agent, uri.scheme == b"https")


@implementer(IAgent)
class MemoryAgent:
    """An IAgent that connects every request to ``server_factory`` in memory."""

    def __init__(self, server_factory: Any, reactor: Any = None) -> None:
        self.server_factory = server_factory
        self.reactor = reactor or global_reactor
        self.connections: list[Connection] = []  # the open ones (and a few just closed)
        self._agent = Agent.usingEndpointFactory(self.reactor, _Endpoints(self),
                                                 pool=HTTPConnectionPool(self.reactor, persistent=False))

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        self.connections = [c for c in self.connections if not c.closed]
        return self._agent.request(method, uri, headers, bodyProducer)


def message(headers: Headers) -> http.client.HTTPMessage:
    """Twisted response headers as the http.client message a Response carries."""
    msg = http.client.HTTPMessage()
    for name, values in headers.getAllRawHeaders():
        for v in values:
            msg[name.decode("latin-1")] = v.decode("latin-1")
    return msg


class _Collect(Protocol):
    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)  # broken off: ResponseFailed, PotentialDataLoss


def read_body(response: IResponse) -> Deferred[bytes]:
    """The whole body; fails when it breaks off (a truncated transfer)."""
    d: Deferred[bytes] = Deferred()
    response.deliverBody(_Collect(d))
    return d


class MemoryClient:
    """Requests by path to ``base_url`` through an in-memory agent."""

    def __init__(self, agent: IAgent, base_url: str) -> None:
        self.agent = agent
        self.base_url = base_url

    def open(self, method: str, path: str, body: bytes | None = None,
             headers: Mapping[str, str] | None = None) -> Deferred[IResponse]:
        """The IResponse as soon as its headers arrive (its body still to read)."""
        h = Headers()
        for k, v in (headers or {}).items():
            h.addRawHeader(k.encode("latin-1"), v.encode("latin-1"))
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        d = self.agent.request(method.encode("ascii"), url.encode("latin-1"), h, BytesProducer(body) if body is not None else None)
        return d.addTimeout(REQUEST_DEADLINE, global_reactor)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Deferred[Response]:
        """The whole response; a body that breaks off fails it (ResponseFailed). The
        request goes out at once (a Deferred, not a lazy coroutine), so a test can
        start several and await them later."""
        d = Deferred.fromCoroutine(self._request(method, path, body, headers))
        return d.addTimeout(REQUEST_DEADLINE, global_reactor)

    async def _request(self, method: str, path: str, body: bytes | None,
                       headers: Mapping[str, str] | None) -> Response:
        resp = await self.open(method, path, body, headers)
        data = await read_body(resp)
        return Response(resp.code, message(resp.headers), data)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Deferred[Response]:
        return self.request("GET", path, None, headers)
