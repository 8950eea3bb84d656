"""SIGHUP (``systemctl reload``) while a worker is starting: the parent
forwards it to every worker, and a worker still importing would die of it
(SIGHUP's default action) and again at each restart; one that has read the
config before its handler was installed would miss the reload. Each worker
now catches it from its first lines, the parent skips one that does not
catch it yet (it reads the file as it starts), and one caught early is
reloaded once the service runs (docs/workers.rst)."""

from __future__ import annotations

import os
import signal
import time

from tests.e2e.test_workers import _workers_seen


def test_sighup_storm_while_a_worker_restarts_kills_none(daemon_factory):
    d = daemon_factory({}, server={"workers": 2})
    workers = _workers_seen(d)
    os.kill(workers[1], signal.SIGKILL)
    # SIGHUPs to the parent all along the restart (spawn, imports, config, store, listen).
    deadline = time.monotonic() + 90
    again: dict[int, int] = {}
    while time.monotonic() < deadline:
        d.signal(signal.SIGHUP)
        time.sleep(0.2)
        try:
            h = d.get("/health", timeout=5).json()
        except OSError:
            continue
        if h["pid"] != workers[1]:
            again[h["worker"]] = h["pid"]
        if len(again) == 2:
            break
    assert len(again) == 2, d.log_tail()
    log = d.log()
    assert "died (signal 1)" not in log, d.log_tail()
    assert again[0] == workers[0] and again[1] != workers[1]
