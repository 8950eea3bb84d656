"""The status page's inline style and script (no external asset, no CDN).

Both are constants so that the page's Content-Security-Policy can allow
exactly them by hash (see :mod:`sparkcache.web.status_page`). The script's
``fmt`` formats as ``status_page.fmt`` does on the server; it sets every value
as text (``textContent``), never as markup.
"""

from __future__ import annotations

STYLE = """
:root { --bg: #f5f6f8; --card: #fff; --ink: #1c2430; --muted: #667085; --line: #e4e7ec;
  --cache: #12a37f; --upstream: #e59a1c; --bad: #c4320a; --ok: #12a37f; --accent: #2f5fd0; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { display: flex; justify-content: space-between; align-items: center; padding: 14px 28px;
  background: #16202e; color: #fff; }
.brand { font-size: 18px; font-weight: 650; letter-spacing: .2px; }
.version { font-size: 12px; font-weight: 500; color: #9fb0c8; margin-left: 6px; }
.meta { display: flex; gap: 14px; align-items: center; }
header .muted { color: #9fb0c8; }
main { padding: 22px 28px; max-width: 1400px; margin: 0 auto; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 14px; margin-bottom: 14px; }
.tile, .card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px;
  box-shadow: 0 1px 2px rgba(16, 24, 40, .04); }
.tile h3, .card h2 { margin: 0 0 6px; font-size: 12px; font-weight: 600; text-transform: uppercase;
  letter-spacing: .6px; color: var(--muted); }
.big { font-size: 28px; font-weight: 650; font-variant-numeric: tabular-nums; }
.big.cache { color: var(--cache); }
.sub { color: var(--muted); font-size: 13px; margin-top: 2px; font-variant-numeric: tabular-nums; }
progress { width: 100%; height: 6px; margin: 6px 0 2px; border: 0; border-radius: 3px; overflow: hidden;
  background: var(--line); appearance: none; }
progress::-webkit-progress-bar { background: var(--line); }
progress::-webkit-progress-value { background: var(--accent); }
progress::-moz-progress-bar { background: var(--accent); }
progress.full::-webkit-progress-value { background: var(--bad); }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 14px; margin-bottom: 14px; }
.chart { width: 100%; height: auto; display: block; }
.chart .grid { stroke: var(--line); stroke-width: 1; }
.chart text { fill: var(--muted); font-size: 11px; }
.chart .a { fill: var(--cache); }
.chart .b { fill: var(--upstream); }
.legend { color: var(--muted); font-size: 12px; margin-bottom: 6px; }
.sw { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin: 0 4px 0 10px; vertical-align: -1px; }
.sw.cache { background: var(--cache); margin-left: 0; }
.sw.upstream { background: var(--upstream); }
.wide { margin-bottom: 14px; overflow-x: auto; }
table { width: 100%; border-collapse: collapse; font-size: 13px; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12px; padding: 7px 10px;
  border-bottom: 1px solid var(--line); white-space: nowrap; }
td { padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
tbody tr:last-child td { border-bottom: 0; }
tbody tr:hover { background: #f9fafb; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.bad { color: var(--bad); }
tr.empty td { color: var(--muted); text-align: center; padding: 14px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12px; font-weight: 600;
  background: #eef0f3; color: var(--muted); }
.badge.ok { background: #e3f6ef; color: #0b7a5e; }
.badge.failing { background: #fde8e1; color: var(--bad); }
.muted { color: var(--muted); }
footer { padding: 6px 28px 24px; max-width: 1400px; margin: 0 auto; font-size: 12px; }
a { color: var(--accent); }
"""

SCRIPT = """
(function () {
  "use strict";
  var UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  var SVG = "http://www.w3.org/2000/svg";
  var POLL_MS = 5000;
  var polls = 0;

  function fmtBytes(n) {
    var i = 0;
    while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
    return i === 0 ? Math.trunc(n) + " B" : n.toFixed(1) + " " + UNITS[i];
  }
  function fmtAgo(t, now) {
    if (t === null || t === undefined) { return "never"; }
    var d = now - t, future = d < 0, text;
    d = Math.abs(d);
    if (d < 1) { return "now"; }
    if (d < 90) { text = d.toFixed(0) + "s"; }
    else if (d < 5400) { text = (d / 60).toFixed(0) + "m"; }
    else if (d < 172800) { text = (d / 3600).toFixed(0) + "h"; }
    else { text = (d / 86400).toFixed(0) + "d"; }
    return future ? "in " + text : text + " ago";
  }
  function fmt(kind, v, now) {
    var none = v === null || v === undefined;
    switch (kind) {
      case "int": return none ? "\\u2014" : Math.trunc(v).toLocaleString("en-US");
      case "bytes": return none ? "\\u2014" : fmtBytes(v);
      case "ratio": return none ? "\\u2014" : (100 * v).toFixed(1) + "%";
      case "ago": return fmtAgo(none ? null : v, now);
      case "list": return (v || []).join(", ");
      case "error": return (!v || !v.last_error) ? "\\u2014" : v.last_error + " (" + fmtAgo(v.last_failure, now) + ")";
      default: return (none || v === "") ? "\\u2014" : String(v);
    }
  }
  function iso(t) { return new Date(t * 1000).toISOString().replace("T", " ").replace(/\\.\\d+Z$/, " UTC"); }
  function lookup(data, path) {
    return path.split(".").reduce(function (o, k) { return (o && typeof o === "object") ? o[k] : undefined; }, data);
  }
  function raw(v) { return (v === null || v === undefined) ? "" : JSON.stringify(v); }
  var NUMERIC = {"int": 1, "bytes": 1, "ratio": 1, "ago": 1};

  function cell(col, row, now) {
    var td = document.createElement("td"), v = lookup(row, col.key), text = fmt(col.kind, v, now);
    td.dataset.key = col.key;
    if (NUMERIC[col.kind]) {
      td.dataset.value = raw(v);
      td.className = "num";
      if (col.kind === "ago" && v !== null && v !== undefined) { td.title = iso(v); }
    }
    if (col.kind === "state") {
      var b = document.createElement("span");
      b.className = "badge " + (v || "");
      b.textContent = text;
      td.appendChild(b);
    } else if (col.kind === "code") {
      var c = document.createElement("code");
      c.textContent = text;
      td.appendChild(c);
    } else {
      if (col.kind === "error" && v && v.state === "failing") { td.className = "bad"; }
      td.textContent = text;
    }
    return td;
  }
  function fillTable(table, rows, now) {
    var cols = JSON.parse(table.dataset.columns), body = document.createElement("tbody");
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      tr.dataset.row = row.name || row.origin || "";
      cols.forEach(function (col) { tr.appendChild(cell(col, row, now)); });
      body.appendChild(tr);
    });
    if (!rows.length) {
      var tr = document.createElement("tr"), td = document.createElement("td");
      tr.className = "empty";
      td.colSpan = cols.length;
      td.textContent = table.dataset.empty;
      tr.appendChild(td);
      body.appendChild(tr);
    }
    table.replaceChild(body, table.tBodies[0]);
  }

  function el(name, attrs, text) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  // A round top for the axis: 1, 2, 5 x a power of ten (of 1024ths for bytes).
  function niceMax(v, binary) {
    if (v <= 0) { return binary ? 1024 : 10; }
    if (!binary && v < 2) { return 2; }
    var unit = 1;
    if (binary) { while (v / unit >= 1024) { unit *= 1024; } v /= unit; }
    var p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p * unit;
  }
  // Stacked bars of what two cumulative columns (a, b) grew by between samples.
  function drawChart(svg, points, a, b, label, binary) {
    var W = 600, H = 190, L = 62, R = 8, T = 8, B = 22, span = 3600;
    var end = points[points.length - 1][0], start = end - span;
    var bars = [], top = 0;
    for (var i = 1; i < points.length; i++) {
      var p = points[i - 1], q = points[i];
      if (q[0] <= p[0] || q[0] <= start) { continue; }
      var da = Math.max(0, q[a] - p[a]), db = Math.max(0, q[b] - p[b]);
      bars.push([Math.max(p[0], start), q[0], da, db]);
      top = Math.max(top, da + db);
    }
    var max = niceMax(top, binary);
    function x(t) { return L + (t - start) / span * (W - L - R); }
    function y(v) { return T + (1 - v / max) * (H - T - B); }
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    [0, 0.5, 1].forEach(function (f) {
      svg.appendChild(el("line", {"class": "grid", x1: L, x2: W - R, y1: y(f * max), y2: y(f * max)}));
      svg.appendChild(el("text", {x: L - 6, y: y(f * max) + 4, "text-anchor": "end"}, label(f * max)));
    });
    [60, 45, 30, 15, 0].forEach(function (m) {
      svg.appendChild(el("text", {x: x(end - m * 60), y: H - 6, "text-anchor": m === 60 ? "start" : m === 0 ? "end" : "middle"},
                         m === 0 ? "now" : "\\u2212" + m + " min"));
    });
    bars.forEach(function (bar) {
      var x0 = x(bar[0]), w = Math.max(2, x(bar[1]) - x0 - 1);
      x0 = Math.min(x0, W - R - w);
      if (bar[2] > 0) { svg.appendChild(el("rect", {"class": "a", x: x0, width: w, y: y(bar[2]), height: y(0) - y(bar[2])})); }
      if (bar[3] > 0) {
        svg.appendChild(el("rect", {"class": "b", x: x0, width: w, y: y(bar[2] + bar[3]), height: y(bar[2]) - y(bar[2] + bar[3])}));
      }
    });
    svg.dataset.bars = String(bars.length);
  }
  function countLabel(v) { return Number.isInteger(v) ? v.toLocaleString("en-US") : v.toFixed(1); }

  function update(data) {
    var now = data.time;
    document.body.dataset.time = String(now);
    document.querySelectorAll("[data-field]").forEach(function (e) {
      var v = lookup(data, e.dataset.field);
      e.textContent = fmt(e.dataset.kind, v, now);
      e.dataset.value = raw(v);
    });
    var ready = document.getElementById("ready");
    ready.textContent = data.ready ? "ready" : "not ready";
    ready.className = "badge " + (data.ready ? "ok" : "failing");
    ready.title = data.not_ready.join("; ");
    document.getElementById("updated").textContent = "as of " + iso(now);
    var meter = document.getElementById("store-meter");
    if (meter && data.store.used_ratio !== null) {
      meter.value = Math.min(1, data.store.used_ratio);
      meter.className = data.store.used_ratio >= 0.95 ? "full" : "";
    }
    var tables = {remotes: data.remotes, upstreams: data.upstreams, git: data.git ? data.git.mirrors : []};
    document.querySelectorAll("table[data-table]").forEach(function (t) { fillTable(t, tables[t.dataset.table], now); });
    var h = data.history, tot = data.totals;
    var points = h.samples.concat([[now, tot.hits, tot.misses, tot.bytes_cache, tot.bytes_upstream]]);
    drawChart(document.getElementById("chart-bytes"), points, 3, 4, fmtBytes, true);
    drawChart(document.getElementById("chart-requests"), points, 1, 2, countLabel, false);
  }

  function poll() {
    fetch("status.json", {cache: "no-store", credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (data) { update(data); polls++; document.body.dataset.polls = String(polls); })
      .catch(function (e) {
        var u = document.getElementById("updated");
        u.textContent = "disconnected (" + e.message + "); showing " + u.textContent.replace(/^.*as of /, "");
      })
      .then(function () { setTimeout(poll, POLL_MS); });
  }

  update(JSON.parse(document.getElementById("initial-status").textContent));
  document.body.dataset.rendered = "1";
  poll();
})();
"""
