#!/usr/bin/env python3
"""The fixed shape's floor for a miss's first byte: a Twisted proxy that does nothing else.

``python twisted_proxy.py PORT UPSTREAM_PORT`` serves ``GET /path`` by
asking ``http://127.0.0.1:UPSTREAM_PORT/path`` through Twisted's ``Agent``
with a persistent connection pool (as sparkcache's upstream client does),
and relays the status, ``Content-Length`` and body to the client as they
come, with the upstream connection paused while the client's is full. One
reactor (epoll), ``twisted.web``'s server, no routing, no cache: no index,
no lock, no spool, no hash, no bookkeeping. What sparkcache's own
stack (twisted.web + Agent on one reactor, the shape DESIGN.md fixes) costs
on the way to a cold miss's first byte, before any of sparkcache's work.

Used by miss_ttfb.py as a reference; not part of sparkcache.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import NOT_DONE_YET, Site  # noqa: E402


class Relay(Protocol):
    def __init__(self, request: Any) -> None:
        self.request = request

    def connectionMade(self) -> None:
        # The response body's transport pauses upstream while the client's buffer is full.
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.request.unregisterProducer()
        if not self.request.finished and not getattr(self.request, "_disconnected", False):
            self.request.finish()


class Proxy(Resource):
    isLeaf = True

    def __init__(self, agent: Agent, upstream: bytes) -> None:
        super().__init__()
        self.agent = agent
        self.upstream = upstream

    def render_GET(self, request: Any) -> Any:
        d = self.agent.request(b"GET", self.upstream + request.uri)

        def answered(response: Any) -> None:
            request.setResponseCode(response.code)
            if isinstance(response.length, int):
                request.setHeader(b"content-length", str(response.length).encode())
            response.deliverBody(Relay(request))

        def failed(f: Any) -> None:
            request.setResponseCode(502)
            request.finish()

        d.addCallbacks(answered, failed)
        return NOT_DONE_YET


def main() -> int:
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))
    site = Site(Proxy(agent, f"http://127.0.0.1:{upstream_port}".encode()))
    site.noisy = False
    site.log = lambda request: None  # (no access log)
    reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
