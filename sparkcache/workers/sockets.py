"""Listening sockets opened once by the parent and adopted by every worker."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from zope.interface import implementer

FAMILIES = {"AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6, "AF_UNIX": socket.AF_UNIX}


class _NoProtocol(Factory):
    """The parent never accepts: its ports stop reading as soon as they listen."""

    def buildProtocol(self, addr: Any) -> None:
        return None


@dataclass
class Listener:
    spec: str
    port: IListeningPort
    fd: int
    family: str  # a key of FAMILIES


async def open_listeners(reactor: Any, specs: list[str] | tuple[str, ...]) -> list[Listener]:
    """Listen on every endpoint string (Twisted's parser: tcp, unix, systemd
    socket activation alike; the config allows only those with workers, see
    config.SHAREABLE_LISTENERS), then stop reading, so only workers accept."""
    out: list[Listener] = []
    try:
        for spec in specs:
            port = await serverFromString(reactor, spec).listen(_NoProtocol())
            port.stopReading()  # type: ignore[attr-defined]
            sock = port.socket  # type: ignore[attr-defined]
            out.append(Listener(spec, port, sock.fileno(), socket.AddressFamily(sock.family).name))
    except BaseException:
        close_listeners(out)
        raise
    return out


def close_listeners(listeners: list[Listener]) -> None:
    for listener in listeners:
        listener.port.stopListening()


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """A listening socket inherited from the parent: ``listen`` adopts it."""

    def __init__(self, reactor: Any, fd: int, family: str) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        port = self.reactor.adoptStreamPort(self.fd, FAMILIES[self.family], factory)
        if self.family == "AF_UNIX":
            # A unix port unlinks its path when it stops; the path belongs to the
            # parent (other workers still accept on it). A leading NUL is how
            # Twisted marks an abstract socket, which it leaves alone.
            port._bindPath = b"\0"
        return succeed(port)


def parse_fds(value: str) -> list[tuple[int, str]]:
    """``SPARKCACHE_WORKER_FDS`` ("3:AF_INET,4:AF_UNIX") → [(3, "AF_INET"), ...]."""
    out = []
    for item in value.split(","):
        if item.strip():
            fd, family = item.strip().split(":", 1)
            if family not in FAMILIES:
                raise ValueError(f"unknown address family {family!r}")
            out.append((int(fd), family))
    return out


def format_fds(pairs: list[tuple[int, str]]) -> str:
    return ",".join(f"{fd}:{family}" for fd, family in pairs)
