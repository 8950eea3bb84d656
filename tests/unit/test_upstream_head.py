"""The upstream client's protocol hands a response's head to Twisted's parser
apart from the body bytes of the same read (fetch/upstream.py
``_HeadFirstProtocol``): whatever a read holds, the response is the one
Twisted's own protocol makes of the same bytes."""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, HTTPClientParser, Request
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from sparkcache.fetch.upstream import HEAD_SPLIT_MIN, _HeadFirstProtocol


class Collect(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done: Deferred[Failure] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(reason)


def fetch(cls: type, reads: list[bytes], method: bytes = b"GET") -> tuple[Any, bytes, Any]:
    """(response, body, how the body ended) of ``cls`` fed ``reads``."""
    proto = cls(lambda p: None)
    proto.makeConnection(StringTransport())
    got: list[Any] = []
    collected = Collect()

    def deliver(response: Any) -> Any:
        got.append(response)
        response.deliverBody(collected)

    proto.request(Request(method, b"/x", Headers({b"host": [b"up"]}), None)).addCallback(deliver)
    for data in reads:
        proto.dataReceived(data)
    response = got[0]
    ended: list[Any] = []
    collected.done.addBoth(ended.append)
    return response, b"".join(collected.data), ended[0] if ended else None


BODY = os.urandom(200_000)
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nX-Many: "
        + b"a" * 100 + b"\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\n\r\n")


@pytest.mark.parametrize("reads", [
    [HEAD + BODY],  # one read: the head and the whole body
    [HEAD + BODY[:65536 - len(HEAD)], BODY[65536 - len(HEAD):]],  # a full first read, then the rest
    [HEAD[:10], HEAD[10:] + BODY],  # the head's end in a large read
    [HEAD + BODY[:100], BODY[100:]],  # a first read too small to split
], ids=["one-read", "64k-first", "head-split-across", "small-first"])
def test_a_body_after_its_head_in_one_read_arrives_whole(reads: list[bytes]) -> None:
    for cls in (_HeadFirstProtocol, HTTP11ClientProtocol):
        response, body, ended = fetch(cls, reads)
        assert response.code == 200, cls
        assert response.headers.getRawHeaders(b"x-many") == [b"a" * 100]
        assert response.length == len(BODY)
        assert body == BODY, cls
        assert ended is not None and ended.check(ResponseDone)


def test_an_interim_response_before_the_final_one_in_one_read() -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n" + b"X-Pad: " + b"p" * HEAD_SPLIT_MIN + b"\r\n\r\n"
    response, body, _ = fetch(_HeadFirstProtocol, [interim + HEAD + BODY])
    assert response.code == 200 and body == BODY


def test_a_head_larger_than_the_split_threshold() -> None:
    big = (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * (2 * HEAD_SPLIT_MIN) + b"\r\nContent-Length: 5\r\n\r\nhello")
    response, body, _ = fetch(_HeadFirstProtocol, [big])
    assert response.headers.getRawHeaders(b"x-big") == [b"b" * (2 * HEAD_SPLIT_MIN)]
    assert body == b"hello"


def test_a_response_without_a_body_followed_by_stray_bytes_gives_the_same_response() -> None:
    head = b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n"
    stray = b"x" * HEAD_SPLIT_MIN
    ours, _, _ = fetch(_HeadFirstProtocol, [head + stray])
    theirs, _, _ = fetch(HTTP11ClientProtocol, [head + stray])
    assert ours.code == theirs.code == 204
    assert ours.headers.getRawHeaders(b"x-a") == theirs.headers.getRawHeaders(b"x-a") == [b"b"]


def test_the_parser_gets_the_head_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = HTTPClientParser.dataReceived

    def spy(self: HTTPClientParser, data: bytes) -> None:
        sizes.append(len(data))
        real(self, data)

    monkeypatch.setattr(HTTPClientParser, "dataReceived", spy)
    _, body, _ = fetch(_HeadFirstProtocol, [HEAD + BODY])
    assert body == BODY
    assert sizes == [len(HEAD), len(BODY)]


def test_a_chunked_body_in_the_read_of_its_head() -> None:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(BODY[i:i + 10_000]), BODY[i:i + 10_000]) for i in range(0, len(BODY), 10_000))
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for cls in (_HeadFirstProtocol, HTTP11ClientProtocol):
        response, body, ended = fetch(cls, [head + chunks + b"0\r\n\r\n"])
        assert response.code == 200 and body == BODY, cls
        assert ended is not None and ended.check(ResponseDone)


@pytest.mark.parametrize("url", [
    "http://Example.COM:8080/a/b?c#d", "https://h/x", "http://u:p@h:81?q", "http://[::1]:90/p", "https://h#f",
    "http://h", "not a url", "http://h:99999/x",
])
def test_an_origin_is_the_same_remembered_or_not(url: str) -> None:
    """fetch/upstream.py ``origin`` remembers origins by the URL's part before
    its path: the same answer (or error) as parsing the whole URL, twice over."""
    from sparkcache.fetch.upstream import _origin, origin

    def outcome(fn: Any) -> Any:
        try:
            return fn(url)
        except ValueError as e:
            return str(e)

    assert outcome(origin) == outcome(_origin) == outcome(origin)
