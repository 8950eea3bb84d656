"""Printing for people (aligned tables, sizes, ages) and for scripts (JSON)."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Sequence, TextIO


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Columns padded to their widest cell; ``-`` for a missing value."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def pairs(items: Sequence[tuple[str, Any]]) -> str:
    """``key: value`` lines, keys aligned."""
    width = max((len(k) for k, _ in items), default=0)
    return "".join(f"{(k + ':').ljust(width + 1)} {cell(v)}\n" for k, v in items)


def cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(cell(x) for x in v) or "-"
    return str(v)


def size(n: Any) -> str:
    """Bytes as people read them (``1.5 GiB``); ``-`` when unknown."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def ratio(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def age(ts: Any, now: Callable[[], float] = time.time) -> str:
    """``12s ago`` for a Unix time; ``never`` for none."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "never"
    delta = max(0.0, now() - float(ts))
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= span:
            return f"{int(delta // span)}{unit} ago"
    return f"{int(delta)}s ago"


def dump_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
