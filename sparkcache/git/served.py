"""When each mirror was last served, and when the loop checks it next, across workers.

The check loop runs in the primary worker and adapts each mirror's interval to
when it was last served (``rates.interval_for``): served within the hour, every
``fetch_interval``; idle, backing off towards ``max_interval``. A clone or
fetch served by another worker reaches the loop through a *served stamp*:

- ``git/locks/<mirror>.served`` (JSON: the time), written by the serving
  worker at most once per ``fetch_interval`` per mirror: an in-memory "last
  written" per mirror keeps a serve to one dict lookup, and the write itself
  is a pool job. Then the mirror's slot and the global counter of
  ``git/served.changes`` (a ``store.changes.ChangeCounters`` file, mapped in
  every worker) are bumped.
- A worker whose fetch (or clone) changed a mirror's refs bumps the same
  counters after writing its fetch record (``shared.FetchRecord.changed``):
  a change is the other input of the interval, and a clone in one process
  touches the loop too.
- The primary looks at the global counter every second (a memory read). When
  it moved (or the loop learned a mirror since), it reads the stamps and the
  fetch records of the mirrors whose slot moved, in one pool job, and
  ``Scheduler.touch``-es those served or changed since it last knew: a serve
  in any worker puts the mirror's next check at most about
  ``fetch_interval`` (plus the second of that look) away, as a serve in the
  primary does, and the loop's next reschedule computes the interval from
  the newest serve and change of all workers.

The other way round, the primary writes each mirror's interval and next check
(``git/locks/<mirror>.next``) whenever its loop reschedules or touches it, so
``GET /repos`` in any worker shows the loop's own times.

Writes are coalesced: one pool job at a time writes everything noted since the
previous one, so a mirror's files are written in order, the newest last. With
``workers: 1`` none of this exists (``Mirrors.stamps`` is None).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from sparkcache.git.interfaces import MirrorUnavailable
from sparkcache.git.shared import LOCKS_DIR, RunInPool, read_record, record_path, write_json
from sparkcache.store.changes import ChangeCounters, slot_of

log = Logger()
COUNTERS = "served.changes"


@dataclass(frozen=True)
class Scheduled:
    """The primary's loop: a mirror's current check interval and when it is due."""

    interval: float
    due: float


Shared = tuple[float | None, Scheduled | None]  # (newest served stamp, the loop's schedule)
Found = tuple[float | None, float | None]        # (newest served stamp, last change by a fetch)


def _read(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # missing (never served), or unreadable: as if missing
        return None


def read_served(path: str) -> float | None:
    """Blocking."""
    data = _read(path)
    try:
        return float(data["at"]) if data is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def read_scheduled(path: str) -> Scheduled | None:
    """Blocking."""
    data = _read(path)
    try:
        return Scheduled(float(data["interval"]), float(data["due"])) if data is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def _key(mirror_path: str) -> str:
    # Mirror directory names are unique (a hash of name and URL, registry.path_for).
    return os.path.basename(mirror_path.rstrip("/"))


class ServedStamps:
    """The served stamps and the loop's schedule of every mirror under ``<git_dir>/locks``."""

    def __init__(self, git_dir: str, run: RunInPool, every: Callable[[], float]) -> None:
        """Blocking (start-up): creates the locks folder and ``served.changes``.
        ``every``: the least time between two stamps of one mirror by this worker
        (``git.fetch_interval``, read at each serve: a reload may change it)."""
        self.dir = os.path.join(git_dir, LOCKS_DIR)
        os.makedirs(self.dir, exist_ok=True)
        self.run = run
        self.every = every
        self._counters = ChangeCounters(os.path.join(git_dir, COUNTERS))
        self._written: dict[str, float] = {}    # mirror path -> our last stamp (noted)
        self._served: dict[str, float] = {}     # noted, not written yet
        self._next: dict[str, Scheduled] = {}   # the same for the loop's schedule
        self._flushing: Deferred[Any] | None = None
        self._error: str | None = None
        # What collect() has read: the global counter (None: nothing yet, so every
        # stamp), each slot; mirrors new here since (read whatever their slot says).
        self._seen: int | None = None
        self._slots: dict[int, int] = {}
        self._new: set[str] = set()
        self.stamps = 0  # stamp files written (tests)

    def path(self, mirror_path: str, kind: str) -> str:
        return os.path.join(self.dir, f"{_key(mirror_path)}.{kind}")

    # -- writing (every worker: stamps; the primary: the schedule) ---------------------

    def note(self, mirror_path: str, now: float) -> None:
        """A serve of the mirror (the hot path): stamped when our last stamp of it is
        ``every`` old or more, else nothing but a dict lookup."""
        last = self._written.get(mirror_path)
        if last is not None and now - last < self.every():
            return
        self._written[mirror_path] = now
        self._served[mirror_path] = now
        self._flush()

    def schedule(self, items: Iterable[tuple[str, float, float]]) -> None:
        """The loop's (mirror path, interval, due) of some mirrors, for the other workers."""
        for mirror_path, interval, due in items:
            self._next[mirror_path] = Scheduled(interval, due)
        self._flush()

    def _flush(self) -> None:
        if self._flushing is not None or not (self._served or self._next):
            return
        served, nexts = self._served, self._next
        self._served, self._next = {}, {}
        d = self._flushing = self.run(self._write_sync, served, nexts)
        d.addBoth(self._flushed)

    def _flushed(self, result: Any) -> None:
        self._flushing = None
        error = result.getErrorMessage() if isinstance(result, Failure) else None
        if isinstance(result, Failure) and result.check(MirrorUnavailable):
            error = self._error  # the mirrors are stopping: nothing worth a line
        elif error is not None and error != self._error:
            # A full disk: one line, not one per serve. The stamps are hints (a lost
            # one costs at most a mirror checked at its idle interval for a while).
            log.warn("git: could not write served stamps: {why}", why=error)
        self._error = error
        self._flush()

    def _write_sync(self, served: dict[str, float], nexts: dict[str, Scheduled]) -> None:
        wrote = False
        for mirror_path, at in served.items():
            path = self.path(mirror_path, "served")
            old = read_served(path)
            if old is not None and old >= at:
                continue  # another worker stamped it later (its write got here first)
            write_json(path, {"at": at, "pid": os.getpid()})
            self._counters.bump(_key(mirror_path))
            self.stamps += 1
            wrote = True
        if wrote:
            self._counters.bump(None)  # after the files and the slots: see collect
        for mirror_path, s in nexts.items():
            write_json(self.path(mirror_path, "next"), asdict(s))

    def changed_sync(self, mirror_path: str) -> None:
        """Blocking (after a fetch record that says the refs changed): the primary reads it."""
        self._counters.bump(_key(mirror_path))
        self._counters.bump(None)

    # -- reading -----------------------------------------------------------------------

    def learn(self, mirror_path: str) -> None:
        """A mirror registered (or cloned) since the last ``collect``: its stamp is read
        at the next, even when its slot moved before this worker knew it."""
        self._new.add(mirror_path)

    def changed(self) -> bool:
        """Whether ``collect`` may find something new (memory reads only)."""
        return self._seen is None or bool(self._new) or self._counters.stamp("")[0] != self._seen

    def collect(self, mirror_paths: list[str]) -> Deferred[dict[str, Found]]:
        """Mirror path -> (its stamp, its last change), for the mirrors among
        ``mirror_paths`` stamped or changed (by any worker) since the last collect,
        and the new ones (one pool job)."""
        slots, new = dict(self._slots), set(self._new)
        everything = self._seen is None

        def job() -> tuple[int, dict[int, int], dict[str, Found]]:
            # The global counter first: a stamp written while we read the slots
            # moves it again, so the next look reads that slot again.
            value = self._counters.stamp("")[0]
            by_slot: dict[int, list[str]] = {}
            for p in mirror_paths:
                by_slot.setdefault(slot_of(_key(p)), []).append(p)
            moved: dict[int, int] = {}
            found: dict[str, Found] = {}
            for slot, paths in by_slot.items():
                v = self._counters.stamp(_key(paths[0]))[1]
                if v != slots.get(slot, 0):
                    moved[slot] = v
                for p in paths:
                    if everything or v != slots.get(slot, 0) or p in new:
                        at = read_served(self.path(p, "served"))
                        record = read_record(record_path(self.dir, p))
                        changed = record.changed if record is not None else None
                        if at is not None or changed is not None:
                            found[p] = (at, changed)
            return value, moved, found

        def done(result: tuple[int, dict[int, int], dict[str, Found]]) -> dict[str, Found]:
            value, moved, found = result
            self._seen = value
            self._slots.update(moved)
            self._new -= new
            return found

        return self.run(job).addCallback(done)

    def read_sync(self, mirror_paths: list[str]) -> list[Shared]:
        """Blocking: each mirror's newest stamp and the loop's schedule (GET /repos)."""
        return [(read_served(self.path(p, "served")), read_scheduled(self.path(p, "next"))) for p in mirror_paths]

    def close(self) -> None:
        self._counters.close()
