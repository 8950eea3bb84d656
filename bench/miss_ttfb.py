#!/usr/bin/env python3
"""Scenario 3b: time to first byte of cold misses on a running daemon.

``cold_miss.py --ttfb-only`` times the first miss of a freshly started daemon
(after four warm-up requests): a new process's first pass through the miss
path. A cache host runs for weeks; what its CI jobs wait for is a miss on a
daemon that has served misses before, of a key it has never seen: no index
row, no body, nothing in memory. This scenario times that: one daemon per
``server.workers`` value, and ``--runs`` misses, each of a new key (a new
name of one 16 MiB file on the upstream nginx), against curl fetching
another new name straight from nginx in the same round. Each round starts
with ``os.sync()`` (nothing of the last body's commit still being written)
and rotates the order of the paths (no path always follows the same one).

Reported: curl's ``time_starttransfer`` (the response's first byte, headers
included), its median and quartiles, and the median per round of
sparkcache's time minus direct's. ``--baseline DIR`` runs another checkout
(``/work/main``: before a change) in the same rounds. Goal (issue 14): time
to first byte <= direct + 2 ms.

Three references do a miss's way to its first byte without sparkcache, in
the same rounds (``--no-references`` leaves them out): nginx ``proxy_cache``
(a new key per fetch, as sparkcache's), ``twisted_proxy.py`` (Twisted's
server and ``Agent`` with a persistent pool relaying the body: the fixed
shape's own cost, with none of sparkcache's work) and ``miss_floor.py``
(blocking Python that spools, hashes and sends; it connects to the upstream
per request). Their times over direct say how much of sparkcache's is the
machine's (a proxy's extra process hop on 2 shared cores) and how much the
framework's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cold_miss import Floor, proxy_cache_server
from common import (Bench, BenchError, Daemon, MB, Nginx, ScriptServer, add_workers_arg, apply_quick, base_parser,
                    check_transfer, curl, free_port, make_links, make_random_file, median, print_summary, print_table,
                    run_main, static_server, summary_row)

HERE = Path(__file__).resolve().parent
NAME = "miss_ttfb"
GOAL_MS = 2.0
WARMUPS = 4


def quartiles(values: list[float]) -> tuple[float, float]:
    v = sorted(values)
    return v[len(v) // 4], v[(3 * len(v)) // 4]


def twisted_proxy(b: Bench, upstream_port: int) -> ScriptServer:
    """bench/twisted_proxy.py as a subprocess."""
    return ScriptServer(b, HERE / "twisted_proxy.py", [str(upstream_port)])


class References:
    """The misses without sparkcache, each fetched like a daemon's: ``fetch(who, name)``."""

    NAMES = ("nginx proxy_cache", "twisted proxy", "floor")

    def __init__(self, b: Bench, up_port: int) -> None:
        port = free_port()
        extra, server = proxy_cache_server(port, up_port)
        self.nginx = Nginx(b, "proxy-cache", [server], http_extra=extra).start()
        self.urls: dict[str, Callable[[str], str]] = {
            "nginx proxy_cache": lambda name: self.nginx.url(f"/{name}"),
            "twisted proxy": twisted_proxy(b, up_port).url,
            "floor": Floor(b, up_port).url,
        }

    def fetch(self, who: str, name: str, size: int, what: str) -> dict:
        r = curl(self.urls[who](f"/{name}"))
        check_transfer(r, size, x_cache="MISS" if who != "twisted proxy" else None, what=what)
        if who == "nginx proxy_cache":
            # (Each name is asked once: its cache file would only fill the disk.)
            for root, _dirs, files in os.walk(self.nginx.dir / "proxy_cache"):
                for f in files:
                    os.unlink(os.path.join(root, f))
        return r


def main() -> int:
    p = base_parser(__doc__ or NAME, "(10 rounds)")
    p.add_argument("--runs", type=int, default=None, help="rounds: misses per path (default 40)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another sparkcache checkout (e.g. /work/main) run in the same rounds, for an A/B")
    p.add_argument("--no-references", action="store_true",
                   help="leave out nginx proxy_cache, the minimal Twisted proxy and the no-framework floor")
    add_workers_arg(p)
    args = p.parse_args()
    apply_quick(args, {"runs": 10}, {"runs": 40})
    runs = max(4, args.runs)
    size = 16 * MB

    with Bench(NAME, args) as b:
        files = b.path("files")
        make_random_file(files / "cold.bin", size)
        (files / "small.txt").write_text("warm-up\n")
        trees = {"sparkcache": None} | ({"baseline": args.baseline} if args.baseline else {})
        names = iter(f"n{i}.bin" for i in range(10 ** 9))
        # Every fetch below is of a name nobody fetched before.
        refs_n = 0 if args.no_references else len(References.NAMES)
        needed = len(args.workers) * (runs + 2) * (1 + len(trees) + refs_n) + 10
        make_links(files / "cold.bin", [files / f"n{i}.bin" for i in range(needed)])
        up_port = free_port()
        origin = Nginx(b, "origin", [static_server(up_port, files, "access.log")]).start()
        refs = None if args.no_references else References(b, up_port)
        if refs is not None:
            for who in References.NAMES:  # (each has opened its connections and served once)
                refs.fetch(who, next(names), size, f"{who} first miss")
        summary: list[dict] = []
        results: dict[str, dict] = {}
        for workers in args.workers:
            tag = f"workers {workers}"
            remotes = {"cold": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}}
            daemons = {who: Daemon(b, remotes, name=f"{who}-w{workers}", workers=workers, tree=tree).start()
                       for who, tree in trees.items()}
            for who, d in daemons.items():
                # Each worker has served small requests and a miss of its own before the timed ones.
                d.warm_up(lambda: [("/api/cold/small.txt", b"warm-up\n")] * WARMUPS
                          + [(f"/api/cold/{next(names)}", size)])
            paths = ["direct"] + ([] if refs is None else list(References.NAMES)) + list(daemons)
            ttfb: dict[str, list[float]] = {who: [] for who in paths}
            for i in range(runs):
                os.sync()
                k = i % len(paths)
                for who in paths[k:] + paths[:k]:
                    name = next(names)
                    if who == "direct":
                        r = curl(origin.url(f"/{name}"))
                        check_transfer(r, size, what=f"direct round {i + 1}")
                    elif who not in daemons:
                        assert refs is not None
                        r = refs.fetch(who, name, size, f"{who} round {i + 1}")
                    else:
                        r = curl(daemons[who].url(f"/api/cold/{name}"))
                        check_transfer(r, size, x_cache="MISS", what=f"{who} round {i + 1}")
                    ttfb[who].append(r["ttfb"] * 1000)
            for d in daemons.values():
                d.stop()
            rows = []
            extra: dict[str, float] = {}
            for who in paths:
                q1, q3 = quartiles(ttfb[who])
                over = [s - t for s, t in zip(ttfb[who], ttfb["direct"])]
                extra[who] = median(over)
                rows.append([who, median(ttfb[who]), q1, q3, "-" if who == "direct" else f"{extra[who]:+.2f}"])
            print_table(f"{NAME}, {tag}: time to first byte (ms) of {runs} misses of new keys",
                        ["path", "median", "p25", "p75", "over direct (median per round)"], rows)
            summary.append(summary_row(f"time to first byte, median, {tag}", "ms", median(ttfb["sparkcache"]),
                                       "direct", median(ttfb["direct"]), f"<= +{GOAL_MS:g} ms",
                                       extra["sparkcache"] <= GOAL_MS,
                                       note=f"median extra over direct {extra['sparkcache']:+.2f} ms"))
            if refs is not None:
                summary.append(summary_row(f"time to first byte, median, {tag}", "ms", median(ttfb["sparkcache"]),
                                           "bare Twisted proxy", median(ttfb["twisted proxy"]), "-", None,
                                           note=f"its median extra over direct {extra['twisted proxy']:+.2f} ms"))
            if "baseline" in daemons:
                summary.append(summary_row(f"time to first byte, median, {tag}", "ms", median(ttfb["sparkcache"]),
                                           "baseline", median(ttfb["baseline"]), "-", None,
                                           note=f"baseline's median extra over direct {extra['baseline']:+.2f} ms"))
            results[str(workers)] = {"ttfb_ms": ttfb, "extra_over_direct_ms": extra}
        print_summary(f"{NAME} summary ({runs} rounds)", summary)
        b.write_results({
            "params": {"size": size, "runs": runs, "workers": args.workers, "client": "curl -o /dev/null",
                       "keys": "a new name of one file per fetch (symlinks on the upstream)",
                       "baseline": str(args.baseline) if args.baseline else None},
            "workers": results,
            "summary": summary,
        })
    return 0


if __name__ == "__main__":
    run_main(main)
