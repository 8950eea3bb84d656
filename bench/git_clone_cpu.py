#!/usr/bin/env python3
"""Git scenario (a): server CPU seconds per warm full clone.

One large generated repository (see git_common.build_repo) served two ways:
``git http-backend`` behind nginx + fcgiwrap (the reference), and sparkcache
mirroring that upstream. After warm-up (mirror cloned, one clone through the
cache so the pack cache holds the pack), each run is one ``git clone --bare``
from each server, alternating; the CPU of each server's whole process tree
(nginx, fcgiwrap, http-backend, upload-pack, pack-objects; the daemon and its
upload-pack children) is read from a cpuacct cgroup per server before and after. The clone's own
CPU (index-pack on the client) is not counted. Goal: sparkcache/reference
<= 0.3x.
"""

from __future__ import annotations

import shutil
import time

from common import (Bench, BenchError, apply_quick, base_parser, fmt_size, median, print_summary, print_table, ratio,
                    run_main, summary_row, wait_for_quiet)
from git_common import GitDaemon, HttpBackend, bench_repo, clone, repo_args

NAME = "git_clone_cpu"
GOAL = 0.3


def main() -> int:
    p = base_parser(__doc__ or NAME, "(3,000 commits, 2 runs)")
    repo_args(p)
    p.add_argument("--runs", type=int, default=None, help="timed clones per server (default 3)")
    args = p.parse_args()
    apply_quick(args, {"commits": 3000, "files": 300, "runs": 2}, {"commits": 30000, "files": 3000, "runs": 3})

    with Bench(NAME, args) as b:
        repo_info, root = bench_repo(b, args)
        b.log(f"repository: {repo_info['commits']:,} commits, {repo_info['objects']:,} objects, "
              f"pack {fmt_size(repo_info['pack_bytes'])}")
        up = HttpBackend(b, root).start()
        daemon = GitDaemon(b, {"repos": {"bench": up.url("bench.git")}, "fetch_interval": "1h"}).start()
        spark_url, up_url = daemon.git_url("bench"), up.url("bench.git")

        b.log("warming: a clone from the upstream, then the mirror and the pack cache through sparkcache")
        clones = b.path("clones")
        ref = clone(up_url, clones / "ref")
        t_first = daemon.cpu()
        first = clone(spark_url, clones / "first")
        first["server_cpu_s"] = daemon.cpu() - t_first
        if first["head"] != ref["head"]:
            raise BenchError(f"clone through sparkcache has HEAD {first['head']}, upstream {ref['head']}")
        b.log(f"first clone through sparkcache (mirror clone + pack computation): {first['seconds']:.1f}s, "
              f"daemon CPU {first['server_cpu_s']:.1f}s")
        shutil.rmtree(clones)

        wait_for_quiet(60, log=b.log)
        rows, results = [], {"http-backend": [], "sparkcache": []}
        cpu = {"http-backend": up.cpu, "sparkcache": daemon.cpu}
        urls = {"http-backend": up_url, "sparkcache": spark_url}
        for i in range(args.runs):
            for who in ("http-backend", "sparkcache"):
                c0 = cpu[who]()
                r = clone(urls[who], clones / f"{who}-{i}")
                time.sleep(0.5)  # let the server's last process exit (nginx logs, children reaped)
                r["server_cpu_s"] = cpu[who]() - c0
                r["pack_bytes"] = sum(f.stat().st_size for f in (clones / f"{who}-{i}" / "objects" / "pack").glob("*.pack"))
                shutil.rmtree(clones / f"{who}-{i}")
                if r["head"] != ref["head"]:
                    raise BenchError(f"{who} run {i + 1}: HEAD {r['head']}, expected {ref['head']}")
                results[who].append(r)
                rows.append([str(i + 1), who, f"{r['server_cpu_s']:.2f}", f"{r['seconds']:.1f}", fmt_size(r["pack_bytes"])])
                b.log(f"run {i + 1} {who}: server CPU {r['server_cpu_s']:.2f}s, clone {r['seconds']:.1f}s")
        print_table(f"{NAME}: warm full clone (git clone --bare), {fmt_size(repo_info['pack_bytes'])} pack",
                    ["run", "server", "server CPU s", "clone wall s", "pack received"], rows)
        s_cpu = median(r["server_cpu_s"] for r in results["sparkcache"])
        u_cpu = median(r["server_cpu_s"] for r in results["http-backend"])
        rat = ratio(s_cpu, u_cpu)
        summary = [
            summary_row("server CPU per warm full clone, median", "ms", s_cpu * 1000, "http-backend", u_cpu * 1000,
                        f"<= {GOAL}x", rat is not None and rat <= GOAL),
            summary_row("clone wall time, median", "s", median(r["seconds"] for r in results["sparkcache"]),
                        "http-backend", median(r["seconds"] for r in results["http-backend"]), "-", None),
            summary_row("first clone through sparkcache: daemon CPU", "s", first["server_cpu_s"], "", None, "-", None,
                        note="mirror clone from upstream + one upload-pack run"),
        ]
        print_summary(f"{NAME} summary (median of {args.runs})", summary)
        m = daemon.metrics()
        pack = {k: v for k, v in m.items() if 'remote="git-packs"' in k}
        daemon.stop()
        b.write_results({
            "params": {"commits": args.commits, "files": args.files, "runs": args.runs,
                       "client": "git clone --bare (protocol v2)",
                       "reference": "nginx 2 workers + fcgiwrap 16 children + git http-backend"},
            "repository": repo_info,
            "runs": results,
            "first_clone_through_sparkcache": first,
            "summary": summary,
            "checks": {"pack_cache_metrics": pack, "daemon_exit_status": daemon.exit_status,
                       "daemon_log_problems": daemon.log_problems()[:20]},
        })
    return 0


if __name__ == "__main__":
    run_main(main)
