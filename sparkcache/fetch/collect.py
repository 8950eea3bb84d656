"""Small response bodies read whole, under a cap: an S3 XML answer, a token.

``read_small(response, limit)`` fires with the body's bytes, or fails with
``TooLarge`` once more than ``limit`` bytes arrived (the connection is then
dropped: nothing past the cap is read, so memory stays bounded), or with the
reason the body broke off (ResponseFailed). A body that ends with the
connection and no length (PotentialDataLoss) is whole: that is how a server
without Content-Length or chunking ends one. Large bodies are never read this
way: they stream to a file (store/s3/bodies.py FileSink, fetch/flight.py).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse


class TooLarge(ValueError):
    """The body went past the cap of its reader."""


class Collect(Protocol):
    """A small body, whole, in ``done``; the connection is dropped past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if self.size > self.limit:
            self.done.errback(TooLarge(f"body larger than {self.limit} bytes"))
        elif reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_small(response: IResponse, limit: int) -> Deferred[bytes]:
    """The whole body of a response known to be small (see the module's doc)."""
    collect = Collect(limit)
    response.deliverBody(collect)
    return collect.done
