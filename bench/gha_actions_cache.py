#!/usr/bin/env python3
"""GitHub Actions cache: the real ``@actions/cache`` saving and restoring one
archive through sparkcache, v2 (one Azure-style PUT) and v1 (parallel 32 MiB
PATCH chunks, assembled at commit), timed end to end (tar and zstd included,
as a job step sees it) and the daemon's CPU seconds for the whole run.

Run from the checkout: ``PYTHONPATH=. python bench/gha_actions_cache.py
--size 256MiB --runs 3``. Needs node and @actions/cache (see tests/support/gha_client.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.daemon import Daemon  # noqa: E402
from tests.support.gha_client import ActionsCache  # noqa: E402

TOKEN = "bench-writer"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=parse_size, default=64 << 20, help="bytes of incompressible data (64MiB)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="gha-bench-") as tmp_name:
        tmp = Path(tmp_name)
        d = Daemon(tmp / "daemon", {"ci": {"type": "gha", "max_entry_size": "4GiB"}},
                   auth={"tokens": [{"name": "w", "token": TOKEN, "scopes": ["write"]}]}).start()
        try:
            print(f"{'proto':6} {'size':>8} {'save s':>8} {'restore s':>10} {'daemon CPU s':>13}")
            for proto in ("v2", "v1"):
                env = {"ACTIONS_CACHE_URL": d.url("/gha/ci/"), "ACTIONS_RESULTS_URL": d.url("/gha/ci/"),
                       "ACTIONS_RUNTIME_TOKEN": TOKEN}
                if proto == "v2":
                    env["ACTIONS_CACHE_SERVICE_V2"] = "true"
                ac = ActionsCache(tmp / proto, env)
                (ac.workspace / "data").mkdir()
                with open(ac.workspace / "data" / "blob.bin", "wb") as f:
                    f.write(os.urandom(args.size))
                saves, restores, cpus = [], [], []
                for i in range(args.runs):
                    cpu0 = cpu_seconds(d.pid)
                    t0 = time.monotonic()
                    out = ac.save(f"bench-{proto}-{i}", ["data"])
                    t1 = time.monotonic()
                    assert out.result["id"] not in (-1, None), out.stdout[-2000:]
                    shutil.move(str(ac.workspace / "data"), str(tmp / proto / "moved"))
                    t2 = time.monotonic()
                    got = ac.restore(f"bench-{proto}-{i}", ["data"])
                    t3 = time.monotonic()
                    assert got.result["matched"] == f"bench-{proto}-{i}"
                    shutil.rmtree(tmp / proto / "moved")
                    saves.append(t1 - t0)
                    restores.append(t3 - t2)
                    cpus.append(cpu_seconds(d.pid) - cpu0)
                print(f"{proto:6} {args.size >> 20:>6}Mi {statistics.median(saves):8.2f} "
                      f"{statistics.median(restores):10.2f} {statistics.median(cpus):13.2f}")
        finally:
            d.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
