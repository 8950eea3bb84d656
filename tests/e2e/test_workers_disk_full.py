"""A worker restarted while the data disk is full (root: a small tmpfs).

Its new process needs new prometheus_client sample files in
``<data_dir>/metrics``: without their blocks allocated (sparkcache/workers/
metricfiles.py) its first sample write faulted (SIGBUS) and every restart
died the same way; and opening the index wrote ``PRAGMA user_version``,
which a full disk refuses ("database or disk is full"). Now it starts and
serves, and ``/metrics`` (the aggregate of every worker's files) answers.
"""

from __future__ import annotations

import os
import signal

from tests.e2e.test_disk_full import fill, small_disk  # noqa: F401 (the fixture)
from tests.e2e.test_workers import _workers_seen


def test_a_worker_restarted_on_a_full_disk_starts_and_serves(small_disk):  # noqa: F811
    d = small_disk({}, size_mib=16, server={"workers": 2})
    workers = _workers_seen(d)
    filler = fill(d)
    os.kill(workers[1], signal.SIGKILL)
    again = _workers_seen(d, stale=frozenset({workers[1]}))
    assert again[0] == workers[0] and again[1] != workers[1]
    # Still up after its first answers (a fault comes at the first sample write).
    for _ in range(10):
        assert d.get("/metrics").status == 200
    assert _workers_seen(d, stale=frozenset({workers[1]})) == again
    log = d.log()
    assert "died (signal 7)" not in log and "could not start" not in log, d.log_tail()
    filler.unlink()
    assert d.get("/health").status == 200
    assert d.stop() == 0
