#!/usr/bin/env python3
"""Scenario: the S3 content store (``storage.backend: s3``) against the local disk.

SeaweedFS (``weed server -s3`` from the venv, as the tests start it, with
signatures checked) on 127.0.0.1, nginx serving the files as the upstream,
three daemons side by side in one run:

- ``local``: the local disk store (the reference);
- ``s3 tier``: bucket plus a local tier big enough for everything: hits are
  served from the tier (sendfile);
- ``s3 bucket``: bucket plus a tier of size 0: two bodies asked in turn, so
  every hit fetches its body from the bucket, verifies it and puts it in the
  tier before serving.

The daemons' hits are interleaved in rounds, so that a burst of other work on
the machine falls on all of them alike.

Hits: ``--hits`` requests of ``--hit-size`` bodies on one keep-alive
connection. Cold miss: one ``--size`` object (1 GiB for the issue's figure:
``--size 1GiB``) fetched through a fresh daemon with ``curl`` versus the
local store versus direct from nginx; the s3 figure's daemon CPU includes the
upload (it starts when the body is complete) and "until committed" is how long
after the client's last byte the entry (uploaded) is a hit. Wall figures are
disturbed by other work on a shared machine: the daemon's (and SeaweedFS's)
CPU per GB, from schedstat, is the figure to compare.
"""

from __future__ import annotations

import http.client
import sys
import time
from pathlib import Path
from typing import Any

from common import (LOOPBACK, MB, MiB, REPO, Bench, BenchError, Daemon, Nginx, apply_quick, base_parser,
                    check_transfer, curl, fmt_size, free_port, make_random_file, median, parse_size, print_summary,
                    print_table, run_main, static_server, summary_row, task_cpu_seconds)

sys.path.insert(0, str(REPO))
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, SeaweedFS, make_bucket  # noqa: E402

NAME = "s3_store"


def main() -> int:
    p = base_parser(__doc__ or NAME, "(32 MiB cold miss, 30 hits, 1 run)")
    p.add_argument("--size", type=parse_size, default=None, help="cold miss object size (default 256MiB; --quick 32MiB)")
    p.add_argument("--hit-size", type=parse_size, default=None, help="hit body size (default 1MiB)")
    p.add_argument("--hits", type=int, default=None, help="hits per daemon (default 200; --quick 30)")
    p.add_argument("--runs", type=int, default=None, help="cold misses per path (default 3; --quick 1)")
    args = p.parse_args()
    apply_quick(args, {"size": 32 << 20, "hits": 30, "runs": 1},
                {"size": 256 << 20, "hit_size": MiB, "hits": 200, "runs": 3})

    with Bench(NAME, args) as b:
        b.check_disk(5 * args.size + (256 << 20))
        files = b.path("files")
        b.log(f"writing {fmt_size(args.size)} + 2 x {fmt_size(args.hit_size)} of urandom data")
        digest = make_random_file(files / "cold.bin", args.size)
        for name in ("h0.bin", "h1.bin"):
            make_random_file(files / name, args.hit_size)
        up_port = free_port()
        origin = Nginx(b, "origin", [static_server(up_port, files, "access.log")]).start()
        weed = SeaweedFS(b.path("weed")).start()
        b.on_cleanup(weed.stop)
        assert weed.proc is not None
        _WEED[:] = [weed.proc.pid]
        bucket = make_bucket(weed.endpoint)
        creds = b.path("s3-credentials")
        creds.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
        remotes = {"f": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}}

        def s3(prefix: str, tier: str) -> dict[str, Any]:
            return {"backend": "s3", "tier": {"max_size": tier},
                    "s3": {"endpoint": weed.endpoint, "bucket": bucket, "prefix": prefix, "sweep": False,
                           "credentials_file": str(creds)}}

        daemons = {"local": Daemon(b, remotes, name="local").start(),
                   "s3 tier": Daemon(b, remotes, name="s3-tier", storage=s3("tier/", "64GiB")).start(),
                   "s3 bucket": Daemon(b, remotes, name="s3-bucket", storage=s3("bucket/", "0")).start()}
        hits = hit_runs(b, daemons, args.hits, args.hit_size)
        for d in daemons.values():
            d.stop()
        rows = [[name, h["cpu_ms"], h["cpu_ms"] / hits["local"]["cpu_ms"], h["wall_ms"], h["weed_cpu_ms"]]
                for name, h in hits.items()]
        print_table(f"{NAME}: {args.hits} hits of {fmt_size(args.hit_size)} (two bodies in turn), one connection",
                    ["hit served by", "daemon CPU ms/hit", "ratio to local", "wall ms/hit", "SeaweedFS CPU ms/hit"],
                    rows)

        cold = cold_runs(b, args, remotes, s3, files, digest, origin.url("/cold.bin"), weed)
        gb = args.size / 1e9
        rows = []
        for who, runs in cold.items():
            rows.append([who, median(r["speed"] for r in runs) / MB,
                         median(r.get("daemon_cpu_s", 0.0) for r in runs) / gb if who != "direct" else "-",
                         median(r.get("weed_cpu_s", 0.0) for r in runs) / gb if who != "direct" else "-",
                         median(r.get("commit_wait", 0.0) for r in runs) * 1000 if who != "direct" else "-"])
        print_table(f"{NAME}: {fmt_size(args.size)} cold miss, curl -o /dev/null, median of {args.runs}",
                    ["path", "MB/s", "daemon CPU s/GB", "SeaweedFS CPU s/GB", "until committed ms"], rows)

        def med(who: str, key: str) -> float:
            return median(r[key] for r in cold[who])

        summary = [
            summary_row("hit from the tier, daemon CPU per hit", "ms", hits["s3 tier"]["cpu_ms"], "local store",
                        hits["local"]["cpu_ms"], "<= 1.2x", hits["s3 tier"]["cpu_ms"] <= 1.2 * hits["local"]["cpu_ms"]),
            summary_row("hit from the bucket, daemon CPU per hit", "ms", hits["s3 bucket"]["cpu_ms"], "local store",
                        hits["local"]["cpu_ms"], "-", None),
            summary_row("cold miss into the bucket, throughput", "MB/s", med("s3", "speed") / MB, "local store",
                        med("local", "speed") / MB, "-", None),
            summary_row("cold miss into the bucket, throughput vs direct", "MB/s", med("s3", "speed") / MB,
                        "direct from upstream", med("direct", "speed") / MB, "-", None),
            summary_row("cold miss, daemon CPU per GB (upload included)", "s", med("s3", "daemon_cpu_s") / gb,
                        "local store", med("local", "daemon_cpu_s") / gb, "-", None),
            summary_row("cold miss, until committed after the last byte", "ms", med("s3", "commit_wait") * 1000,
                        "local store", med("local", "commit_wait") * 1000, "-", None),
        ]
        print_summary(f"{NAME} summary", summary)
        b.write_results({
            "params": {"size": args.size, "hit_size": args.hit_size, "hits": args.hits, "runs": args.runs,
                       "s3": "SeaweedFS on 127.0.0.1 (signatures checked)", "upstream": "nginx static"},
            "hits": hits, "cold": cold, "summary": summary, "checks": {"sha256": digest},
        })
    return 0


ROUNDS = 4  # the daemons' hits interleaved in rounds: a burst of other work hits all of them alike


def hit_runs(b: Bench, daemons: dict[str, Daemon], n: int, size: int) -> dict[str, dict[str, Any]]:
    paths = ["/api/f/h0.bin", "/api/f/h1.bin"]
    conns = {}
    for name, d in daemons.items():
        for path in paths:  # the misses
            status, _h, body = d.request("GET", path)
            if status != 200 or len(body) != size:
                raise BenchError(f"{d.dir.name}: {path} answered {status} with {len(body)} bytes")
        d.wait_entries("f", 2)
        conns[name] = http.client.HTTPConnection(LOOPBACK, d.port, timeout=120)
        get(conns[name], paths[0], size, d)  # first hit: connections warm
    totals = {name: {"cpu": 0.0, "wall": 0.0, "weed": 0.0, "n": 0} for name in daemons}
    weed_pids = _weed_pids()
    try:
        for r in range(ROUNDS):
            for name, d in daemons.items():
                k = n // ROUNDS + (1 if r < n % ROUNDS else 0)
                pids = d.pids()
                cpu0, weed0, t0 = task_cpu_seconds(pids), task_cpu_seconds(weed_pids), time.monotonic()
                for i in range(k):
                    get(conns[name], paths[(i + 1) % 2], size, d)
                t = totals[name]
                t["wall"] += time.monotonic() - t0
                t["cpu"] += task_cpu_seconds(pids) - cpu0
                t["weed"] += task_cpu_seconds(weed_pids) - weed0
                t["n"] += k
    finally:
        for c in conns.values():
            c.close()
    out = {}
    for name, t in totals.items():
        k = max(1, int(t["n"]))
        out[name] = {"cpu_ms": t["cpu"] * 1000 / k, "wall_ms": t["wall"] * 1000 / k, "weed_cpu_ms": t["weed"] * 1000 / k,
                     "hits": k}
        b.log(f"{name}: {k} hits, daemon CPU {out[name]['cpu_ms']:.2f} ms/hit, wall {out[name]['wall_ms']:.1f} ms/hit")
    return out


def get(conn: http.client.HTTPConnection, path: str, size: int, d: Daemon) -> None:
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    if r.status != 200 or len(body) != size or r.getheader("X-Cache") != "HIT":
        raise BenchError(f"{d.dir.name}: {path} answered {r.status} ({len(body)} bytes, X-Cache "
                         f"{r.getheader('X-Cache')}), expected a {size}-byte HIT")


_WEED: list[int] = []  # SeaweedFS's pid: its CPU is part of what a bucket costs


def _weed_pids() -> list[int]:
    return list(_WEED)


def cold_runs(b: Bench, args: Any, remotes: dict[str, Any], s3: Any, files: Path, digest: str, direct_url: str,
              weed: SeaweedFS) -> dict[str, list[dict[str, Any]]]:
    local = Daemon(b, remotes, name="cold-local")
    bucket = Daemon(b, remotes, name="cold-s3", storage=s3("cold-0/", "64GiB"))
    out: dict[str, list[dict[str, Any]]] = {"direct": [], "local": [], "s3": []}
    size = args.size
    for i in range(args.runs):
        r = curl(direct_url)
        check_transfer(r, size, what=f"direct run {i + 1}")
        out["direct"].append(r)
        for who, d in (("local", local), ("s3", bucket)):
            if who == "s3":  # a prefix of its own: the bucket has never seen the body
                d.storage["s3"]["prefix"] = f"cold-{i}/"
            if d.proc is None:
                d.start()
            else:
                d.fresh_start()
            pids, weed_pids = d.pids(), _weed_pids()
            cpu0, weed0 = task_cpu_seconds(pids), task_cpu_seconds(weed_pids)
            x = curl(d.url("/api/f/cold.bin"), verify=(i == 0))
            check_transfer(x, size, sha256=digest if i == 0 else None, x_cache="MISS", what=f"{who} run {i + 1}")
            t0 = time.monotonic()
            d.wait_idle()
            entries = d.wait_entries("f", 1, timeout=600)
            x["commit_wait"] = time.monotonic() - t0
            x["daemon_cpu_s"] = task_cpu_seconds(pids) - cpu0
            x["weed_cpu_s"] = task_cpu_seconds(weed_pids) - weed0
            if entries[0]["digest"] != digest:
                raise BenchError(f"{who} run {i + 1}: committed {entries[0]['digest']}, expected {digest}")
            out[who].append(x)
            b.log(f"cold {who} run {i + 1}: {x['speed'] / MB:,.0f} MB/s, daemon CPU {x['daemon_cpu_s']:.2f} s, "
                  f"committed {x['commit_wait'] * 1000:.0f} ms after the last byte")
        b.log(f"cold direct run {i + 1}: {r['speed'] / MB:,.0f} MB/s")
    local.stop()
    bucket.stop()
    return out


if __name__ == "__main__":
    run_main(main)
