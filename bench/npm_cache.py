#!/usr/bin/env python3
"""npm pull-through: sparkcache (``type: npm``) versus Verdaccio, side by side.

Both caches mirror the same upstream, the registry this machine's npm is
configured with (``npm config get registry``; its host is masked in
everything printed). The client installs one fixed ``package.json``: 36
dependencies at exact versions, two of them scoped (``@types/node``,
``@sindresorhus/is``), from tiny modules to typescript's 20 MiB tarball;
with their dependencies npm installs 70 packages:

    npm install --registry <cache> --userconfig <empty> --globalconfig <empty>
        --cache <empty dir> --prefer-online --no-audit --no-fund --ignore-scripts

in a fresh directory each time (no lock file: npm resolves every packument,
as a first install does). ``npm_config_*`` is removed from the environment.

Phases: *cold* (each cache emptied and restarted, one install), *warm* (cache
filled, npm's cache empty; median of ``--runs``), *warm x4* (4 installs
released together; median of ``--runs``). Per cache: wall time, CPU seconds
of the cache's process tree (/proc utime+stime before and after) and peak RSS
(VmHWM of the tree over the whole run). Every install is checked: the
direct dependencies at their pinned versions, the same tree through every
cache, and every tarball URL npm recorded pointing at the cache.

Verdaccio (``/usr/bin/verdaccio``): one uplink ``up`` = the upstream, every
package ``proxy: up, access: $all``, its defaults otherwise. Both caches keep
packuments fresh for ``--index-ttl`` (30 minutes: Verdaccio's uplink
``maxage``, sparkcache's ``cache.mutable_ttl``), so the warm phases measure
serving from the cache even when a busy machine stretches the run.

Goals (issue 9): warm wall <= 1.0x Verdaccio's; peak RSS <= 150 MiB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from common import LOOPBACK, Bench, BenchError, apply_quick, base_parser, run_main, tool
from registry_common import (CA_BUNDLE, add_phase_args, Server, SparkcacheServer, mask, npm_upstream, report,
                             run_matrix, scrubbed_env, write_results)

NAME = "npm_cache"

PACKAGE_JSON: dict[str, Any] = {
    "name": "sparkcache-bench-npm",
    "version": "1.0.0",
    "private": True,
    "dependencies": {
        "@sindresorhus/is": "7.0.1",
        "@types/node": "22.7.4",
        "ansi-regex": "6.1.0",
        "axios": "1.7.7",
        "bytes": "3.1.2",
        "chalk": "4.1.2",
        "classnames": "2.5.1",
        "clsx": "2.1.1",
        "commander": "12.1.0",
        "cookie": "0.6.0",
        "dayjs": "1.11.13",
        "debug": "4.3.7",
        "deepmerge": "4.3.1",
        "depd": "2.0.0",
        "dotenv": "16.4.5",
        "escape-html": "1.0.3",
        "eventemitter3": "5.0.1",
        "fast-deep-equal": "3.1.3",
        "immer": "10.1.1",
        "kleur": "4.1.5",
        "lodash": "4.17.21",
        "lru-cache": "11.0.1",
        "minimist": "1.2.8",
        "moment": "2.30.1",
        "nanoid": "5.0.7",
        "once": "1.4.0",
        "p-limit": "6.1.0",
        "picocolors": "1.1.0",
        "rxjs": "7.8.1",
        "semver": "7.6.3",
        "strip-ansi": "7.1.0",
        "tslib": "2.7.0",
        "typescript": "5.6.2",
        "uuid": "9.0.1",
        "yargs-parser": "21.1.1",
        "zod": "3.23.8",
    },
}


class Verdaccio(Server):
    name = "verdaccio"

    def __init__(self, bench: Bench, upstream: str, index_ttl: float) -> None:
        super().__init__(bench)
        self.upstream = upstream
        self.index_ttl = index_ttl
        out = subprocess.run([tool("verdaccio"), "--version"], capture_output=True, text=True, timeout=60)
        self.version = out.stdout.strip()

    def prepare(self) -> None:
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        pkg = {"access": "$all", "publish": "$authenticated", "proxy": "up"}
        conf = {
            "storage": str(data / "storage"),
            "auth": {"htpasswd": {"file": str(data / "htpasswd"), "max_users": -1}},
            "uplinks": {"up": {"url": self.upstream, "maxage": f"{int(self.index_ttl)}s"}},
            "packages": {"@*/*": pkg, "**": pkg},
            "web": {"enable": False},
            "log": {"type": "stdout", "format": "pretty", "level": "warn"},
        }
        (self.dir / "config.yaml").write_text(json.dumps(conf, indent=2) + "\n")  # JSON is YAML

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = scrubbed_env({"NODE_EXTRA_CA_CERTS": CA_BUNDLE} if os.path.exists(CA_BUNDLE) else {})
        return ([tool("verdaccio"), "--config", str(self.dir / "config.yaml"), "--listen", f"{LOOPBACK}:{self.port}"],
                env)

    def ready_path(self) -> str:
        return "/-/ping"

    def index_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"


def client_specs(bench: Bench, server: Server, n: int) -> list[tuple[list[str], Path, dict[str, str]]]:
    specs = []
    for i in range(n):
        cwd = bench.path("clients", f"{server.name}-{i}")
        shutil.rmtree(cwd, ignore_errors=True)
        (cwd / "project").mkdir(parents=True)
        (cwd / "project" / "package.json").write_text(json.dumps(PACKAGE_JSON, indent=2) + "\n")
        (cwd / "npmrc").write_text("")
        (cwd / "global-npmrc").write_text("")
        cmd = [tool("npm"), "install", "--prefix", str(cwd / "project"), "--registry", server.index_url(),
               "--userconfig", str(cwd / "npmrc"), "--globalconfig", str(cwd / "global-npmrc"),
               "--cache", str(cwd / "npm-cache"), "--prefer-online", "--no-audit", "--no-fund", "--ignore-scripts",
               "--update-notifier=false", "--loglevel=warn"]
        specs.append((cmd, cwd, scrubbed_env({"HOME": str(cwd)})))
    return specs


def check_install(server: Server, dirs: list[Path], seen: dict[str, Any]) -> dict[str, Any]:
    """Pinned direct dependencies, the same tree through every cache, tarballs fetched through the cache."""
    via = total = 0
    for d in dirs:
        lock = d / "project" / "node_modules" / ".package-lock.json"
        if not lock.exists():
            raise BenchError(f"{server.name}: npm left no node_modules/.package-lock.json in {d}")
        pkgs = json.loads(lock.read_text())["packages"]
        tree = sorted(f"{k.rsplit('node_modules/', 1)[1]}@{v['version']}" for k, v in pkgs.items() if k)
        for name, version in PACKAGE_JSON["dependencies"].items():
            got = pkgs.get(f"node_modules/{name}", {}).get("version")
            if got != version:
                raise BenchError(f"{server.name}: {name} installed at {got}, expected {version}")
        first = seen.setdefault("tree", tree)
        if tree != first:
            raise BenchError(f"{server.name}: installed tree differs from the first install's: "
                             f"{sorted(set(tree) ^ set(first))}")
        for k, v in pkgs.items():
            if k:
                total += 1
                via += str(v.get("resolved", "")).startswith(f"http://{LOOPBACK}:{server.port}/")
    if via != total:
        raise BenchError(f"{server.name}: only {via} of {total} tarball URLs point at the cache")
    return {"packages": total // max(1, len(dirs))}


def main() -> int:
    p = base_parser(__doc__ or NAME, "(1 run per warm phase)")
    add_phase_args(p)
    p.add_argument("--caches", default="sparkcache,verdaccio", help="subset of sparkcache,verdaccio")
    p.add_argument("--client-timeout", type=float, default=600.0, help="seconds allowed per client run")
    args = p.parse_args()
    apply_quick(args, {"runs": 1}, {"runs": 3})
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]

    with Bench(NAME, args) as b:
        upstream = npm_upstream()
        b.log(f"upstream (from npm's configuration): {mask(upstream)}")
        make = {"sparkcache": lambda: SparkcacheServer(b, "npm", upstream, "/npm/{remote}/", args.index_ttl),
                "verdaccio": lambda: Verdaccio(b, upstream, args.index_ttl)}
        servers = [make[c]() for c in caches]
        seen: dict[str, Any] = {}
        rounds = (args.runs, args.parallel_runs or args.runs)
        results = {"npm": run_matrix(b, "npm", servers, rounds, args.parallel, args.client_timeout,
                                     lambda s, n: client_specs(b, s, n), lambda s, dirs: check_install(s, dirs, seen))}
        for s in servers:
            s.stop()
        summary = report(b, NAME, f"{len(seen.get('tree', []))} packages ({len(PACKAGE_JSON['dependencies'])} pinned)",
                         rounds, ["npm"], servers, results, cpu_reference=None)
        write_results(b, {"package_json": PACKAGE_JSON, "tree": seen.get("tree"), "runs": args.runs,
                          "parallel": args.parallel, "parallel_runs": args.parallel_runs or args.runs,
                          "index_ttl": args.index_ttl, "clients": ["npm"], "upstream": mask(upstream)},
                      servers, results, summary, {})
    return 0


if __name__ == "__main__":
    run_main(main)
