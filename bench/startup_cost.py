"""CPU time and peak RSS of one daemon process from start to ready.

    python bench/startup_cost.py [--runs 9] [--config etc/cache.yaml] [--tree DIR ...]

For each source tree (default: this checkout; give a second one, e.g. an
older commit's ``git archive``, to compare), builds the daemon from the
config with its ``git:`` section removed ("nogit") and as given ("git"),
starts it on 127.0.0.1:0 with ``workers: 1`` and a fresh data dir, and exits
the moment ``ready`` fires, under ``/usr/bin/time -v``: user+system CPU and
maximum RSS. Runs of the trees and configs are interleaved; medians and
ranges are printed. CPU time and RSS, not wall time: no bench lock needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

START_READY = r"""
import os, sys
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from sparkcache.protocols import load_config
from sparkcache.service import SparkcacheService

path = sys.argv[1]
svc = SparkcacheService(load_config(path, environ={}), reactor, config_path=path, environ={})

async def main():
    svc.startService()
    await svc.ready
    os._exit(0)

reactor.callWhenRunning(lambda: ensureDeferred(main()))
reactor.run()
"""


def one_run(tree: Path, config: Path, data_dir: Path) -> tuple[float, int]:
    shutil.rmtree(data_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKCACHE_")}
    env["PYTHONPATH"] = str(tree)
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", START_READY, str(config)],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=data_dir.parent)  # not a checkout: "-c" puts the cwd first on sys.path
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: the daemon did not start:\n{proc.stderr[-3000:]}")
    fields = dict(line.strip().split(": ", 1) for line in proc.stderr.splitlines() if ": " in line)
    cpu = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
    return cpu, int(fields["Maximum resident set size (kbytes)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--config", type=Path, default=ROOT / "etc" / "cache.yaml")
    ap.add_argument("--tree", type=Path, action="append", help="source tree(s) to compare (default: this one)")
    args = ap.parse_args()
    trees = args.tree or [ROOT]
    base = yaml.safe_load(args.config.read_text())
    work = Path(tempfile.mkdtemp(prefix="sparkbench-startup-"))
    try:
        configs = {}
        for name in ("nogit", "git"):
            cfg = dict(base)
            if name == "nogit":
                cfg.pop("git", None)
            cfg["storage"] = {**base.get("storage", {}), "data_dir": str(work / "data")}
            cfg["server"] = {**base.get("server", {}), "listen": ["tcp:0:interface=127.0.0.1"], "workers": 1}
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            configs[name] = path
        for tree in trees:  # byte-compiled first, as an installed package is
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "sparkcache")],
                           check=True, capture_output=True)
        results: dict[tuple[Path, str], list[tuple[float, int]]] = {}
        for _ in range(args.runs):
            for tree in trees:
                for name, path in configs.items():
                    results.setdefault((tree, name), []).append(one_run(tree, path, work / "data"))
        print(f"{'tree':40}  {'config':6}  {'CPU s median (range)':22}  peak RSS MiB median")
        for (tree, name), runs in results.items():
            cpus, rss = [c for c, _ in runs], [r for _, r in runs]
            print(f"{str(tree)[-40:]:40}  {name:6}  {statistics.median(cpus):.3f} ({min(cpus):.2f}-{max(cpus):.2f})"
                  f"      {statistics.median(rss) / 1024:.1f}")
        print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
