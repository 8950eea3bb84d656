"""The status page: ``GET /`` from a browser, rendered from :meth:`Status.snapshot`.

The server renders the whole page (it reads without JavaScript); an inline
script then polls ``status.json`` and redraws the same fields, the tables
(from the column list the page carries) and the charts of the last hour. No
external asset: the style and the script are inline, allowed by their hashes
in the Content-Security-Policy, which also keeps the page from loading or
running anything else. Every string from the config, the requests or the
upstreams is escaped here, and set as text (never as markup) by the script.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone
from html import escape
from typing import Any, Mapping, NamedTuple

from sparkcache.web.status_assets import SCRIPT, STYLE


class Column(NamedTuple):
    key: str  # dotted path into a row
    label: str
    kind: str  # how to show it: text, code, int, bytes, ratio, ago, state, error, list


REMOTE_COLUMNS = (
    Column("name", "Remote", "text"), Column("type", "Type", "text"), Column("requests", "Requests", "int"),
    Column("hits", "Hits", "int"), Column("misses", "Misses", "int"), Column("errors", "Errors", "int"),
    Column("hit_ratio", "Hit ratio", "ratio"), Column("bytes_cache", "From cache", "bytes"),
    Column("bytes_upstream", "From upstream", "bytes"), Column("upstream", "Last upstream error", "error"),
)
UPSTREAM_COLUMNS = (
    Column("origin", "Origin", "code"), Column("remotes", "Remotes", "list"), Column("state", "State", "state"),
    Column("last_success", "Last success", "ago"), Column("last_failure", "Last failure", "ago"),
    Column("last_error", "Last error", "text"),
)
GIT_COLUMNS = (
    Column("name", "Mirror", "text"), Column("url", "Upstream", "code"), Column("last_fetch", "Last fetch", "ago"),
    Column("last_change", "Last change", "ago"), Column("next_check", "Next check", "ago"),
    Column("last_error", "Last error", "text"),
)
TABLES = {"remotes": REMOTE_COLUMNS, "upstreams": UPSTREAM_COLUMNS, "git": GIT_COLUMNS}


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


# Nothing but the page's own style and script runs; it talks only to its origin.
CSP = (f"default-src 'none'; style-src {_hash(STYLE)}; script-src {_hash(SCRIPT)}; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    b"Content-Type": b"text/html; charset=utf-8",
    b"Content-Security-Policy": CSP.encode(),
    b"Cache-Control": b"no-store",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
}


# -- formatting (status_assets.SCRIPT's fmt() does the same in the browser) ------

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def fmt_bytes(n: float) -> str:
    i = 0
    while abs(n) >= 1024 and i < len(UNITS) - 1:
        n /= 1024
        i += 1
    return f"{int(n)} B" if i == 0 else f"{n:.1f} {UNITS[i]}"


def fmt_ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    d = now - t
    future = d < 0
    d = abs(d)
    if d < 1:
        return "now"
    text = f"{d:.0f}s" if d < 90 else f"{d / 60:.0f}m" if d < 5400 else f"{d / 3600:.0f}h" if d < 172800 \
        else f"{d / 86400:.0f}d"
    return f"in {text}" if future else f"{text} ago"


def fmt(kind: str, value: Any, now: float) -> str:
    if kind == "int":
        return "—" if value is None else f"{int(value):,}"
    if kind == "bytes":
        return "—" if value is None else fmt_bytes(value)
    if kind == "ratio":
        return "—" if value is None else f"{100 * value:.1f}%"
    if kind == "ago":
        return fmt_ago(value, now)
    if kind == "list":
        return ", ".join(value or [])
    if kind == "error":
        if not value or not value.get("last_error"):
            return "—"
        return f"{value['last_error']} ({fmt_ago(value['last_failure'], now)})"
    return "—" if value is None or value == "" else str(value)


def _iso(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def lookup(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


# -- rendering -------------------------------------------------------------------

def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def field(data: Mapping[str, Any], path: str, kind: str, element_id: str) -> str:
    """An element the script updates from ``path`` of each new status."""
    value = lookup(data, path)
    raw = "" if value is None else json.dumps(value)
    return (f'<span id="{element_id}" data-field="{_e(path)}" data-kind="{kind}" data-value="{_e(raw)}">'
            f"{_e(fmt(kind, value, data['time']))}</span>")


def cell(col: Column, row: Mapping[str, Any], now: float) -> str:
    value = lookup(row, col.key)
    attrs = f' data-key="{_e(col.key)}"'
    if col.kind in ("int", "bytes", "ratio", "ago"):
        attrs += f' data-value="{_e("" if value is None else json.dumps(value))}" class="num"'
    if col.kind == "ago" and value is not None:
        attrs += f' title="{_e(_iso(value))}"'
    text = _e(fmt(col.kind, value, now))
    if col.kind == "state":
        return f'<td{attrs}><span class="badge {_e(value)}">{text}</span></td>'
    if col.kind == "error" and value and value.get("state") == "failing":
        return f'<td{attrs} class="bad">{text}</td>'
    if col.kind == "code":
        return f"<td{attrs}><code>{text}</code></td>"
    return f"<td{attrs}>{text}</td>"


def table(name: str, rows: list[Mapping[str, Any]], now: float, empty: str) -> str:
    cols = TABLES[name]
    spec = json.dumps([c._asdict() for c in cols])
    head = "".join(f'<th class="{"num" if c.kind in ("int", "bytes", "ratio", "ago") else ""}">{_e(c.label)}</th>'
                   for c in cols)
    body = "".join(f'<tr data-row="{_e(r.get("name") or r.get("origin") or "")}">'
                   + "".join(cell(c, r, now) for c in cols) + "</tr>" for r in rows)
    if not rows:
        body = f'<tr class="empty"><td colspan="{len(cols)}">{_e(empty)}</td></tr>'
    return (f'<table id="table-{name}" data-table="{name}" data-columns="{_e(spec)}" data-empty="{_e(empty)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def render(data: Mapping[str, Any]) -> bytes:
    """The page for one :meth:`Status.snapshot`."""
    now = data["time"]
    store = data["store"]
    ready = data["ready"]
    git = data.get("git")
    used = store["used_ratio"]
    meter = ""
    if used is not None:
        full = ' class="full"' if used >= 0.95 else ""
        meter = f'<progress id="store-meter" max="1" value="{min(1.0, used):.4f}"{full}></progress>'
    git_section = ""
    if git is not None:
        git_section = (
            '<section class="card wide"><h2>Git mirrors</h2>'
            + table("git", git["mirrors"], now, "No git mirrors are registered.")
            + "</section>"
        )
    # With worker processes every figure is the daemon's; which one answered is a detail for the footer.
    workers = (f" · {_e(data['workers'])} worker processes (this page from worker {_e(data.get('worker'))})"
               if isinstance(data.get("workers"), int) and data["workers"] > 1 else "")
    # The first status rides along, so the charts draw without waiting for a poll.
    initial = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sparkcache status</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style>
</head><body data-time="{_e(now)}">
<header>
  <div class="brand">sparkcache <span class="version">{_e(data["version"])}</span></div>
  <div class="meta">
    <span id="ready" class="badge {"ok" if ready else "failing"}" title="{_e("; ".join(data["not_ready"]))}">
      {"ready" if ready else "not ready"}</span>
    <span id="updated" class="muted">as of {_e(_iso(now))}</span>
  </div>
</header>
<main>
<section class="tiles">
  <div class="tile"><h3>Hit ratio</h3><div class="big">{field(data, "totals.hit_ratio", "ratio", "hit-ratio")}</div>
    <div class="sub">hits {field(data, "totals.hits", "int", "hits")} ·
      misses {field(data, "totals.misses", "int", "misses")}</div></div>
  <div class="tile"><h3>Requests</h3><div class="big">{field(data, "totals.requests", "int", "requests")}</div>
    <div class="sub">errors {field(data, "totals.errors", "int", "errors")}</div></div>
  <div class="tile"><h3>Served from cache</h3>
    <div class="big cache">{field(data, "totals.bytes_cache", "bytes", "bytes-cache")}</div>
    <div class="sub">from upstream {field(data, "totals.bytes_upstream", "bytes", "bytes-upstream")}</div></div>
  <div class="tile"><h3>Store</h3><div class="big">{field(data, "store.bytes", "bytes", "store-bytes")}</div>
    {meter}
    <div class="sub">of {field(data, "store.max_size", "bytes", "store-max")} ·
      {field(data, "store.used_ratio", "ratio", "store-used")} ·
      {field(data, "store.entries", "int", "store-entries")} entries</div></div>
  <div class="tile"><h3>In-flight fetches</h3>
    <div class="big">{field(data, "inflight_fetches", "int", "inflight")}</div>
    <div class="sub">fetches and builds running ·
      {field(data, "connections.connections", "int", "connections")} connections</div></div>
</section>
<section class="charts">
  <div class="card"><h2>Bytes served, last hour</h2>
    <div class="legend"><i class="sw cache"></i>from cache <i class="sw upstream"></i>from upstream</div>
    <svg id="chart-bytes" class="chart" viewBox="0 0 600 180" preserveAspectRatio="none" role="img"
      aria-label="bytes served per interval over the last hour"></svg></div>
  <div class="card"><h2>Requests, last hour</h2>
    <div class="legend"><i class="sw cache"></i>hits <i class="sw upstream"></i>misses</div>
    <svg id="chart-requests" class="chart" viewBox="0 0 600 180" preserveAspectRatio="none" role="img"
      aria-label="hits and misses per interval over the last hour"></svg></div>
</section>
<noscript><p class="muted">The charts and live updates need JavaScript; reload for new figures.</p></noscript>
<section class="card wide"><h2>Remotes</h2>{table("remotes", data["remotes"], now, "No remotes are configured.")}</section>
<section class="card wide"><h2>Upstream health</h2>
  {table("upstreams", data["upstreams"], now, "No upstream has been contacted yet.")}</section>
{git_section}
</main>
<footer class="muted">Also as <a href="status.json">status.json</a> ·
  <a href="metrics">metrics</a> · <a href="ready">ready</a> · sampled every {_e(f"{data['history']['interval']:g}")} s{workers}</footer>
<script type="application/json" id="initial-status">{initial}</script>
<script>{SCRIPT}</script>
</body></html>
"""
    return page.encode("utf-8")


def respond(request: Any, data: Mapping[str, Any]) -> bytes:
    for name, value in HEADERS.items():
        request.setHeader(name, value)
    return render(data)


def wants_html(request: Any) -> bool:
    """Whether the request's Accept prefers text/html (named outright) to JSON.

    A browser's ``text/html,...,*/*;q=0.8`` does; no Accept, ``*/*``,
    ``application/json``, and a tie between the two (``application/json,
    text/html``) do not: API clients keep the JSON they always got."""
    raw = request.getHeader(b"accept") or b""
    header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    html: tuple[float, int] = (0.0, 0)
    json_: tuple[float, int] = (0.0, 0)
    for item in header.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = max(0.0, min(1.0, float(value)))
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == "text/html":
            html = max(html, (q, 2))
        elif media in ("application/json", "application/*", "*/*"):
            json_ = max(json_, (q, 2 if media == "application/json" else 1 if media == "application/*" else 0))
    return html[0] > 0 and html > json_
