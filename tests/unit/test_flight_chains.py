"""Flight's two I/O chains: a miss's spool is written and hashed in
overlapping thread-pool calls (fetch/flight.py). Driven by hand: ``in_thread``
here records each call and runs it only when the test says so."""

from __future__ import annotations

import errno
import hashlib
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred

from sparkcache.fetch.flight import BodyError, Flight
from sparkcache.store import SpoolFile


class Calls:
    """An ``in_thread`` whose calls wait until ``run`` or ``fail``."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((fn, args, d))
        return d

    def names(self) -> list[str]:
        return [fn.__name__ for fn, _a, _d in self.pending]

    def run(self, name: str) -> None:
        i = self.names().index(name)
        fn, args, d = self.pending.pop(i)
        d.callback(fn(*args))

    def fail(self, name: str, e: BaseException) -> None:
        i = self.names().index(name)
        _fn, _args, d = self.pending.pop(i)
        d.errback(e)


def flight(tmp_path: Any) -> tuple[Flight, Calls, SpoolFile]:
    calls = Calls()
    spool = SpoolFile(str(tmp_path))
    return Flight("k", spool, None, {}, calls), calls, spool


def test_readers_hear_of_written_bytes_before_they_are_hashed(tmp_path: Any) -> None:
    f, calls, spool = flight(tmp_path)
    told: list[int] = []
    f.listen(lambda: told.append(f.written))
    f.data(b"a" * 1000)
    f.data(b"b" * 500)  # queued behind the write in progress
    assert calls.names() == ["write_all"]
    calls.run("write_all")
    # written and told; the next write and the first hash run side by side
    assert f.written == 1000 and told == [1000]
    assert sorted(calls.names()) == ["hash_chunks", "write_all"]
    assert f.queued == 1500  # nothing hashed yet: all of it still holds the producer back
    done = f.flushed()
    calls.run("write_all")
    assert f.written == 1500 and told[-1] == 1500 and not done.called
    calls.run("hash_chunks")
    assert calls.names() == ["hash_chunks"] and not done.called  # the second batch
    calls.run("hash_chunks")
    assert done.called and f.queued == 0
    assert spool.hexdigest() == hashlib.sha256(b"a" * 1000 + b"b" * 500).hexdigest()
    with open(spool.path, "rb") as fh:
        assert fh.read() == b"a" * 1000 + b"b" * 500
    f.release()
    spool.discard()


def test_a_write_error_waits_for_the_hash_in_flight_before_failing_flushed(tmp_path: Any) -> None:
    f, calls, spool = flight(tmp_path)
    f.data(b"x" * 100)
    calls.run("write_all")
    f.data(b"y" * 100)
    assert sorted(calls.names()) == ["hash_chunks", "write_all"]
    calls.fail("write_all", OSError(errno.ENOSPC, "No space left on device"))
    done = f.flushed()
    # the hash thread still works on the spool's state: nobody may discard it yet
    assert not done.called
    with pytest.raises(OSError):
        f.data(b"z")
    calls.run("hash_chunks")
    assert done.called
    failures: list[Any] = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(BodyError)
    assert f.queued == 0 and f.written == 100
    f.release()
    spool.discard()


def test_a_body_to_verify_is_hashed_as_it_is_written(tmp_path: Any) -> None:
    f, calls, spool = flight(tmp_path)
    f.hold_last = True  # (set by the engine before the first byte)
    f.data(b"q" * 10)
    calls.run("write_all")
    assert calls.names() == [] and f.queued == 0
    assert spool.hexdigest() == hashlib.sha256(b"q" * 10).hexdigest()
    f.release()
    spool.discard()
