"""Listening sockets opened once by the parent and adopted by every worker."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory
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
    """Listen on every endpoint string (Twisted's parser: tcp, ssl, unix,
    systemd socket activation alike; the config allows only those with
    workers, see config.SHAREABLE_LISTENERS), then stop reading, so only
    workers accept. An ``ssl:`` port is a TCP port under a TLS factory: the
    parent hands on its plain socket (and has checked the certificate loads);
    each worker wraps its own factory again (``tls_options``)."""
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

    def __init__(self, reactor: Any, fd: int, family: str, tls: Any = None) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.tls = tls  # the ssl: listener's context factory (tls_options), or None

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        if self.tls is not None:
            # What reactor.listenSSL does over a TCP port, on the adopted one.
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        port = self.reactor.adoptStreamPort(self.fd, FAMILIES[self.family], factory)
        if self.tls is not None:
            port._type = "TLS"  # as listenSSL names it in the log
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


def tls_options(reactor: Any, spec: str) -> IOpenSSLServerConnectionCreator | None:
    """The TLS of an ``ssl:`` endpoint string, None for any other: the same files,
    keys and defaults as Twisted's ``ssl:`` parser (what one process serves),
    re-read on SIGHUP (sparkcache.web.tls). Raises TLSFileError naming a file
    that does not load."""
    from sparkcache.web.tls import tls_for  # OpenSSL: only where there is an ssl: listener

    return tls_for(spec)


def format_specs(specs: list[str] | tuple[str, ...]) -> str:
    """``SPARKCACHE_WORKER_LISTEN``: the endpoint strings the parent opened, in
    the order of ``SPARKCACHE_WORKER_FDS`` (a worker restarted after the file
    changed still wraps each socket as the parent opened it)."""
    return json.dumps(list(specs))


def parse_specs(value: str) -> list[str]:
    specs = json.loads(value)
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ValueError(f"expected a JSON list of endpoint strings, got {value!r}")
    return specs
