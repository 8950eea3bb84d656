"""Flight's two lanes: a miss's spool is written and hashed by two threads of
its own that overlap (fetch/flight.py). Driven by hand: the lanes here are
recorded when started and run (in the test's thread, without waiting for more
bytes) only when the test says so."""

from __future__ import annotations

import errno
import hashlib
import threading
from typing import Any, Callable

import pytest

from sparkcache.fetch.flight import BodyError, Flight, Lanes
from sparkcache.store import SpoolFile


class ManualLanes(Lanes):
    """Lanes that start only when ``run`` says, and end once their queue is empty."""

    def __init__(self) -> None:
        self.linger = 0.0
        self.call = lambda fn, *args: fn(*args)
        self.pending: list[Callable[[], None]] = []

    def start(self, lane: Callable[[], None]) -> None:
        self.pending.append(lane)

    def names(self) -> list[str]:
        return [lane.__name__ for lane in self.pending]

    def run(self, name: str) -> None:
        i = self.names().index(name)
        self.pending.pop(i)()


def flight(tmp_path: Any) -> tuple[Flight, ManualLanes, SpoolFile]:
    lanes = ManualLanes()
    spool = SpoolFile(str(tmp_path))
    return Flight("k", spool, None, {}, lanes), lanes, spool


def test_readers_hear_of_written_bytes_before_they_are_hashed(tmp_path: Any) -> None:
    f, lanes, spool = flight(tmp_path)
    told: list[int] = []
    f.listen(lambda: told.append(f.written))
    f.data(b"a" * 1000)
    f.data(b"b" * 500)  # queued for the lane, which has not run yet: one lane, one batch
    assert lanes.names() == ["_write_lane"]
    done = f.flushed()
    lanes.run("_write_lane")
    # written and told; the hash lane was started for both chunks
    assert f.written == 1500 and told == [1500]
    assert lanes.names() == ["_hash_lane"]
    assert f.queued == 1500 and not done.called  # nothing hashed yet: all of it still holds the producer back
    f.data(b"c" * 10)  # a new write lane (the first ended with its queue empty)
    assert lanes.names() == ["_hash_lane", "_write_lane"]
    lanes.run("_hash_lane")
    assert f.queued == 10 and not done.called
    lanes.run("_write_lane")
    assert f.written == 1510 and told[-1] == 1510
    lanes.run("_hash_lane")
    assert done.called and f.queued == 0 and lanes.names() == []
    assert spool.hexdigest() == hashlib.sha256(b"a" * 1000 + b"b" * 500 + b"c" * 10).hexdigest()
    with open(spool.path, "rb") as fh:
        assert fh.read() == b"a" * 1000 + b"b" * 500 + b"c" * 10
    f.release()
    spool.discard()


class FailingSpool(SpoolFile):
    def __init__(self, spool_dir: str) -> None:
        super().__init__(spool_dir)
        self.fail_next = False

    def write_all(self, chunks: list[bytes]) -> int:
        if self.fail_next:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_all(chunks)


def test_a_write_error_ends_both_lanes_and_fails_flushed_once_no_lane_writes(tmp_path: Any) -> None:
    lanes = ManualLanes()
    spool = FailingSpool(str(tmp_path))
    f = Flight("k", spool, None, {}, lanes)
    f.data(b"x" * 100)
    lanes.run("_write_lane")
    f.data(b"y" * 100)
    assert sorted(lanes.names()) == ["_hash_lane", "_write_lane"]
    with f._lock:  # the hash lane is busy with the first batch...
        assert f._take("hash") == [b"x" * 100]
    spool.fail_next = True
    lanes.run("_write_lane")  # ...when the second cannot be written
    assert f.write_error is not None and f.queued == 0 and f.written == 100
    with pytest.raises(OSError):
        f.data(b"z")
    # No lane writes any more: the failure is known now, not after that hash.
    done = f.flushed()
    failures: list[Any] = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(BodyError)
    lanes.run("_hash_lane")  # it sees the error and ends
    assert lanes.names() == []
    f.release()
    spool.discard()


def test_flushed_waits_for_a_batch_a_lane_is_working_on(tmp_path: Any) -> None:
    f, lanes, spool = flight(tmp_path)
    f.hold_last = True  # hashed as written: one lane
    f.data(b"q" * 10)
    # the lane takes its batch, and the flight is busy until it is written
    with f._lock:
        batch = f._take("write")
    done = f.flushed()
    assert batch == [b"q" * 10] and not done.called
    n = spool.write_all(batch)
    with f._lock:
        f._working.discard("write")
        f._on_disk += n
        f._retired += n
    f._sync()
    assert done.called and f.written == 10 and f.queued == 0
    assert spool.hexdigest() == hashlib.sha256(b"q" * 10).hexdigest()
    f.release()
    spool.discard()


def test_a_body_to_verify_is_hashed_as_it_is_written(tmp_path: Any) -> None:
    f, lanes, spool = flight(tmp_path)
    f.hold_last = True  # (set by the engine before the first byte)
    f.data(b"q" * 10)
    lanes.run("_write_lane")
    assert lanes.names() == [] and f.queued == 0
    assert spool.hexdigest() == hashlib.sha256(b"q" * 10).hexdigest()
    f.release()
    spool.discard()


def test_real_lanes_wait_for_more_then_end(tmp_path: Any) -> None:
    """With threads: a lane lingers for more bytes, and ends when the flight does."""
    calls: list[Callable[..., Any]] = []
    done = threading.Event()

    class Reactor:
        def callFromThread(self, fn: Callable[..., Any], *args: Any) -> None:
            calls.append(lambda: fn(*args))
            done.set()

    lanes = Lanes(Reactor(), linger=30.0)
    spool = SpoolFile(str(tmp_path))
    f = Flight("k", spool, None, {}, lanes)
    f.data(b"r" * 4096)
    for _ in range(2):  # written, then hashed (lanes linger: they stay alive)
        assert done.wait(10)
        done.clear()
        while calls:
            calls.pop(0)()
        if f.queued == 0:
            break
    assert f.written == 4096
    while f.queued:
        assert done.wait(10)
        done.clear()
        while calls:
            calls.pop(0)()
    with f._lock:
        assert f._alive  # still waiting for more
    f.complete(None)  # ends them now, not after 30 s
    for _ in range(600):  # up to 30 s: the lane threads may wait long for a loaded CPU
        with f._lock:
            if not f._alive:
                break
        threading.Event().wait(0.05)
    with f._lock:
        assert not f._alive
    assert spool.hexdigest() == hashlib.sha256(b"r" * 4096).hexdigest()
    spool.discard()
