"""spawn_upload_pack against a real bare repository with fake consumers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import deferLater
from zope.interface import implementer

from sparkcache.git.pktline import DELIM, FLUSH, FLUSH_PKT, iter_pkt_lines, pkt_line
from sparkcache.git.uploadpack import child_env, spawn_upload_pack, upload_pack_argv
from tests.support.git_upstream import git as _git
from tests.support.tools import require_tool


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A bare repo with one commit holding ~2 MiB of incompressible data."""
    require_tool("git")
    path = tmp_path_factory.mktemp("up") / "r.git"
    _git("init", "-q", "--bare", "-b", "main", str(path))
    blob = _git("hash-object", "-w", "--stdin", cwd=path, input=os.urandom(2 << 20))
    tree = _git("mktree", cwd=path, input=f"100644 blob {blob}\tbig.bin\n".encode())
    commit = _git("commit-tree", tree, "-m", "one", cwd=path)
    _git("update-ref", "refs/heads/main", commit, cwd=path)
    return path, commit


@implementer(IConsumer)
class FakeConsumer:
    def __init__(self, pause_after_first: bool = False, stop_after_first: bool = False) -> None:
        self.data = bytearray()
        self.writes = 0
        self.producer: Any = None
        self.streaming: bool | None = None
        self.unregistered = 0
        self.pause_after_first = pause_after_first
        self.stop_after_first = stop_after_first
        self.paused_at: int | None = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.unregistered += 1
        self.producer = None

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.data += data
        if self.writes == 1 and self.pause_after_first:
            self.paused_at = len(self.data)
            self.producer.pauseProducing()
        if self.writes == 1 and self.stop_after_first:
            self.producer.stopProducing()


def _fetch_v2(want: str) -> bytes:
    return (pkt_line("command=fetch\n") + pkt_line("object-format=sha1\n") + DELIM + pkt_line("no-progress\n")
            + pkt_line(f"want {want}\n") + pkt_line("done\n") + FLUSH)


def test_argv_and_env() -> None:
    argv = upload_pack_argv("/m/r.git", True, {"uploadpack.allowFilter": "false"})
    assert argv[-3:] == ["--stateless-rpc", "--advertise-refs", "/m/r.git"]
    assert "uploadpack.allowFilter=false" in argv and "uploadpack.allowFilter=true" not in argv
    env = child_env("version=2")
    assert env["GIT_PROTOCOL"] == "version=2"
    assert set(env) <= {"PATH", "HOME", "LANG", "GIT_TERMINAL_PROMPT", "GIT_CONFIG_NOSYSTEM", "GIT_PROTOCOL"}
    assert "GIT_PROTOCOL" not in child_env(None)


@pytest_twisted.ensureDeferred
async def test_advertise_v0(bare: tuple[Path, str]) -> None:
    path, commit = bare
    c = FakeConsumer()
    code = await spawn_upload_pack(reactor, str(path), advertise=True, stdin=b"", git_protocol=None, consumer=c)
    assert code == 0
    pkts = list(iter_pkt_lines(bytes(c.data)))
    assert pkts[0].startswith(commit.encode() + b" HEAD\x00")  # type: ignore[union-attr]
    assert pkts[-1] is FLUSH_PKT
    assert c.streaming is True and c.unregistered == 1 and c.producer is None


@pytest_twisted.ensureDeferred
async def test_advertise_v2(bare: tuple[Path, str]) -> None:
    path, _ = bare
    c = FakeConsumer()
    code = await spawn_upload_pack(reactor, str(path), advertise=True, stdin=b"", git_protocol="version=2", consumer=c)
    assert code == 0
    assert list(iter_pkt_lines(bytes(c.data)))[0] == b"version 2"


@pytest_twisted.ensureDeferred
async def test_fetch_streams_with_backpressure(bare: tuple[Path, str]) -> None:
    path, commit = bare
    c = FakeConsumer(pause_after_first=True)
    d = spawn_upload_pack(reactor, str(path), advertise=False, stdin=_fetch_v2(commit), git_protocol="version=2",
                          consumer=c)
    for _ in range(50):
        if c.paused_at is not None:
            break
        await deferLater(reactor, 0.05)
    assert c.paused_at is not None
    # While paused, the child's output stays in its pipe (64 KiB), not in our memory.
    await deferLater(reactor, 0.5)
    assert len(c.data) == c.paused_at and not d.called
    c.producer.resumeProducing()
    assert await d == 0
    assert b"PACK" in c.data and len(c.data) > (2 << 20)
    assert c.unregistered == 1


@pytest_twisted.ensureDeferred
async def test_stop_kills_child(bare: tuple[Path, str]) -> None:
    path, commit = bare
    c = FakeConsumer(stop_after_first=True)
    code = await spawn_upload_pack(reactor, str(path), advertise=False, stdin=_fetch_v2(commit),
                                   git_protocol="version=2", consumer=c)
    assert code != 0
    assert len(c.data) < (2 << 20)
    # The consumer that stopped us is not asked to unregister a second time.
    assert c.unregistered == 0


@pytest_twisted.ensureDeferred
async def test_bad_request_exit_status(bare: tuple[Path, str]) -> None:
    path, _ = bare
    c = FakeConsumer()
    d: Deferred[int] = spawn_upload_pack(reactor, str(path), advertise=False, stdin=_fetch_v2("e" * 40),
                                         git_protocol="version=2", consumer=c)
    assert await d != 0
