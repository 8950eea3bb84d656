#!/usr/bin/env python3
"""Git scenario (c): a warm full clone through sparkcache vs straight from a distant upstream.

The upstream (``git http-backend`` behind nginx + fcgiwrap) lives in a network
namespace behind a veth pair shaped with ``tc tbf`` to ``--rate`` both ways,
with ``--delay`` of one-way latency added by a relay inside the namespace (so
50 Mbit/s and 40 ms RTT by default). sparkcache runs outside, next to the
client, mirroring that upstream over the same link; its mirror and pack cache
are warm. Each run is one ``git clone --bare`` from each side. Goal: the
clone through sparkcache >= 5x faster.

Needs root (ip netns, tc); without it the scenario is reported as skipped.
"""

from __future__ import annotations

import os
import shutil

from common import (Bench, BenchError, apply_quick, base_parser, fmt_size, free_port, median, print_summary,
                    print_table, run_main, summary_row, wait_for_quiet)
from git_common import WAN_NS_IP, GitDaemon, HttpBackend, WanLink, bench_repo, clone, repo_args

NAME = "git_wan_clone"
GOAL = 5.0


def main() -> int:
    p = base_parser(__doc__ or NAME, "(3,000 commits, 1 run)")
    repo_args(p)
    p.add_argument("--runs", type=int, default=None, help="clones per side (default 2)")
    p.add_argument("--rate", default="50mbit", help="link rate each way (tc tbf syntax)")
    p.add_argument("--delay", type=float, default=0.020, help="one-way delay in seconds (RTT is twice this)")
    args = p.parse_args()
    apply_quick(args, {"commits": 3000, "files": 300, "runs": 1}, {"commits": 30000, "files": 3000, "runs": 2})

    with Bench(NAME, args) as b:
        if os.geteuid() != 0:
            b.notes.append("skipped: needs root for ip netns and tc")
            print(f"[{NAME}] skipped: needs root for ip netns and tc")
            b.write_results({"skipped": True})
            return 0
        repo_info, root = bench_repo(b, args)
        try:
            wan = WanLink(b, args.rate, args.delay).start()
        except BenchError as e:
            b.notes.append(f"skipped: {e}")
            print(f"[{NAME}] skipped: could not build the emulated link: {e}")
            b.write_results({"skipped": True, "reason": str(e)})
            return 0
        inner = free_port()
        up = HttpBackend(b, root, port=inner, netns=wan.ns).start()
        outer = free_port()
        wan.relay(outer, inner)
        wan_url = f"http://{WAN_NS_IP}:{outer}/bench.git"
        b.log(f"upstream behind the emulated link: {wan_url} ({args.rate}, {2 * args.delay * 1000:.0f} ms RTT)")
        daemon = GitDaemon(b, {"repos": {"bench": wan_url}, "fetch_interval": "1h"}).start()
        spark_url = daemon.git_url("bench")

        clones = b.path("clones")
        b.log("warming sparkcache: mirror clone over the link, then the pack computed once")
        first = clone(spark_url, clones / "first")
        b.log(f"first clone through sparkcache: {first['seconds']:.1f}s")
        second = clone(spark_url, clones / "second")
        shutil.rmtree(clones)
        pack = {k: v for k, v in daemon.metrics().items() if 'remote="git-packs"' in k}
        if not any('result="hit"' in k and v >= 1 for k, v in pack.items()):
            raise BenchError(f"the second clone through sparkcache was not a pack-cache hit: {pack}")

        wait_for_quiet(60, log=b.log)
        rows, results = [], {"upstream over the link": [], "sparkcache": []}
        for i in range(args.runs):
            for who, url in (("upstream over the link", wan_url), ("sparkcache", spark_url)):
                r = clone(url, clones / f"{i}")
                shutil.rmtree(clones / f"{i}")
                if r["head"] != first["head"]:
                    raise BenchError(f"{who}: HEAD {r['head']}, expected {first['head']}")
                results[who].append(r)
                rows.append([str(i + 1), who, f"{r['seconds']:.1f}"])
                b.log(f"run {i + 1} {who}: {r['seconds']:.1f}s")
        print_table(f"{NAME}: warm full clone, {fmt_size(repo_info['pack_bytes'])} pack, upstream at {args.rate} / "
                    f"{2 * args.delay * 1000:.0f} ms RTT", ["run", "source", "clone wall s"], rows)
        s = median(r["seconds"] for r in results["sparkcache"])
        u = median(r["seconds"] for r in results["upstream over the link"])
        speedup = u / s if s else None
        summary = [summary_row("warm full clone wall time, median", "s", s, "upstream over the link", u,
                               f">= {GOAL:.0f}x faster", speedup is not None and speedup >= GOAL,
                               ratio_value=speedup, note="ratio = upstream / sparkcache")]
        print_summary(f"{NAME} summary (ratio = how many times faster through sparkcache)", summary)
        daemon.stop()
        b.write_results({
            "params": {"commits": args.commits, "files": args.files, "runs": args.runs, "rate": args.rate,
                       "one_way_delay_s": args.delay,
                       "link": "veth pair into a network namespace, tc tbf both ways; delay added by a "
                               "userspace relay in the namespace (this kernel has no sch_netem)"},
            "repository": repo_info,
            "warmup": {"first": first, "second": second},
            "runs": results,
            "summary": summary,
            "checks": {"pack_cache_metrics": pack, "daemon_exit_status": daemon.exit_status,
                       "daemon_log_problems": daemon.log_problems()[:20]},
        })
    return 0


if __name__ == "__main__":
    run_main(main)
