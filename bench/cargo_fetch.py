#!/usr/bin/env python3
"""cargo fetch of a generated project, through sparkcache (``type: cargo``) and straight from the upstream.

``--crates`` small crates (default 150) are generated, packaged by the real
``cargo package`` (one workspace, offline), and published as a sparse
registry on a local upstream on 127.0.0.1: an nginx of the benchmark's own
serving the files from disk (``--upstream nginx``, the default; requests
counted from its access log), or tests/support's threaded Python server
(``--upstream python``, slower: a kinder reference for the cache). Crate *i* depends on crates *i-1* and
*i/3*; the project depends on the last ten, so ``cargo fetch`` resolves and
downloads all of them. The upstream plays crates.io (mirror mode,
``replace-with``), as on a CI machine.

Every run uses a fresh, empty CARGO_HOME (a new CI machine) and the same
Cargo.lock (written by the first run):

* *direct*: cargo against the upstream's index itself;
* *cold*: through the cache, its storage emptied and the daemon restarted;
* *warm*: through the cache again, index files fresh (``mutable_ttl: 5m``);
* *revalidating*: through a second remote whose index files are always
  stale (``mutable_ttl: 0s``): every index file is revalidated upstream
  (304s), no crate is downloaded again.

Reported: wall time of ``cargo fetch`` (median of ``--runs``), upstream
requests per run (warm: 0; revalidating: only conditional index requests),
the cache's CPU seconds per run, and its peak RSS (VmHWM) at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (REPO, AccessLog, Bench, BenchError, Daemon, Nginx, apply_quick, base_parser, cpu_seconds,
                    fmt_size, free_port, median, print_summary, print_table, run_main, static_server, summary_row)

sys.path.insert(0, str(REPO))
from tests.support.cargo_registry import (  # noqa: E402
    Crate, CrateSpec, Toolchain, clean_env, mirror_config, package_crates, publish, write_config, write_project,
    write_registry,
)
from tests.support.upstream import Upstream  # noqa: E402

NAME = "cargo_fetch"
RSS_GOAL = 150 << 20


def toolchain() -> Toolchain:
    rustc = shutil.which("rustc")
    if rustc is None or shutil.which("cargo") is None:
        raise BenchError("cargo and rustc are needed (rustup's stable toolchain: Debian's cargo is too old)")
    sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, timeout=60).stdout.strip()
    bin_dir = str(Path(sysroot) / "bin")
    out = subprocess.run([str(Path(bin_dir) / "cargo"), "--version"], capture_output=True, text=True, timeout=60,
                         env=clean_env(bin_dir)).stdout
    parts = out.split()[1].split(".") if len(out.split()) > 1 else ["0", "0"]
    version = (int(parts[0]), int(parts[1]))
    if version < (1, 68):
        raise BenchError(f"{out.strip()} has no sparse registries (1.68 or later needed)")
    return Toolchain(str(Path(bin_dir) / "cargo"), bin_dir, version)


def specs(n: int) -> list[CrateSpec]:
    out = []
    for i in range(n):
        deps = {f"benchcrate{j:04d}": "1" for j in sorted({i - 1, i // 3} - {i}) if j >= 0}
        body = "".join(f"pub use benchcrate{j:04d} as dep{k};\n" for k, j in enumerate(
            sorted({i - 1, i // 3} - {i})) if j >= 0) + f"pub fn id() -> u32 {{ {i} }}\n"
        out.append(CrateSpec(f"benchcrate{i:04d}", f"1.0.{i % 7}", deps, body))
    return out


class Origin:
    """The upstream registry, and what was asked of it since ``mark()``: [(path, status)]."""

    def __init__(self, bench: Bench, kind: str, crates: list[Crate]) -> None:
        self.kind = kind
        if kind == "python":
            self.py = Upstream().start()
            bench.on_cleanup(self.py.stop)
            publish(self.py, crates)
            self.base_url = self.py.base_url
            self._seen = 0
        else:
            port = free_port()
            self.base_url = f"http://127.0.0.1:{port}"
            root = bench.path("registry")
            write_registry(root, crates, self.base_url)
            nginx = Nginx(bench, "upstream", [static_server(port, root, "access.log")]).start()
            self.log = AccessLog(nginx.dir / "access.log")

    def mark(self) -> None:
        if self.kind == "python":
            self._seen = len(self.py.requests)
        else:
            self.log.mark()

    def seen(self) -> list[tuple[str, int]]:
        if self.kind == "python":
            return [(r.path, r.status or 0) for r in self.py.requests[self._seen:]]
        return [(line["uri"], line["status"]) for line in self.log.settle()]


class Runner:
    def __init__(self, bench: Bench, tools: Toolchain, project: Path, origin: Origin) -> None:
        self.bench, self.tools, self.project, self.origin = bench, tools, project, origin
        self.n = 0

    def fetch(self, index_url: str, daemon: Daemon | None) -> dict[str, Any]:
        """One ``cargo fetch`` with a fresh CARGO_HOME; wall, upstream requests, cache CPU."""
        self.n += 1
        home = self.bench.path(f"cargo-home-{self.n}")
        write_config(home, mirror_config(index_url))
        env = clean_env(self.tools.bin_dir, home, self.bench.path(f"user-home-{self.n}"))
        self.bench.path(f"user-home-{self.n}").mkdir(exist_ok=True)
        self.origin.mark()
        before_cpu = cpu_seconds([daemon.pid]) if daemon else 0.0
        t0 = time.monotonic()
        proc = subprocess.run([self.tools.cargo, "fetch"], cwd=self.project, env=env, capture_output=True, text=True,
                              timeout=900, stdin=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise BenchError(f"cargo fetch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        if daemon:
            daemon.wait_idle()
        reqs = self.origin.seen()
        shutil.rmtree(home, ignore_errors=True)
        return {
            "wall_s": round(wall, 3),
            "upstream_requests": len(reqs),
            "upstream_304": sum(1 for _path, status in reqs if status == 304),
            "upstream_crate_downloads": sum(1 for path, _status in reqs if path.startswith("/dl/")),
            "cache_cpu_s": round(cpu_seconds([daemon.pid]) - before_cpu, 3) if daemon else None,
        }


def main() -> int:
    p = base_parser(__doc__.split("\n")[0], "30 crates, 1 run")
    p.add_argument("--crates", type=int, default=None, help="how many crates to generate")
    p.add_argument("--runs", type=int, default=None, help="runs of each kind (medians reported)")
    p.add_argument("--upstream", choices=("nginx", "python"), default="nginx", help="what serves the registry")
    args = p.parse_args()
    apply_quick(args, {"crates": 30, "runs": 1}, {"crates": 150, "runs": 3})
    tools = toolchain()
    with Bench(NAME, args) as bench:
        bench.log(f"packaging {args.crates} crates with {tools.cargo}")
        t0 = time.monotonic()
        crates = package_crates(tools, bench.path("src"), specs(args.crates))
        bench.log(f"packaged in {time.monotonic() - t0:.1f}s ({fmt_size(sum(len(c.data) for c in crates))})")
        upstream = Origin(bench, args.upstream, crates)
        project = write_project(bench.path("app"), {c.spec.name: "1" for c in crates[-10:]})
        index = upstream.base_url + "/index/"
        daemon = Daemon(bench, {
            "crates": {"type": "cargo", "upstream": upstream.base_url + "/index"},
            "crates-reval": {"type": "cargo", "upstream": upstream.base_url + "/index", "cache": {"mutable_ttl": "0s"}},
        }).start()
        run = Runner(bench, tools, project, upstream)
        run.fetch(index, None)  # writes Cargo.lock; not counted
        results: dict[str, list[dict[str, Any]]] = {"direct": [], "cold": [], "warm": [], "revalidating": []}
        for i in range(args.runs):
            results["direct"].append(run.fetch(index, None))
            daemon.fresh_start()
            results["cold"].append(run.fetch(daemon.url("/cargo/crates/index/"), daemon))
            results["warm"].append(run.fetch(daemon.url("/cargo/crates/index/"), daemon))
            run.fetch(daemon.url("/cargo/crates-reval/index/"), daemon)  # fills the second remote (emptied too)
            results["revalidating"].append(run.fetch(daemon.url("/cargo/crates-reval/index/"), daemon))
            bench.log(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.2f}s/{v[-1]['upstream_requests']} req"
                                                   for k, v in results.items()))
        status = daemon.proc_status()
        problems = daemon.log_problems()

        def med(kind: str, key: str) -> float:
            return median(r[key] for r in results[kind])

        direct = med("direct", "wall_s")
        print_table(f"cargo fetch of {args.crates} crates from a {args.upstream} upstream, fresh CARGO_HOME each run "
                    f"(medians of {args.runs})",
                    ["kind", "via", "wall s", "vs direct", "upstream req", "of them 304", "crate downloads",
                     "cache CPU s"], left=2, rows=[
                        [k, "upstream" if k == "direct" else "sparkcache", med(k, "wall_s"),
                         f"{med(k, 'wall_s') / direct:.2f}x", med(k, "upstream_requests"),
                         med(k, "upstream_304"), med(k, "upstream_crate_downloads"),
                         "-" if k == "direct" else med(k, "cache_cpu_s")]
                        for k in results])
        rows = [
            # No goal: a loopback nginx is the best an upstream can be; a real one is far slower.
            summary_row("warm fetch wall", "s", med("warm", "wall_s"), "direct", direct, "informational", None),
            summary_row("cold fetch wall", "s", med("cold", "wall_s"), "direct", direct, "informational", None),
            summary_row("warm upstream requests", "", med("warm", "upstream_requests"), "", None, "0",
                        med("warm", "upstream_requests") == 0),
            summary_row("revalidating: upstream requests other than 304s", "",
                        med("revalidating", "upstream_requests") - med("revalidating", "upstream_304"),
                        "", None, "0", med("revalidating", "upstream_requests") == med("revalidating", "upstream_304")),
            summary_row("cache peak RSS (VmHWM)", "MiB", round(status["VmHWM"] / (1 << 20), 1), "", None,
                        "<= 150 MiB", status["VmHWM"] <= RSS_GOAL),
        ]
        print_summary("cargo_fetch", rows)
        if problems:
            print(f"\n{len(problems)} log lines look like problems, e.g.:\n  " + "\n  ".join(problems[:5]))
        bench.write_results({"crates": args.crates, "runs": args.runs, "upstream": args.upstream, "cargo": tools.version,
                             "results": results, "cache_proc_status": status, "summary": rows,
                             "log_problems": problems[:20]})
    return 0


if __name__ == "__main__":
    run_main(main)
