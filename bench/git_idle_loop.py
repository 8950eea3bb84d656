#!/usr/bin/env python3
"""Git scenario (d): the idle check loop with 1,000 or 10,000 registered repositories.

``--repos`` tiny bare repositories are served by ``git http-backend`` behind
nginx + fcgiwrap and registered in sparkcache's config (``git.repos``) with
the default 30 s ``fetch_interval`` and ``--max-rate`` (``git.max_upstream_rate``,
default 20) ref checks a second per forge host. Every mirror is put on disk
first, as an earlier run leaves them (a copy of one ``git clone --mirror``:
they all hold the same history as their upstreams), then every repository
is served once through the cache (``GET info/refs``), which makes every one
"recently served": the worst case, where each one wants a check every
``fetch_interval``. After one loop period of warm-up the daemon's CPU (its
cpuacct cgroup: the reactor, the pygit2 pool, any child) and the upstream's
requests (nginx's access log) are measured over ``--periods`` loop periods in
which nothing changes upstream. Goals: < 5 % of one core, and upstream ref
checks a second at most the cap.
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


def seed_mirrors(root: Path, data_dir: Path, repos: dict[str, str]) -> None:
    """One ``git clone --mirror`` copied to where the daemon keeps each repository's mirror."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sparkcache.git.config import GitConfig
    from sparkcache.git.registry import Registration, Registry

    first = next(iter(repos))
    template = root.parent / "mirror-template.git"
    git("clone", "-q", "--mirror", str(root / f"{first}.git"), str(template))
    reg = Registry(GitConfig(), str(data_dir / "git"))
    for name, url in repos.items():
        shutil.copytree(template, reg.path_for(Registration(name, url, "config")), symlinks=True)


def main() -> int:
    p = base_parser(__doc__ or NAME, "(100 repos, 10 s interval, 2 periods)")
    p.add_argument("--repos", type=int, default=None, help="registered repositories (default 1000)")
    p.add_argument("--interval", type=float, default=None, help="fetch_interval in seconds (default 30)")
    p.add_argument("--periods", type=int, default=None, help="loop periods measured (default 3)")
    p.add_argument("--max-rate", type=float, default=20.0, help="git.max_upstream_rate (default 20/s)")
    p.add_argument("--no-serve", action="store_true",
                   help="skip serving every repository once (faster set-up: the mirrors then start idle, and the "
                        "window sees their first checks)")
    args = p.parse_args()
    apply_quick(args, {"repos": 100, "interval": 10.0, "periods": 2}, {"repos": 1000, "interval": 30.0, "periods": 3})

    with Bench(NAME, args) as b:
        root = b.path("repos")
        root.mkdir()
        b.log(f"creating {args.repos} tiny bare repositories")
        names = make_repos(root, args.repos)
        up = HttpBackend(b, root, fcgi_children=8).start()
        access = AccessLog(up.nginx.dir / "access.log")
        repos = {n: up.url(f"{n}.git") for n in names}
        daemon = GitDaemon(b, {"repos": repos, "fetch_interval": f"{args.interval:g}s",
                               "max_upstream_rate": args.max_rate})
        b.log("putting every mirror on disk, as a previous run leaves them")
        seed_mirrors(root, daemon.data_dir, repos)
        daemon.start(timeout=120)

        if not args.no_serve:
            b.log("serving every repository once through sparkcache (each is then 'recently served')")
        t0 = time.monotonic()

        def discover(name: str) -> int:
            status, _h, _body = daemon.request("GET", f"/git/{name}/info/refs?service=git-upload-pack", timeout=120)
            return status

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(discover, [] if args.no_serve else names))
        bad = [n for n, s in zip(names, statuses) if s != 200]  # zip: none with --no-serve
        if bad:
            raise BenchError(f"{len(bad)} repositories could not be served, e.g. {bad[:5]}")
        b.log(f"{len(statuses)} repositories served in {time.monotonic() - t0:.0f}s; one loop period of warm-up")
        time.sleep(args.interval)
        wait_for_quiet(30, log=b.log)

        access.mark()
        c0, t0 = daemon.cpu(), time.monotonic()
        window = args.interval * args.periods
        time.sleep(window)
        cpu, elapsed = daemon.cpu() - c0, time.monotonic() - t0
        lines = access.new_lines()
        discoveries = sum(1 for line in lines if "info/refs" in line["uri"])
        ls_refs = sum(1 for line in lines if line["uri"].endswith("/git-upload-pack"))
        checks = discoveries + ls_refs
        connections = len({line["connection"] for line in lines})
        rate = checks / elapsed
        percent = 100.0 * cpu / elapsed
        b.log(f"daemon CPU {cpu:.2f}s over {elapsed:.0f}s = {percent:.1f}% of one core; {checks} upstream ref "
              f"checks ({discoveries} info/refs, {ls_refs} ls-refs) = {rate:.1f}/s on {connections} connection(s)")
        if checks == 0:
            b.notes.append("no upstream ref check in the window: the loop did not run")
        summary = [
            summary_row(f"idle check loop, {len(names)} repos, {args.interval:g}s interval", "% of a core",
                        percent, "", None, f"< {GOAL:g} %", percent < GOAL),
            summary_row("upstream ref checks a second (one forge host)", "/s", rate, "", None,
                        f"<= {args.max_rate:g}", rate <= args.max_rate * 1.02),
            summary_row("upstream connections in the window", "", connections, "", None, "-", None),
        ]
        print_summary(f"{NAME} summary", summary)
        daemon.stop()
        b.write_results({
            "params": {"repos": args.repos, "fetch_interval_s": args.interval, "periods": args.periods,
                       "served_first": not args.no_serve,
                       "max_upstream_rate": args.max_rate},
            "daemon_cpu_s": cpu,
            "window_s": elapsed,
            "upstream_requests": len(lines),
            "upstream_ref_discoveries": discoveries,
            "upstream_ls_refs": ls_refs,
            "upstream_checks_per_s": rate,
            "upstream_connections": connections,
            "summary": summary,
            "checks": {"daemon_exit_status": daemon.exit_status, "daemon_log_problems": daemon.log_problems()[:20]},
        })
    return 0


if __name__ == "__main__":
    run_main(main)
