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
local store versus direct from nginx, and through two s3 daemons: one uploading
after the body is complete (``stream_uploads: false``: the reference) and one
streaming parts while the body downloads (to a temporary object copied to its
sha256 name at the end: the generic remote expects no digest). Daemon CPU
includes the upload and is also given until the client's last byte; "until
committed" is how long after the client's last byte the entry (uploaded) is a hit. Wall figures are
disturbed by other work on a shared machine: the daemon's (and SeaweedFS's)
CPU per GB, from schedstat, is the figure to compare.
"""

from __future__ import annotations

import http.client
import os
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
    p.add_argument("--cold-only", action="store_true", help="the cold miss only (no hit figures)")
    p.add_argument("--rate", type=parse_size, default=None,
                   help="nginx limit_rate for the cold miss (an upstream slower than the bucket; default: none)")
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
        limit = f"limit_rate {args.rate};" if args.rate else ""
        origin = Nginx(b, "origin", [static_server(up_port, files, "access.log", limit)]).start()
        weed = SeaweedFS(b.path("weed")).start()
        b.on_cleanup(weed.stop)
        assert weed.proc is not None
        _WEED[:] = [weed.proc.pid]
        bucket = make_bucket(weed.endpoint)
        creds = b.path("s3-credentials")
        creds.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
        remotes = {"f": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"},
                   "o": {"type": "oci", "upstream": f"http://127.0.0.1:{up_port}"}}

        def s3(prefix: str, tier: str) -> dict[str, Any]:
            return {"backend": "s3", "tier": {"max_size": tier},
                    "s3": {"endpoint": weed.endpoint, "bucket": bucket, "prefix": prefix, "sweep": False,
                           "credentials_file": str(creds)}}

        hits: dict[str, Any] = {}
        if not args.cold_only:
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

        def med(who: str, key: str) -> float:
            return median(r.get(key, 0.0) for r in cold[who])

        rows = [["direct", med("direct", "speed") / MB, "-", "-", "-", "-", "-"]]
        for who in COLD:
            rows.append([who, med(who, "speed") / MB, med(who, "daemon_cpu_s") / gb,
                         med(who, "daemon_cpu_download_s") / gb, med(who, "weed_cpu_s") / gb,
                         med(who, "commit_wait") * 1000, med(who, "until_committed")])
        print_table(f"{NAME}: {fmt_size(args.size)} cold miss, curl -o /dev/null, median of {args.runs}",
                    ["path", "MB/s", "daemon CPU s/GB", "of which until last byte", "SeaweedFS CPU s/GB",
                     "committed after last byte ms", "committed after request s"], rows)

        summary = [] if not hits else [
            summary_row("hit from the tier, daemon CPU per hit", "ms", hits["s3 tier"]["cpu_ms"], "local store",
                        hits["local"]["cpu_ms"], "<= 1.2x", hits["s3 tier"]["cpu_ms"] <= 1.2 * hits["local"]["cpu_ms"]),
            summary_row("hit from the bucket, daemon CPU per hit", "ms", hits["s3 bucket"]["cpu_ms"], "local store",
                        hits["local"]["cpu_ms"], "-", None),
        ]
        summary += [
            summary_row("cold miss into the bucket (streamed), throughput", "MB/s", med("s3 streamed", "speed") / MB,
                        "local store", med("local", "speed") / MB, "-", None),
            summary_row("cold miss into the bucket (at end), throughput", "MB/s", med("s3 at end", "speed") / MB,
                        "local store", med("local", "speed") / MB, "-", None),
            summary_row("cold miss, daemon CPU per GB until the last byte (at end)", "s",
                        med("s3 at end", "daemon_cpu_download_s") / gb, "local store",
                        med("local", "daemon_cpu_download_s") / gb, "-", None),
            summary_row("cold miss, daemon CPU per GB (streamed)", "s", med("s3 streamed", "daemon_cpu_s") / gb,
                        "s3 at end", med("s3 at end", "daemon_cpu_s") / gb, "-", None),
            summary_row("cold miss, SeaweedFS CPU per GB (streamed: copy included)", "s",
                        med("s3 streamed", "weed_cpu_s") / gb, "s3 at end", med("s3 at end", "weed_cpu_s") / gb,
                        "-", None),
            summary_row("cold miss, committed after the request (streamed, digest known)", "s",
                        med("s3 streamed, digest known", "until_committed"), "at end, digest known",
                        med("s3 at end, digest known", "until_committed"), "-", None),
            summary_row("cold miss, committed after the request (streamed)", "s",
                        med("s3 streamed", "until_committed"), "s3 at end", med("s3 at end", "until_committed"),
                        "-", None),
            summary_row("cold miss, until committed after the last byte (streamed)", "ms",
                        med("s3 streamed", "commit_wait") * 1000, "s3 at end", med("s3 at end", "commit_wait") * 1000,
                        "-", None),
        ]
        print_summary(f"{NAME} summary", summary)
        b.write_results({
            "params": {"size": args.size, "hit_size": args.hit_size, "hits": args.hits, "runs": args.runs,
                       "s3": "SeaweedFS on 127.0.0.1 (signatures checked)", "upstream": "nginx static",
                       "rate": args.rate},
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


COLD = ("local", "s3 at end", "s3 streamed", "s3 at end, digest known", "s3 streamed, digest known")


def cold_runs(b: Bench, args: Any, remotes: dict[str, Any], s3: Any, files: Path, digest: str, direct_url: str,
              weed: SeaweedFS) -> dict[str, list[dict[str, Any]]]:
    """Each run: direct, then the local store, then s3 with the upload after the
    body (``stream_uploads: false``, the reference), then s3 streaming parts
    while the body downloads (a digest not known in advance: to a temporary
    object, copied to its name at the end). CPU is split at the client's last
    byte: what the download cost, and what came after (the upload's end)."""
    daemons = {"local": Daemon(b, remotes, name="cold-local")}
    for n, who in enumerate(COLD[1:], start=1):
        # "digest known": the same body as an OCI blob, its sha256 known before it downloads.
        daemons[who] = Daemon(b, remotes, name=f"cold-s3-{n}", storage=s3(f"cold-{n}-0/", "64GiB"))
        daemons[who].storage["s3"]["stream_uploads"] = "at end" not in who
    blob = files / "v2" / "img" / "blobs" / f"sha256:{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        os.link(files / "cold.bin", blob)
    out: dict[str, list[dict[str, Any]]] = {"direct": [], **{who: [] for who in COLD}}
    size = args.size
    for i in range(args.runs):
        r = curl(direct_url)
        check_transfer(r, size, what=f"direct run {i + 1}")
        out["direct"].append(r)
        b.log(f"cold direct run {i + 1}: {r['speed'] / MB:,.0f} MB/s")
        for who in COLD:
            d = daemons[who]
            if who != "local":  # a prefix of its own: the bucket has never seen the body
                d.storage["s3"]["prefix"] = f"cold-{COLD.index(who)}-{i}/"
            if d.proc is None:
                d.start()
            else:
                d.fresh_start()
            pids, weed_pids = d.pids(), _weed_pids()
            cpu0, weed0 = task_cpu_seconds(pids), task_cpu_seconds(weed_pids)
            known = "digest known" in who
            x = curl(d.url(f"/v2/o/img/blobs/sha256:{digest}" if known else "/api/f/cold.bin"), verify=(i == 0))
            cpu1, weed1 = task_cpu_seconds(pids), task_cpu_seconds(weed_pids)
            check_transfer(x, size, sha256=digest if i == 0 else None, x_cache="MISS", what=f"{who} run {i + 1}")
            t0 = time.monotonic()
            d.wait_idle()
            if known:  # (an OCI remote has no listing: its blob is committed once a HEAD is a HIT)
                status, headers, _ = d.request("HEAD", f"/v2/o/img/blobs/sha256:{digest}")
                if status != 200 or headers.get("x-cache") != "HIT":
                    raise BenchError(f"{who} run {i + 1}: HEAD after the miss answered {status} {headers}")
                entries = [{"digest": digest}]
            else:
                entries = d.wait_entries("f", 1, timeout=600)
            x["commit_wait"] = time.monotonic() - t0
            x["until_committed"] = (x.get("total") or 0.0) + x["commit_wait"]  # from the request
            x["daemon_cpu_s"] = task_cpu_seconds(pids) - cpu0
            x["daemon_cpu_download_s"] = cpu1 - cpu0
            x["weed_cpu_s"] = task_cpu_seconds(weed_pids) - weed0
            x["weed_cpu_download_s"] = weed1 - weed0
            if entries[0]["digest"] != digest:
                raise BenchError(f"{who} run {i + 1}: committed {entries[0]['digest']}, expected {digest}")
            out[who].append(x)
            b.log(f"cold {who} run {i + 1}: {x['speed'] / MB:,.0f} MB/s, daemon CPU {x['daemon_cpu_s']:.2f} s "
                  f"({x['daemon_cpu_download_s']:.2f} s until the client's last byte), SeaweedFS CPU "
                  f"{x['weed_cpu_s']:.2f} s ({x['weed_cpu_download_s']:.2f} s), committed "
                  f"{x['commit_wait'] * 1000:.0f} ms after the last byte")
    for d in daemons.values():
        d.stop()
    return out


if __name__ == "__main__":
    run_main(main)
