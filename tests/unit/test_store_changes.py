"""Change stamps shared by worker processes (sparkcache/store/changes.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sparkcache.store.changes import ChangeCounters, slot_of

BUMP = r"""
import sys
from sparkcache.store.changes import ChangeCounters
c = ChangeCounters(sys.argv[1])
for key in sys.argv[2:]:
    for _ in range(100):
        c.bump(None if key == "*" else key)
c.close()
"""


def _other_process(path: Path, *keys: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", BUMP, str(path), *keys], env=env)


def _other_key(key: str) -> str:
    n = 0
    while slot_of(f"k{n}") == slot_of(key):
        n += 1
    return f"k{n}"


def test_a_row_is_trusted_until_its_key_or_everything_changes(tmp_path: Path) -> None:
    path = tmp_path / "index.changes"
    a, b = ChangeCounters(str(path)), ChangeCounters(str(path))  # two workers
    key, other = "generic/r/x", _other_key("generic/r/x")
    stamp, other_stamp = a.stamp(key), a.stamp(other)
    assert a.valid(key, stamp)
    b.bump(other)  # another key replaced: this row stays trusted
    assert a.valid(key, stamp) and not a.valid(other, other_stamp)
    b.bump(key)
    assert not a.valid(key, stamp)
    stamp = a.stamp(key)
    b.bump(None)  # a purge of a remote or of everything
    assert not a.valid(key, stamp)
    a.close()
    b.close()


def test_bumps_from_other_processes_are_seen_and_none_lost(tmp_path: Path) -> None:
    path = tmp_path / "index.changes"
    mine = ChangeCounters(str(path))
    key = "oci/r/blobs/sha256:aa"
    before = mine.stamp(key)
    procs = [_other_process(path, key, "*") for _ in range(3)]
    for p in procs:
        assert p.wait(60) == 0
    g, s = mine.stamp(key)
    # Concurrent read-modify-writes under flock: every one of them counted.
    assert (g - before[0], s - before[1]) == (300, 300)
    mine.close()


def test_a_purge_in_another_worker_keeps_a_production_here_from_storing(tmp_path) -> None:
    """Purge epochs are shared through index.changes: a production whose epoch
    predates another worker's purge (whatever its scope) stores nothing; this
    worker's own scoped purges still spare other keys."""
    from twisted.internet import reactor

    from sparkcache.store import Store

    a, b = Store(str(tmp_path), reactor, max_size=1 << 30), Store(str(tmp_path), reactor, max_size=1 << 30)
    for s in (a, b):
        s.index.watch_changes()
    try:
        since = a.epoch()
        assert not a.purged_since(since, "r", "r:k")
        b._purged_remote["other"] = b._new_purge()  # b's purge_remote("other") begins
        assert a.epoch() == since + 1
        assert a.purged_since(since, "r", "r:k")
        mine = a.epoch()
        a._purged_remote["y"] = a._new_purge()  # a's own purge of another remote
        assert not a.purged_since(mine, "r", "r:k") and a.purged_since(mine, "y", "y:k")
        assert b.purged_since(mine, "r", "r:k")  # for b, a's purge is another worker's
    finally:
        for s in (a, b):
            assert s.index.changes is not None
            s.index.changes.close()


def test_the_native_view_reads_the_words_the_bumps_wrote(tmp_path: Path) -> None:
    """``valid`` reads the mapping through a native memoryview (the hit path);
    bumps write little-endian words with struct: both read the same values,
    and the file closes with the view exported."""
    import struct

    path = tmp_path / "index.changes"
    c = ChangeCounters(str(path))
    key = "generic/r/x"
    for _ in range(300):  # past one byte
        c.bump(key)
    c.bump(None)
    with open(path, "rb") as f:
        raw = f.read()
    words = struct.unpack_from("<QQ", raw, 0)[0], struct.unpack_from("<Q", raw, 8 * slot_of(key))[0]
    assert c.stamp(key) == words == (1, 300)
    assert c.valid(key, (1, 300)) and not c.valid(key, (1, 299)) and not c.valid(key, (0, 300))
    c.close()
