#!/usr/bin/env python3
"""Git scenario (b): 16 parallel server-only full fetches.

No git client: each of ``--clients`` processes does what a clone asks of the
server — protocol v2 ``ls-refs``, then one ``fetch`` of every ref with
``done`` — and reads the whole response, discarding it (so the client's
index-pack, which dominates a real clone, is out of the picture). All start
together; the wall time until the last one finishes and the CPU of each
server's process tree are compared: sparkcache (warm pack cache) vs
``git http-backend`` behind nginx + fcgiwrap. Goal: wall <= 0.5x.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from typing import Any

from common import (Bench, BenchError, apply_quick, base_parser, fmt_size, median, print_summary, print_table, ratio,
                    run_main, summary_row, wait_for_quiet)
from git_common import GitDaemon, HttpBackend, bench_repo, repo_args, v2_fetch_all

NAME = "git_parallel_fetch"
GOAL = 0.5


def _worker_init() -> None:
    # Forked workers inherit the Bench's signal handlers; Pool.terminate()
    # SIGTERMs them, which must simply end them.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _client(args: tuple[str, Any]) -> dict[str, Any]:
    url, barrier = args
    barrier.wait()
    try:
        return v2_fetch_all(url)
    except Exception as e:  # reported, not raised across the pool
        return {"error": repr(e)}


def herd(url: str, n: int) -> tuple[float, list[dict[str, Any]]]:
    """``n`` fetch processes released together; (wall seconds, results)."""
    ctx = mp.get_context("fork")
    manager = ctx.Manager()
    barrier = manager.Barrier(n + 1)
    with ctx.Pool(n, initializer=_worker_init) as pool:
        pending = pool.map_async(_client, [(url, barrier)] * n)
        barrier.wait()
        t0 = time.monotonic()
        results = pending.get(3600)
        wall = time.monotonic() - t0
    manager.shutdown()
    return wall, results


def main() -> int:
    p = base_parser(__doc__ or NAME, "(3,000 commits, 4 clients, 1 round)")
    repo_args(p)
    p.add_argument("--clients", type=int, default=None, help="parallel fetches (default 16)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per server (default 2)")
    args = p.parse_args()
    apply_quick(args, {"commits": 3000, "files": 300, "clients": 4, "rounds": 1},
                {"commits": 30000, "files": 3000, "clients": 16, "rounds": 2})

    with Bench(NAME, args) as b:
        repo_info, root = bench_repo(b, args)
        up = HttpBackend(b, root, fcgi_children=max(16, args.clients)).start()
        daemon = GitDaemon(b, {"repos": {"bench": up.url("bench.git")}, "fetch_interval": "1h"}).start()
        urls = {"http-backend": up.url("bench.git"), "sparkcache": daemon.git_url("bench")}
        cpu_of = {"http-backend": up.cpu, "sparkcache": daemon.cpu}

        b.log("warming: one fetch from each server (sparkcache: mirror clone + the pack computed once)")
        size = {}
        for who, url in urls.items():
            r = v2_fetch_all(url)
            size[who] = r["bytes"]
            b.log(f"{who}: {fmt_size(r['bytes'])} in {r['seconds']:.1f}s")
        hit = v2_fetch_all(urls["sparkcache"])
        if hit.get("x_cache") != "HIT":
            raise BenchError(f"second fetch through sparkcache was not a pack-cache hit: {hit}")

        wait_for_quiet(60, log=b.log)
        rows, runs = [], {"http-backend": [], "sparkcache": []}
        for i in range(args.rounds):
            for who in ("http-backend", "sparkcache"):
                c0 = cpu_of[who]()
                wall, results = herd(urls[who], args.clients)
                time.sleep(0.5)  # let the server's last process exit
                cpu = cpu_of[who]() - c0
                errors = [r["error"] for r in results if "error" in r]
                if errors:
                    raise BenchError(f"{who} round {i + 1}: {len(errors)} fetch(es) failed: {errors[:3]}")
                total = sum(r["bytes"] for r in results)
                runs[who].append({"wall_s": wall, "server_cpu_s": cpu, "bytes": total,
                                  "slowest_s": max(r["seconds"] for r in results)})
                rows.append([str(i + 1), who, f"{wall:.1f}", f"{cpu:.1f}", fmt_size(total),
                             f"{total / wall / 1e6:,.0f}"])
                b.log(f"round {i + 1} {who}: {args.clients} fetches in {wall:.1f}s, server CPU {cpu:.1f}s")
        print_table(f"{NAME}: {args.clients} parallel full fetches (v2 ls-refs + fetch, body discarded)",
                    ["round", "server", "wall s", "server CPU s", "bytes", "MB/s"], rows)
        s_wall = median(r["wall_s"] for r in runs["sparkcache"])
        u_wall = median(r["wall_s"] for r in runs["http-backend"])
        rat = ratio(s_wall, u_wall)
        summary = [
            summary_row(f"{args.clients} parallel fetches, wall, median", "s", s_wall, "http-backend", u_wall,
                        f"<= {GOAL}x", rat is not None and rat <= GOAL),
            summary_row("server CPU for the whole herd, median", "s",
                        median(r["server_cpu_s"] for r in runs["sparkcache"]), "http-backend",
                        median(r["server_cpu_s"] for r in runs["http-backend"]), "-", None),
        ]
        print_summary(f"{NAME} summary", summary)
        daemon.stop()
        b.write_results({
            "params": {"commits": args.commits, "files": args.files, "clients": args.clients, "rounds": args.rounds},
            "repository": repo_info,
            "response_bytes": size,
            "runs": runs,
            "summary": summary,
            "checks": {"daemon_exit_status": daemon.exit_status, "daemon_log_problems": daemon.log_problems()[:20]},
        })
    return 0


if __name__ == "__main__":
    run_main(main)
