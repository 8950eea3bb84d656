"""sparkcache.fetch.collect: small bodies read whole, under a cap."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from sparkcache.fetch.collect import TooLarge, read_small


class FakeResponse:
    """Delivers ``chunks`` then ends the body with ``reason``."""

    def __init__(self, chunks: list[bytes], reason: BaseException) -> None:
        self.chunks = chunks
        self.reason = reason
        self.stopped = 0
        self.delivered: list[bytes] = []

    def deliverBody(self, protocol: Any) -> None:
        owner = self

        class Transport:
            def stopProducing(self) -> None:
                owner.stopped += 1

        protocol.makeConnection(Transport())
        for c in self.chunks:
            protocol.dataReceived(c)
        protocol.connectionLost(Failure(self.reason))


def result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "read_small did not fire"
    return out[0]


@pytest.mark.parametrize("end", [ResponseDone(), PotentialDataLoss()], ids=["framed", "until-close"])
def test_whole_body(end: BaseException) -> None:
    resp = FakeResponse([b"ab", b"cd"], end)
    assert result(read_small(resp, 4)) == b"abcd"  # type: ignore[arg-type]
    assert resp.stopped == 0


def test_past_the_cap_drops_the_connection() -> None:
    resp = FakeResponse([b"abc", b"def", b"ghi"], ResponseDone())
    got = result(read_small(resp, 4))  # type: ignore[arg-type]
    assert isinstance(got, Failure) and got.check(TooLarge) and isinstance(got.value, ValueError)
    assert resp.stopped >= 1


def test_broken_off_body_fails() -> None:
    resp = FakeResponse([b"ab"], ResponseFailed([Failure(ConnectionError("cut"))]))
    got = result(read_small(resp, 100))  # type: ignore[arg-type]
    assert isinstance(got, Failure) and got.check(ResponseFailed)
