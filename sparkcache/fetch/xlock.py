"""Cross-process singleflight for ``server.workers > 1`` (docs/workers.rst).

``Cache`` takes a key's lock behind its in-process Singleflight (one lock
attempt per key per worker), and only with workers: ``fetch/across.py``.

A production of a key is owned by whoever holds ``flock(LOCK_EX)`` on the
key's lock file under ``<data_dir>/locks/``; the kernel releases it when the
holder's process dies, at any instant, so a stale lock file means nothing
(and a release removes the file: ``release_lock``). The
owner announces its spool in a *flight marker* next to the lock (written to a
temp name and renamed: a reader sees all of it or none). Another worker that
fails to take the lock tails that spool (``Tail``) until the marker goes away:
then the entry is committed (the caller's ``committed()`` finds the index row)
or the production was abandoned. The owner's order is: index row, unlink the
marker, release the lock; on abort: rewrite the marker with an ``error``
(tails end at their next poll, with the owner's reason), release; that marker
stays until the key's next owner removes it. So a marker without an error
present while the lock is free names a dead owner's spool.

Every call that touches the file system runs in the I/O pool (``in_io``),
except a miss's first try for the lock, which runs in the SQLite thread
right after the index read that found no fresh row, and before a second
read of the row (``KeyLocks.take``, ``Index.get_or_claim``): one thread round
trip on the way to the first byte instead of three.

Where the kernel has open file description locks (Linux 3.15 on), a key's
lock is not a file of its own but one byte of ``locks/keys.lock``, at an
offset drawn from the key's hash (62 bits: two keys share a byte with odds
that never matter): ``fcntl(F_OFD_SETLK)`` on a descriptor opened at start.
That is one system call that never touches a disk or a directory, so a
cold miss whose key the index surely lacks (store/keyfilter.py) takes it on
the reactor (``KeyLocks.take_now``), with no thread round trip at all. Such
locks belong to the open file, not to a thread, and every thread of a worker
shares that one: the worker keeps the set of bytes it holds, so that a
second claim inside the worker fails as a second process's would.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import struct
import threading
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.task import deferLater

from sparkcache.fetch.produce import shield

InIO = Callable[..., Deferred[Any]]

POLL_INTERVAL = 0.05
# How often try_lock tries again when the file it locked was removed meanwhile.
LOCK_TRIES = 100
# One file for every key's byte-range lock (the module's docstring).
RANGES_NAME = "keys.lock"
_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 0)  # (0: not this kernel)
# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padding.
_FLOCK = struct.Struct("hhqqi4x")


@dataclass(frozen=True)
class Marker:
    """What a lock's owner says about its production."""

    spool: str  # the spool file's path (renamed into cas/ at commit: open it early)
    total: int | None  # the announced length, when known
    headers: dict[str, str] = field(default_factory=dict)
    hold_last: bool = False  # the last byte is served only once committed (a digest to match)
    pid: int = field(default_factory=os.getpid)
    flight: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Set when the production was abandoned (the marker is rewritten with it
    # before it goes): a tail ends at once, without asking the index.
    error: str | None = None


# -- blocking primitives (the I/O pool, or a tool) ------------------------------------


def paths(locks_dir: str, key: str) -> tuple[str, str]:
    """(lock file, marker file) of ``key``; fanned out so no directory grows huge."""
    h = hashlib.sha256(key.encode("utf-8")).hexdigest()
    base = os.path.join(locks_dir, h[:2], h)
    return base + ".lock", base + ".flight"


def try_lock(lock_path: str) -> int | None:
    """The descriptor holding the lock, or None when another holds it. Never waits.

    A holder that lets go with ``release_lock`` removes the file first, so a
    file opened just before that is no longer the lock once its flock is
    ours: the lock is the file at ``lock_path``, checked after the flock (by
    inode), and tried again when it is not."""
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    for _ in range(LOCK_TRIES):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        held = os.fstat(fd)
        try:
            there = os.stat(lock_path)
        except FileNotFoundError:
            there = None
        if there is not None and (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # (removed by its holder meanwhile: the new file is the lock)
    return None  # (taken and let go again every time: others are busy with it)


def unlock(fd: int) -> None:
    """Let go, leaving the lock file (``release_lock`` removes it)."""
    # Closing the last descriptor of the open file releases the flock.
    os.close(fd)


def release_lock(fd: int, lock_path: str) -> None:
    """Let go of a lock ``try_lock`` took, removing its file while still
    holding it: a store's ``locks/`` would otherwise keep a file for every key
    ever fetched (``try_lock`` says why that is safe)."""
    try:
        os.unlink(lock_path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def write_marker(marker_path: str, marker: Marker) -> None:
    os.makedirs(os.path.dirname(marker_path), exist_ok=True)  # (try_lock makes it for a lock file)
    tmp = f"{marker_path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(marker), f)
    os.replace(tmp, marker_path)


def read_marker(marker_path: str) -> Marker | None:
    try:
        with open(marker_path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:  # not ours (renames are atomic): treat as absent
        return None
    return Marker(**data)


def remove_marker(marker_path: str) -> None:
    try:
        os.unlink(marker_path)
    except FileNotFoundError:
        pass


# -- the reactor side ------------------------------------------------------------------


class Held:
    """This process owns the production of ``key`` until ``release``."""

    def __init__(self, locks: "KeyLocks", key: str, token: int, clear: bool = False) -> None:
        self.locks = locks
        self.key = key
        self.token: int | None = token  # (KeyLocks._lock's)
        self.marker_path = paths(locks.dir, key)[1]
        self.marker: Marker | None = None  # once announced
        # One file operation at a time, in order: the I/O pool has several
        # threads, and a late marker write must not follow the removal.
        self._order = DeferredLock()
        self._failed = False  # the marker says the production failed
        # Taken on the reactor (KeyLocks.take_now): a dead owner's marker is
        # removed in the first file operation, before anything of ours.
        self._clear = clear

    def _then(self, fn: Callable[..., None], *args: Any) -> Deferred[None]:
        if self._clear:
            self._clear = False

            def cleared_first() -> None:
                remove_marker(self.marker_path)
                fn(*args)

            return self._order.run(self.locks.in_io, cleared_first)
        return self._order.run(self.locks.in_io, fn, *args)

    def tidy(self) -> None:
        """Remove a dead owner's marker now, if ``take_now`` left that to do
        (called once the production's upstream request is out). Whether there
        is one is asked first, on the reactor (one ``lstat`` of a file beside
        the lock, as the lock itself is one system call): only the lock's
        holder writes the marker, so none now means none until ours. Almost
        always there is none, and a thread hand-off there cost the reactor
        0.1-0.3 ms while upstream's answer came in, and took the other core
        upstream could have answered on (2 workers: 0.2 ms more of the
        reactor's CPU between the request and the answer's read)."""
        if not self._clear:
            return
        if not os.path.lexists(self.marker_path):
            self._clear = False
            return
        self._then(lambda: None).addErrback(lambda f: None)

    def announce(self, marker: Marker) -> Deferred[None]:
        """Tell the other workers where the body is being spooled; fires once
        the marker is written. The engine does not wait for that: the write
        runs in order with ``abort`` and ``release`` (which already know the
        marker), and the production's first bytes need not wait for a thread
        round trip: a worker that looks before it is there polls again, and the
        bytes it then tails from offset 0 are all in the spool already."""
        self.marker = marker
        return self._then(write_marker, self.marker_path, marker)

    def abort(self, why: str) -> Deferred[None]:
        """The production was abandoned: the tails end at their next poll
        (with ``why``), without waiting for the marker to go. ``release`` follows."""
        if self.token is None or self.marker is None:
            return succeed(None)
        marker = replace(self.marker, error=why or "abandoned")

        def run() -> None:
            write_marker(self.marker_path, marker)
            self._failed = True  # (read by release's run, which comes after this one)

        return self._then(run)

    def release(self) -> Deferred[None]:
        """After the index row is written (commit) or instead of it (abort).
        Only the first call does anything: a later one must not remove the
        marker of whoever took the key since."""
        token, self.token = self.token, None
        if token is None:
            return succeed(None)

        def run() -> None:
            try:
                # A marker with an error stays (until the key's next owner
                # takes it away): a tail polling after the release still reads
                # why, instead of looking for an index row that will not come.
                if not self._failed:
                    remove_marker(self.marker_path)
            finally:
                self.locks._unlock(self.key, token)

        return self._then(run)


class KeyLocks:
    """The lock files of one store: ``<data_dir>/locks``."""

    def __init__(self, data_dir: str, in_io: InIO, ranges: bool = True) -> None:
        """Blocking (start-up: in each worker, never before a fork, since a
        byte-range lock belongs to the open file and a forked child would share it)."""
        self.dir = os.path.join(data_dir, "locks")
        self.in_io = in_io
        self._ranges: int | None = None  # the descriptor of RANGES_NAME
        self._mine: set[int] = set()  # the bytes this worker holds
        self._guard = threading.Lock()  # (the reactor, the SQLite and the I/O threads take locks)
        if ranges and _OFD_SETLK:
            os.makedirs(self.dir, exist_ok=True)
            self._ranges = os.open(os.path.join(self.dir, RANGES_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @property
    def ranged(self) -> bool:
        """Whether a key's lock is a byte of one file (``take_now`` can take it)."""
        return self._ranges is not None

    def close(self) -> None:
        fd, self._ranges = self._ranges, None
        if fd is not None:
            os.close(fd)  # (releases every byte still held)

    # -- a key's lock: brief and never waiting, on any thread ------------------

    def _lock(self, key: str) -> int | None:
        """The lock of ``key`` (a token for ``_unlock``), or None when another holds it."""
        fd = self._ranges
        if fd is None:
            return try_lock(paths(self.dir, key)[0])
        at = _offset(key)
        with self._guard:
            if at in self._mine:
                return None
            try:
                fcntl.fcntl(fd, _OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, at, 1, 0))
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    return None
                raise
            self._mine.add(at)
        return at

    def _unlock(self, key: str, token: int) -> None:
        fd = self._ranges
        if fd is None:
            release_lock(token, paths(self.dir, key)[0])
            return
        with self._guard:
            try:
                fcntl.fcntl(fd, _OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, token, 1, 0))
            finally:
                self._mine.discard(token)

    # -- the engine's side -------------------------------------------------------

    def acquire(self, key: str) -> Deferred[Held | None]:
        """Own the production of ``key`` (a Held), or None: another process does."""
        def run() -> Held | None:
            token = self._take(key)
            return None if token is None else Held(self, key, token)

        return self.in_io(run)

    def take(self, key: str) -> int | None:
        """Blocking, brief, never waits (the SQLite thread, beside the index
        read: ``Index.get_or_claim``): the token of ``key``'s lock, or None
        when another holds it or it could not be taken (the production's own
        ``acquire`` then tries again and says why). Make it a Held with
        ``held`` (on the reactor), or ``untake`` it."""
        try:
            return self._take(key)
        except OSError:
            return None

    def untake(self, key: str, token: int) -> None:
        """Let go of what ``take`` returned, unused."""
        self._unlock(key, token)

    def take_now(self, key: str) -> Held | None:
        """(``ranged`` only; on the reactor: one system call.) ``key``'s lock
        as a Held, or None when another worker holds it. A marker a dead owner
        left is removed by the Held's first file operation, before its own."""
        assert self._ranges is not None, "take_now needs byte-range locks"
        try:
            token = self._lock(key)
        except OSError:
            return None
        return None if token is None else Held(self, key, token, clear=True)

    def _take(self, key: str) -> int | None:
        token = self._lock(key)
        if token is None:
            return None
        try:
            # A marker left by an owner that died: nobody may follow it now.
            remove_marker(paths(self.dir, key)[1])
        except BaseException:
            self._unlock(key, token)
            raise
        return token

    def held(self, key: str, token: int) -> Held:
        """The Held of a token ``take`` returned."""
        return Held(self, key, token)

    def marker(self, key: str) -> Deferred[Marker | None]:
        return self.in_io(read_marker, paths(self.dir, key)[1])


def _offset(key: str) -> int:
    """``key``'s byte in RANGES_NAME: 62 bits of its hash (an off_t is signed)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                          "little") >> 2


class Ended(Exception):
    """The followed production ended; ``committed`` says how."""

    def __init__(self, committed: bool, why: str) -> None:
        super().__init__(why)
        self.committed = committed


class Tail:
    """Follows another process's production through its spool file.

    ``open()`` opens the spool (before its rename into cas/, so the descriptor
    keeps reading the same bytes after the commit); ``poll()`` returns how many
    bytes may be served now and raises ``Ended`` once the production is over:
    committed (serve the rest from the entry) or abandoned (abort the client).
    ``committed`` asks the index whether the key's row is there."""

    def __init__(self, locks: KeyLocks, key: str, marker: Marker, committed: Callable[[], Awaitable[bool]]) -> None:
        self.locks = locks
        self.key = key
        self.marker = marker
        self.committed = committed
        self.fd: int | None = None
        self.written = 0
        self._polling: Deferred[Any] | None = None

    def open(self) -> Deferred[None]:
        def run() -> None:
            self.fd = os.open(self.marker.spool, os.O_RDONLY | os.O_CLOEXEC)

        return self.locks.in_io(run)

    def read(self, offset: int, size: int) -> bytes:
        """Blocking (the I/O pool, or small reads): bytes the last poll said are there."""
        assert self.fd is not None, "tail not open"
        return os.pread(self.fd, min(size, self.written - offset), offset)

    def close(self) -> None:
        """Close the descriptor, once no poll's thread uses it any more (a
        cancelled poll's thread may still be running: a descriptor closed under
        it could be reused by another open before its ``fstat``)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        if self._polling is not None:
            self._polling.addBoth(lambda result: os.close(fd))
        else:
            os.close(fd)

    async def poll(self) -> int:
        locks, marker_path = self.locks, paths(self.locks.dir, self.key)[1]
        fd = self.fd
        assert fd is not None, "tail not open"

        def run() -> tuple[int, str, str | None]:
            size = os.fstat(fd).st_size
            current = read_marker(marker_path)
            if current is not None and current.flight == self.marker.flight:
                if current.error is not None:
                    return size, "failed", current.error
                probe = locks._lock(self.key)
                if probe is None:
                    return size, "running", None
                try:
                    # The lock is free. An owner that ends well removes its
                    # marker before it unlocks, so the owner may just have
                    # ended between our read and our probe: only a marker still
                    # there now that the lock is ours was left by one that died.
                    current = read_marker(marker_path)
                    if current is not None and current.flight == self.marker.flight:
                        if current.error is not None:
                            return size, "failed", current.error
                        remove_marker(marker_path)
                        return size, "dead", None
                finally:
                    locks._unlock(self.key, probe)
            # Measured again: the last writes may have landed after the first fstat
            # (the owner writes, commits, then removes the marker).
            return os.fstat(fd).st_size, "over", None

        # The thread keeps using the descriptor even if this poll is cancelled
        # (the daemon stopping): close() waits for it (see there).
        running = self._polling = self.locks.in_io(run)

        def done(result: Any) -> Any:
            self._polling = None
            return result

        running.addBoth(done)
        size, state, why = await shield(running)
        self.written = size
        if state == "failed":
            raise Ended(False, f"the production of {self.key} in pid {self.marker.pid} failed: {why}")
        if state == "dead":
            raise Ended(False, f"the worker producing {self.key} (pid {self.marker.pid}) died")
        if state == "over":
            if await self.committed():
                raise Ended(True, "committed")
            raise Ended(False, f"the production of {self.key} in pid {self.marker.pid} was abandoned")
        if self.marker.hold_last and self.marker.total is not None and size >= self.marker.total:
            return self.marker.total - 1
        return size

    async def follow(self, clock: Any, on_bytes: Callable[[int], None], interval: float = POLL_INTERVAL) -> bool:
        """Poll until the production ends, telling ``on_bytes`` each new high
        mark; True when it was committed. (A reader serving a client would
        poll at its own pace instead, under backpressure.)"""
        seen = 0
        while True:
            try:
                n = await self.poll()
            except Ended as e:
                if e.committed and self.written > seen:
                    on_bytes(self.written)
                return e.committed
            if n > seen:
                seen = n
                on_bytes(n)
            await deferLater(clock, interval, lambda: None)
