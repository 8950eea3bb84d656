#!/usr/bin/env python3
"""Git scenario (d): idle fetch-loop CPU with 1000 registered repositories.

``--repos`` tiny bare repositories are served by ``git http-backend`` behind
nginx + fcgiwrap and registered in sparkcache's config (``git.repos``) with
the default 30 s ``fetch_interval``. Every mirror is created first (one ref
discovery through the cache each), then, after one loop period of warm-up,
the daemon's CPU (its cpuacct cgroup: the reactor, the pygit2 pool, any
child) is measured over ``--periods`` loop periods in which nothing changes
upstream. The upstream's access log shows that the loop really ran. Goal:
< 5 % of one core.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (AccessLog, Bench, BenchError, apply_quick, base_parser, print_summary, run_main, summary_row,
                    wait_for_quiet)
from git_common import GitDaemon, HttpBackend, git

NAME = "git_idle_loop"
GOAL = 5.0  # percent of one core


def make_repos(root: Path, n: int) -> list[str]:
    template = root / "template.git"
    git("init", "-q", "--bare", "-b", "main", str(template))
    blob = git("hash-object", "-w", "--stdin", cwd=template, input=b"tiny\n")
    tree = git("mktree", cwd=template, input=f"100644 blob {blob}\tREADME\n".encode())
    commit = git("commit-tree", tree, "-m", "initial", cwd=template)
    git("update-ref", "refs/heads/main", commit, cwd=template)
    names = [f"r{i:04d}" for i in range(n)]
    for name in names:
        shutil.copytree(template, root / f"{name}.git")
    shutil.rmtree(template)
    return names


def main() -> int:
    p = base_parser(__doc__ or NAME, "(100 repos, 10 s interval, 2 periods)")
    p.add_argument("--repos", type=int, default=None, help="registered repositories (default 1000)")
    p.add_argument("--interval", type=float, default=None, help="fetch_interval in seconds (default 30)")
    p.add_argument("--periods", type=int, default=None, help="loop periods measured (default 3)")
    args = p.parse_args()
    apply_quick(args, {"repos": 100, "interval": 10.0, "periods": 2}, {"repos": 1000, "interval": 30.0, "periods": 3})

    with Bench(NAME, args) as b:
        root = b.path("repos")
        root.mkdir()
        b.log(f"creating {args.repos} tiny bare repositories")
        names = make_repos(root, args.repos)
        up = HttpBackend(b, root, fcgi_children=8).start()
        access = AccessLog(up.nginx.dir / "access.log")
        daemon = GitDaemon(b, {"repos": {n: up.url(f"{n}.git") for n in names},
                               "fetch_interval": f"{args.interval:g}s"}).start(timeout=120)

        b.log("creating every mirror: one ref discovery through sparkcache per repository")
        t0 = time.monotonic()

        def discover(name: str) -> int:
            status, _h, _body = daemon.request("GET", f"/git/{name}/info/refs?service=git-upload-pack", timeout=120)
            return status

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(discover, names))
        bad = [n for n, s in zip(names, statuses) if s != 200]
        if bad:
            raise BenchError(f"{len(bad)} repositories could not be mirrored, e.g. {bad[:5]}")
        b.log(f"{len(names)} mirrors created in {time.monotonic() - t0:.0f}s; one loop period of warm-up")
        time.sleep(args.interval)
        wait_for_quiet(30, log=b.log)

        access.mark()
        c0, t0 = daemon.cpu(), time.monotonic()
        window = args.interval * args.periods
        time.sleep(window)
        cpu, elapsed = daemon.cpu() - c0, time.monotonic() - t0
        lines = access.new_lines()
        discoveries = sum(1 for line in lines if "info/refs" in line["uri"])
        percent = 100.0 * cpu / elapsed
        b.log(f"daemon CPU {cpu:.2f}s over {elapsed:.0f}s = {percent:.1f}% of one core; "
              f"{discoveries} upstream ref discoveries ({len(lines)} requests) in that window")
        if discoveries < len(names) * (args.periods - 1):
            b.notes.append(f"only {discoveries} upstream ref discoveries in {args.periods} periods of "
                           f"{len(names)} repos: the loop did not visit every repo every period")
        summary = [
            summary_row(f"idle fetch loop, {len(names)} repos, {args.interval:g}s interval", "% of a core",
                        percent, "", None, f"< {GOAL:g} %", percent < GOAL),
            summary_row("upstream ref discoveries per period", "", discoveries / args.periods, "", None, "-", None),
        ]
        print_summary(f"{NAME} summary", summary)
        daemon.stop()
        b.write_results({
            "params": {"repos": args.repos, "fetch_interval_s": args.interval, "periods": args.periods},
            "daemon_cpu_s": cpu,
            "window_s": elapsed,
            "upstream_requests": len(lines),
            "upstream_ref_discoveries": discoveries,
            "summary": summary,
            "checks": {"daemon_exit_status": daemon.exit_status, "daemon_log_problems": daemon.log_problems()[:20]},
        })
    return 0


if __name__ == "__main__":
    run_main(main)
