"""The sendfile loop (sparkcache.web.sendfile._copy) on a real socket pair:
every byte arrives in order through a socket buffer far smaller than the
body, and a full buffer is waited for with poll, never found by a failing
sendfile."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from sparkcache.web import sendfile


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    a.setblocking(False)  # as the reactor's sockets are
    return a, b


def _reader(sock: socket.socket, n: int, out: list[bytes], start: threading.Event) -> threading.Thread:
    """Reads a bounded step each time the sender waits for room: a reader that
    drained as fast as the kernel filled would let one sendfile carry the
    whole body, and the test would no longer see a full buffer (CI did)."""

    def run() -> None:
        got = 0
        while got < n:
            # The timeout only matters at the end, when the sender's last
            # sendfile fitted and it has no reason to wait again.
            start.wait(1)
            start.clear()
            step = 0
            while step < 65536 and got < n:
                chunk = sock.recv(min(8192, 65536 - step))
                if not chunk:
                    return
                out.append(chunk)
                got += len(chunk)
                step += len(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.skipif(not hasattr(os, "sendfile"), reason="no sendfile")
def test_a_body_larger_than_the_socket_buffer_arrives_whole(tmp_path: Path, monkeypatch: Any) -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "body"
    path.write_bytes(body)
    calls: list[str] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        try:
            n = real(out_fd, in_fd, offset, count)
        except BlockingIOError:
            calls.append("EAGAIN")
            raise
        calls.append("short" if n < count else "whole")
        return n

    # The reader starts once the sender first waits for room: a sender that
    # tried another sendfile into the full buffer first would fail it.
    waited = threading.Event()
    real_poll = sendfile.select.poll

    class Poll:
        def __init__(self) -> None:
            self.p = real_poll()

        def register(self, fd: int, mask: int) -> None:
            self.p.register(fd, mask)

        def poll(self, timeout: int) -> Any:
            waited.set()
            return self.p.poll(timeout)

    monkeypatch.setattr(sendfile.os, "sendfile", counting)
    monkeypatch.setattr(sendfile.select, "poll", Poll)
    a, b = _pair()
    received: list[bytes] = []
    reader = _reader(b, len(body) - 1000, received, waited)
    fd = os.open(path, os.O_RDONLY)
    try:
        # Bytes 1000.. of the file, from a dup of the sender's socket (closed by _copy).
        sent = sendfile._copy(os.dup(a.fileno()), fd, 1000, len(body), lambda: len(body), lambda: False,
                              threading.Event(), None, lower=False, cork=False)
    finally:
        os.close(fd)
    reader.join(30)
    a.close()
    b.close()
    assert sent == len(body) - 1000
    assert b"".join(received) == body[1000:]
    assert calls.count("short") > 10  # the buffer filled many times...
    assert "EAGAIN" not in calls  # ...and each time the loop waited for room instead of failing a send


@pytest.mark.skipif(not hasattr(os, "sendfile"), reason="no sendfile")
def test_a_cancelled_copy_stops_short(tmp_path: Path) -> None:
    path = tmp_path / "body"
    path.write_bytes(os.urandom(1024 * 1024))
    a, b = _pair()
    cancelled = threading.Event()
    cancelled.set()
    fd = os.open(path, os.O_RDONLY)
    try:
        sent = sendfile._copy(os.dup(a.fileno()), fd, 0, 1024 * 1024, lambda: 1024 * 1024, lambda: False,
                              cancelled, None, lower=False, cork=False)
    finally:
        os.close(fd)
    a.close()
    b.close()
    assert sent == 0
