#!/usr/bin/env python3
"""Print the results of pypi_cache.py and npm_cache.py as reStructuredText tables (for docs/benchmarks.rst).

    python bench/registry_table.py [--results bench/results]

One table of medians per scenario (client, phase, then wall and cache CPU per
cache, and the ratios sparkcache/reference), the peak RSS of every cache, and
the summary against the goals. Only what the JSON holds: nothing is re-measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from common import RESULTS_DIR

PHASES = ("cold", "warm", "warm x4")


def rst(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells[1:]]
    lines.append(rule)
    return "\n".join(lines)


def med(xs: list[dict[str, Any]], key: str) -> float | None:
    return statistics.median(x[key] for x in xs) if xs else None


def scenario_tables(data: dict[str, Any]) -> str:
    runs: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = data["runs"]
    out = []
    rows = []
    for client, per_cache in runs.items():
        for phase in PHASES:
            s = per_cache.get("sparkcache", {}).get(phase, [])
            sw, sc = med(s, "seconds"), med(s, "server_cpu_seconds")
            for n, by_phase in per_cache.items():
                rs = by_phase[phase]
                w, c = med(rs, "seconds"), med(rs, "server_cpu_seconds")
                wr = f"{sw / w:.2f}×" if n != "sparkcache" and sw is not None and w else "-"
                cr = f"{sc / c:.2f}×" if n != "sparkcache" and sc is not None and c else "-"
                rows.append([client, phase, n, f"{w:.2f}" if w is not None else "-",
                             f"{c:.2f}" if c is not None else "-", wr, cr, str(len(rs))])
    out.append(rst(["client", "phase", "cache", "wall s", "cache CPU s", "sparkcache/this wall",
                    "sparkcache/this CPU", "runs"], rows))
    rss = data.get("peak_rss_bytes", {})
    versions = data.get("params", {}).get("versions", {})
    out.append(rst(["cache", "version", "peak RSS"],
                   [[n, str(versions.get(n, "")), f"{v / (1 << 20):.1f} MiB"] for n, v in rss.items()]))
    summary = data.get("summary") or []
    if summary:
        def num(v: Any) -> str:
            return "-" if v is None else f"{v:.2f}"
        out.append(rst(["metric", "sparkcache", "reference", "ratio", "goal", "met"], [
            [f"{r['metric']} ({r['unit']})", num(r["sparkcache"]), f"{num(r['reference'])} ({r['reference_name']})",
             "-" if r["ratio"] is None else f"{r['ratio']:.2f}×", r["goal"],
             "-" if r["met"] is None else ("yes" if r["met"] else "**no**")] for r in summary]))
    return "\n\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS_DIR))
    args = p.parse_args()
    for name in ("pypi_cache", "npm_cache"):
        path = Path(args.results) / f"{name}.json"
        if not path.exists():
            print(f"({path} missing)\n")
            continue
        data = json.loads(path.read_text())
        m = data.get("machine", {})
        print(f"{name}: {m.get('date')}, commit {m.get('git_commit')}, sparkcache tree "
              f"{m.get('sparkcache_tree_sha256')}, other processes used {data.get('foreign_cpu_share', 0):.0%} "
              f"of the CPU\n")
        print(scenario_tables(data))
        failures = data.get("checks", {}).get("failures") or {}
        for k, v in failures.items():
            print(f"\nFAILED and left out: {k}: {v.splitlines()[0] if v else ''}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
