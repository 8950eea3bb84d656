"""TCP_CORK around a stored body's sendfile (sparkcache.web.sendfile): the
copy of a corked socket leaves it uncorked once the last byte is queued, so
the body's last partial segment goes out at once rather than when the
kernel's 200 ms cork timer fires. (Without the cork a 1 GiB hit measured
0.81x nginx: docs/benchmarks.rst.)"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from sparkcache.web import sendfile

pytestmark = pytest.mark.skipif(not hasattr(os, "sendfile") or not hasattr(socket, "TCP_CORK"),
                                reason="Linux only: sendfile and TCP_CORK")


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (TCP_CORK means nothing on a socketpair)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.setblocking(False)  # as the reactor's sockets are
    return a, b


def _corked(s: socket.socket) -> bool:
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) != 0


def test_setcork_sets_and_clears_the_option_on_a_descriptor() -> None:
    a, b = _tcp_pair()
    try:
        assert sendfile._setcork(a.fileno(), True)
        assert _corked(a)
        assert sendfile._setcork(a.fileno(), False)
        assert not _corked(a)
        a.getsockname()  # the socket object still owns its descriptor
    finally:
        a.close()
        b.close()


def test_a_corked_copy_ends_uncorked_with_every_byte_sent(tmp_path: Path) -> None:
    body = os.urandom(256 * 1024 + 123)  # not a whole number of segments
    path = tmp_path / "body"
    path.write_bytes(body)
    a, b = _tcp_pair()
    received: list[bytes] = []

    def read() -> None:
        got = 0
        while got < len(body):
            chunk = b.recv(65536)
            if not chunk:
                return
            received.append(chunk)
            got += len(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert sendfile._setcork(a.fileno(), True)  # as the hand-off corks before the headers
        sent = sendfile._copy(os.dup(a.fileno()), fd, 0, len(body), lambda: len(body), lambda: False,
                              threading.Event(), None, lower=False, cork=True)
        assert not _corked(a)  # uncorked by the copy, through its own descriptor
    finally:
        os.close(fd)
    reader.join(30)
    a.close()
    b.close()
    assert sent == len(body)
    assert b"".join(received) == body


def test_an_uncorked_copy_leaves_the_option_alone(tmp_path: Path) -> None:
    """A tail (cork=False) never touches the option."""
    path = tmp_path / "body"
    path.write_bytes(b"x" * 1000)
    a, b = _tcp_pair()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert sendfile._setcork(a.fileno(), True)
        sent = sendfile._copy(os.dup(a.fileno()), fd, 0, 1000, lambda: 1000, lambda: False,
                              threading.Event(), None, lower=False, cork=False)
        assert _corked(a)
    finally:
        os.close(fd)
        a.close()
        b.close()
    assert sent == 1000
