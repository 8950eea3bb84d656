"""A worker's prometheus_client sample files on a full disk (sparkcache/workers/metricfiles.py).

A small tmpfs (root: ``mount -t tmpfs``) is filled by another writer, then a
process like a worker (PROMETHEUS_MULTIPROC_DIR there, ``install()`` first)
writes thousands of new series, so its file must grow, and a metric of a new
kind, so a new file is needed. prometheus_client alone dies of SIGBUS there;
with ``install()`` the process lives on, and once the filler is gone the
series are in the aggregate ``/metrics`` renders.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry, multiprocess

from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
SERIES = 3000  # about 100 bytes each: the 64 KiB file must grow three times

WORKER = textwrap.dedent("""
    import os, sys
    folder, filler, patched = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    if patched:
        from sparkcache.workers import metricfiles
        metricfiles.install()
        metricfiles.RETRY = 0.0  # every write after the filler is gone may find the room
    from prometheus_client import Counter, Gauge
    from twisted.logger import globalLogBeginner, textFileLogObserver
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    def fill():
        # Another writer takes every free page (a failed fallocate on tmpfs allocates nothing).
        fd = os.open(filler, os.O_RDWR | os.O_CREAT, 0o600)
        size = 1 << 20
        while size >= 512:
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, size)
            except OSError:
                size //= 2
        os.close(fd)

    requests = Counter("requests", "requests", ["series"])
    requests.labels(series="before").inc()  # the file exists, allocated, before the disk fills
    fill()
    names = [f"series-{i:05d}-" + "x" * 60 for i in range({series})]
    for name in names:
        requests.labels(series=name).inc()
    live = Gauge("live", "a gauge of a kind with no file yet", multiprocess_mode="livesum")
    live.set(7)
    held = Gauge("held", "set while the disk is full, never again", multiprocess_mode="livesum")
    held.set(3)
    print("survived the full disk", flush=True)
    os.unlink(filler)
    for name in names:
        requests.labels(series=name).inc()
    live.set(8)
    print("done", flush=True)
""").replace("{series}", str(SERIES))


def _mount_or_skip(path: Path, size: str) -> None:
    why = None
    if os.geteuid() != 0:
        why = "mounting a small tmpfs needs root"
    else:
        require_tool("mount")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            why = f"mount -t tmpfs not permitted here: {proc.stderr.strip()}"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sc-metrics-"))
    _mount_or_skip(path, "1m")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], check=False)
        os.rmdir(path)


def _run(folder: Path, patched: bool) -> subprocess.CompletedProcess[str]:
    (folder / "m").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [str(folder / "m"), str(folder / "filler"), "1" if patched else "0"]
    return subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True, env=env, timeout=120)


def _aggregate(folder: Path) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    return {(s.name, s.labels.get("series", "")): s.value for family in registry.collect() for s in family.samples}


def test_prometheus_client_alone_dies_of_sigbus_on_a_full_tmpfs(small_tmpfs: Path) -> None:
    """The failure the allocation prevents: the test below can fail."""
    proc = _run(small_tmpfs, patched=False)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stdout, proc.stderr)
    assert "survived" not in proc.stdout


def test_a_worker_survives_new_series_on_a_full_tmpfs(small_tmpfs: Path) -> None:
    proc = _run(small_tmpfs, patched=True)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.split() == "survived the full disk done".split()
    assert "metrics: no room for counter_" in proc.stderr and "has room again" in proc.stderr, proc.stderr
    values = _aggregate(small_tmpfs / "m")
    # Every series reached the file once the disk had room, with its whole count.
    assert values[("requests_total", "before")] == 1
    counted = {k[1]: v for k, v in values.items() if k[0] == "requests_total" and k[1].startswith("series-")}
    assert len(counted) == SERIES and set(counted.values()) == {2.0}
    assert values[("live", "")] == 8
    assert values[("held", "")] == 3  # placed by the next write to its file
    # No half-made file was left for the collector to trip on.
    assert all(name.endswith(".db") for name in os.listdir(small_tmpfs / "m"))
