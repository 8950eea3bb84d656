"""Cross-process singleflight (sparkcache/fetch/xlock.py): one owner per key
across processes; the others tail its spool and see the commit or the abort;
an owner killed at any instant releases the key (docs/workers.rst)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from sparkcache.fetch.xlock import Ended, Held, KeyLocks, Marker, Tail, paths

KEY = "generic/r/files/x.bin"

# The other worker: owns KEY, announces its spool, writes the body in two
# halves (the second when told on stdin), then "commits" (a file standing in
# for the index row) and releases; "die" on stdin makes it wait to be killed.
OWNER = r"""
import os, sys
from sparkcache.fetch import xlock
from sparkcache.fetch.xlock import KeyLocks, Marker, paths, remove_marker, write_marker
data, key, spool, body, ranged = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].encode(), sys.argv[5] == "1"
if not ranged:
    xlock._OFD_SETLK = 0
locks = KeyLocks(data, None)
marker_path = paths(locks.dir, key)[1]
token = locks._take(key)
print("owner" if token is not None else "busy", flush=True)
if token is None:
    sys.exit(0)
write_marker(marker_path, Marker(spool=spool, total=len(body)))
with open(spool, "wb") as f:
    f.write(body[: len(body) // 2]); f.flush()
    print("half", flush=True)
    if sys.stdin.readline().strip() == "die":
        sys.stdin.readline()  # killed while waiting here
    f.write(body[len(body) // 2:]); f.flush(); os.fsync(f.fileno())
open(spool + ".committed", "w").close()  # the index row
remove_marker(marker_path)
locks._unlock(key, token)
print("done", flush=True)
"""


@pytest.fixture(autouse=True, params=["ranges", "files"])
def lock_mode(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test with a key's lock as a byte of one file (a kernel with open
    file description locks) and as a file of its own (one without)."""
    from sparkcache.fetch import xlock

    if request.param == "files":
        monkeypatch.setattr(xlock, "_OFD_SETLK", 0)
    return str(request.param)


def _in_io(fn: Any, *args: Any) -> Any:
    return deferToThread(fn, *args)


def _owner(tmp_path: Path, body: bytes) -> tuple[subprocess.Popen[str], str]:
    spool = str(tmp_path / "spool-1")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    from sparkcache.fetch import xlock

    ranged = "1" if xlock._OFD_SETLK else "0"
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), KEY, spool, body.decode(), ranged],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "owner"
    assert proc.stdout.readline().strip() == "half"
    return proc, spool


def _committed(spool: str) -> Any:
    async def check() -> bool:
        return os.path.exists(spool + ".committed")
    return check


async def _announced(tmp_path: Path, name: str, follower_io: Any = _in_io,
                     **marker_args: Any) -> tuple[KeyLocks, KeyLocks, Held, Marker, Path]:
    """KEY owned and announced through one KeyLocks (its spool ``name`` holding
    b"abc" of 10 bytes), and its marker as a second KeyLocks reads it."""
    owner, follower = KeyLocks(str(tmp_path), _in_io), KeyLocks(str(tmp_path), follower_io)
    spool = tmp_path / name
    spool.write_bytes(b"abc")
    held = await owner.acquire(KEY)
    assert held is not None
    await held.announce(Marker(spool=str(spool), total=10, **marker_args))
    marker = await follower.marker(KEY)
    assert marker is not None
    return owner, follower, held, marker, spool


@pytest_twisted.ensureDeferred
async def test_one_owner_per_key_in_one_process_too(tmp_path: Path) -> None:
    a, b = KeyLocks(str(tmp_path), _in_io), KeyLocks(str(tmp_path), _in_io)
    held = await a.acquire(KEY)
    assert held is not None
    assert await b.acquire(KEY) is None  # per open file, so two workers' opens conflict
    assert await a.acquire(KEY) is None  # and one worker's threads too
    assert await b.acquire("another/key") is not None
    await held.announce(Marker(spool="/x", total=3))
    assert (await b.marker(KEY)).spool == "/x"  # type: ignore[union-attr]
    await held.release()
    assert await b.marker(KEY) is None
    again = await b.acquire(KEY)
    assert again is not None
    await again.release()


@pytest_twisted.ensureDeferred
async def test_a_loser_tails_the_owners_spool_to_the_commit(tmp_path: Path) -> None:
    body = "x" * 5000 + "y" * 5000
    proc, spool = _owner(tmp_path, body.encode())
    try:
        locks = KeyLocks(str(tmp_path), _in_io)
        assert await locks.acquire(KEY) is None  # one production: the other process's
        marker = await locks.marker(KEY)
        assert marker is not None and marker.spool == spool and marker.pid == proc.pid
        tail = Tail(locks, KEY, marker, _committed(spool))
        await tail.open()
        assert await tail.poll() == 5000
        assert tail.read(0, 1 << 20) == b"x" * 5000
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        marks: list[int] = []
        assert await tail.follow(reactor, marks.append, interval=0.01) is True
        assert marks[-1] == 10000
        assert tail.read(0, 1 << 20) == body.encode()
        tail.close()
        assert proc.wait(20) == 0
        assert await locks.marker(KEY) is None
    finally:
        proc.kill()
        proc.wait()


@pytest_twisted.ensureDeferred
async def test_an_owner_killed_mid_body_aborts_the_tail_and_frees_the_key(tmp_path: Path) -> None:
    proc, spool = _owner(tmp_path, b"z" * 8000)
    try:
        locks = KeyLocks(str(tmp_path), _in_io)
        marker = await locks.marker(KEY)
        assert marker is not None
        tail = Tail(locks, KEY, marker, _committed(spool))
        await tail.open()
        assert await tail.poll() == 4000
        assert proc.stdin is not None
        proc.stdin.write("die\n")
        proc.stdin.flush()
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)
        with pytest.raises(Ended) as ended:
            while True:
                await tail.poll()
        assert not ended.value.committed and "died" in str(ended.value)
        tail.close()
        # The stale marker is gone and the key can be produced again, here.
        assert await locks.marker(KEY) is None
        held = await locks.acquire(KEY)
        assert held is not None
        await held.release()
        # The dead owner's lock file went with the release that followed it.
        assert not os.path.exists(paths(locks.dir, KEY)[0])
    finally:
        proc.kill()
        proc.wait()


@pytest_twisted.ensureDeferred
async def test_an_abandoned_production_ends_the_tail_uncommitted(tmp_path: Path) -> None:
    _, follower, held, marker, spool = await _announced(tmp_path, "spool-2", hold_last=True)
    tail = Tail(follower, KEY, marker, _committed(str(spool)))
    await tail.open()
    assert await tail.poll() == 3
    spool.write_bytes(b"0123456789")
    assert await tail.poll() == 9  # the last byte waits for the commit (a digest to match)
    await held.release()  # no index row: an abort
    with pytest.raises(Ended) as ended:
        await tail.poll()
    assert not ended.value.committed and "abandoned" in str(ended.value)
    tail.close()


@pytest_twisted.ensureDeferred
async def test_an_abort_is_seen_at_the_next_poll_with_its_reason(tmp_path: Path) -> None:
    owner, follower, held, marker, _ = await _announced(tmp_path, "spool-3")

    async def never() -> bool:
        raise AssertionError("an abort the marker says needs no index lookup")

    tail = Tail(follower, KEY, marker, never)
    await tail.open()
    assert await tail.poll() == 3
    await held.abort("digest mismatch: expected sha256:00, got sha256:11")
    # The marker is still there (the lock still held): its error ends the tail.
    assert os.path.exists(paths(follower.dir, KEY)[1])
    with pytest.raises(Ended) as ended:
        await tail.poll()
    assert not ended.value.committed and "digest mismatch" in str(ended.value)
    await held.release()
    tail.close()
    # The marker and its reason stay after the release, for a tail that polls late...
    late = Tail(follower, KEY, marker, never)
    await late.open()
    with pytest.raises(Ended) as ended:
        await late.poll()
    assert "digest mismatch" in str(ended.value)
    late.close()
    # ... until the key's next owner takes it away.
    # Nothing was announced: an abort writes no marker.
    again = await owner.acquire(KEY)
    assert again is not None
    assert not os.path.exists(paths(follower.dir, KEY)[1])
    await again.abort("gone before the first byte")
    assert not os.path.exists(paths(follower.dir, KEY)[1])
    await again.release()


@pytest_twisted.ensureDeferred
async def test_a_cancelled_poll_keeps_the_descriptor_until_its_thread_is_done(tmp_path: Path) -> None:
    """The daemon stopping cancels a follower mid-poll: the descriptor the
    poll's thread reads must not be closed (and reused) under it."""
    from twisted.internet.defer import CancelledError, Deferred

    gate: Deferred[None] = Deferred()
    calls: list[Any] = []

    def held_in_io(fn: Any, *args: Any) -> Any:
        if "poll" in getattr(fn, "__qualname__", "") and not calls:
            calls.append(fn)
            return gate.addCallback(lambda _: fn(*args))
        return deferToThread(fn, *args)

    _, follower, held, marker, spool = await _announced(tmp_path, "spool-4", held_in_io)
    tail = Tail(follower, KEY, marker, _committed(str(spool)))
    await tail.open()
    fd = tail.fd
    assert fd is not None
    polling = Deferred.fromCoroutine(tail.poll())
    polling.cancel()
    with pytest.raises(CancelledError):
        await polling
    tail.close()
    os.fstat(fd)  # still open: the poll's "thread" has not run yet
    gate.callback(None)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed once it ran
    await held.release()


@pytest_twisted.ensureDeferred
async def test_an_owner_ending_between_the_marker_read_and_the_probe_is_a_commit(tmp_path: Path,
                                                                               monkeypatch: Any) -> None:
    """The owner commits, removes its marker and unlocks just after a poll read
    the marker and just before that poll probes the lock: the probe wins the
    lock, and the tail must see the commit, not a dead owner (seen in CI as a
    502 for a client of the other worker)."""
    from sparkcache.fetch import xlock

    a, b = KeyLocks(str(tmp_path), _in_io), KeyLocks(str(tmp_path), _in_io)
    held = await a.acquire(KEY)
    assert held is not None and held.token is not None
    spool = tmp_path / "spool-1"
    spool.write_bytes(b"x" * 1000)
    marker = Marker(spool=str(spool), total=1000)
    await held.announce(marker)
    tail = Tail(b, KEY, marker, _committed(str(spool)))
    await tail.open()
    real_lock = b._lock

    def owner_ends_first(key: str) -> int | None:
        if held.token is not None:  # the owner's commit, then its release, in that order
            (tmp_path / "spool-1.committed").touch()
            xlock.remove_marker(held.marker_path)
            token, held.token = held.token, None
            a._unlock(KEY, token)
        return real_lock(key)

    monkeypatch.setattr(b, "_lock", owner_ends_first)
    with pytest.raises(Ended) as e:
        await tail.poll()
    assert e.value.committed and tail.written == 1000
    assert await b.acquire(KEY) is not None  # the probe let go of the lock
    tail.close()


@pytest_twisted.ensureDeferred
async def test_a_released_key_leaves_no_lock_file(tmp_path: Path, lock_mode: str) -> None:
    """Every key ever fetched would otherwise keep a file in locks/."""
    from sparkcache.fetch.xlock import RANGES_NAME

    locks = KeyLocks(str(tmp_path), _in_io)
    lock_path, _ = paths(locks.dir, KEY)
    held = await locks.acquire(KEY)
    # (A byte of one file for every key, or a file of the key's own while held.)
    assert held is not None and os.path.exists(lock_path) == (lock_mode == "files")
    await held.release()
    assert not os.path.exists(lock_path)
    again = await locks.acquire(KEY)  # (the key can be taken again, by a new file)
    assert again is not None
    await again.release()
    files = [name for _, _, names in os.walk(locks.dir) for name in names]
    assert files == ([RANGES_NAME] if lock_mode == "ranges" else [])


@pytest_twisted.ensureDeferred
async def test_a_key_taken_on_the_reactor_is_one_owner_and_clears_a_dead_owners_marker(
        tmp_path: Path, lock_mode: str) -> None:
    """``take_now`` (byte-range locks only): one system call, the same
    exclusion as ``acquire``, and a marker left by an owner that died is gone
    before the new owner's first file operation."""
    from sparkcache.fetch.xlock import read_marker, write_marker

    a, b = KeyLocks(str(tmp_path), _in_io), KeyLocks(str(tmp_path), _in_io)
    if lock_mode == "files":
        assert not a.ranged
        return
    marker_path = paths(a.dir, KEY)[1]
    write_marker(marker_path, Marker(spool="/dead", total=3, pid=1))  # an owner that died
    held = a.take_now(KEY)
    assert held is not None
    assert a.take_now(KEY) is None and b.take_now(KEY) is None
    assert await b.acquire(KEY) is None
    await held.announce(Marker(spool="/ours", total=3))
    assert (await b.marker(KEY)).spool == "/ours"  # type: ignore[union-attr]
    await held.release()
    assert read_marker(marker_path) is None
    again = b.take_now(KEY)
    assert again is not None and await a.acquire(KEY) is None
    b.close()  # (a worker's end: the kernel lets go of everything it held)
    taken = await a.acquire(KEY)
    assert taken is not None
    await taken.release()
    # A marker of a dead owner, then a new owner: gone with the Held's first
    # file operation, or its tidy(), whichever comes first (here the I/O pool
    # runs each call at once).
    from twisted.internet.defer import maybeDeferred

    c = KeyLocks(str(tmp_path), lambda fn, *args: maybeDeferred(fn, *args))
    write_marker(marker_path, Marker(spool="/dead", total=3, pid=1))
    held = c.take_now(KEY)
    assert held is not None and read_marker(marker_path) is not None  # (no file operation on the reactor)
    held.tidy()
    assert read_marker(marker_path) is None
    await held.release()
    write_marker(marker_path, Marker(spool="/dead", total=3, pid=1))
    held = c.take_now(KEY)
    assert held is not None
    await held.announce(Marker(spool="/ours", total=3))
    assert read_marker(marker_path).spool == "/ours"  # type: ignore[union-attr]
    held.tidy()  # (nothing left to do)
    assert read_marker(marker_path).spool == "/ours"  # type: ignore[union-attr]
    await held.abort("upstream went away")
    await held.release()
    assert read_marker(marker_path).error == "upstream went away"  # type: ignore[union-attr]
    # No marker left (the usual case): tidy finds none on the reactor and
    # hands nothing to the I/O pool; the release is the Held's one file operation.
    handed: list[Any] = []

    def counting(fn: Any, *args: Any) -> Any:
        handed.append(fn)
        return maybeDeferred(fn, *args)

    d = KeyLocks(str(tmp_path), counting)
    held = d.take_now("files:never-taken")
    assert held is not None
    held.tidy()
    assert handed == []
    await held.release()
    assert len(handed) == 1


def test_a_lock_taken_on_a_file_removed_meanwhile_is_not_the_lock(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker opens the lock file just before its holder lets go (removing
    it) and another worker makes a new one and takes it: the first one's flock
    on the old file succeeds, but it is not the lock. try_lock sees that and
    finds the key taken."""
    from sparkcache.fetch import xlock

    lock_path, _ = paths(str(tmp_path / "locks"), KEY)
    holder = xlock.try_lock(lock_path)
    assert holder is not None
    stale = os.open(lock_path, os.O_RDWR)  # opened before the holder let go
    xlock.release_lock(holder, lock_path)
    newer = xlock.try_lock(lock_path)  # another worker: a new file, locked
    assert newer is not None
    real_open = os.open
    opens: list[str] = []

    def open_(path: str, *args: Any) -> int:
        opens.append(path)
        return stale if len(opens) == 1 else real_open(path, *args)

    monkeypatch.setattr(xlock.os, "open", open_)
    assert xlock.try_lock(lock_path) is None  # not the stale file's lock: the new file is held
    assert len(opens) == 2
    monkeypatch.undo()
    xlock.release_lock(newer, lock_path)
    assert not os.path.exists(lock_path)
