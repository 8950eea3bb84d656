"""The status page in a real browser: headless Chromium (Debian's ``chromium``)
driven by Playwright (``playwright-core`` from npm, under
``$SPARKCACHE_TEST_NODE_MODULES``; ``.ci/run`` installs both).

A daemon (``twistd -n sparkcache``) serves a real upstream and mirrors a git
repository; after ``/ready`` says so, the test makes
misses, hits and upstream failures, loads ``/`` in Chromium, checks that the
page polls ``status.json`` and updates itself (a request made while the page
is open shows up), that nothing on it is blocked or failing (console errors
would include Content-Security-Policy violations), and that every figure it
shows equals what ``/metrics`` says. The screenshot is saved under
``$SPARKCACHE_TEST_ARTIFACTS`` (else the test's tmp dir) and its path printed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.client import get_until_hit
from tests.support.daemon import free_port
from tests.support.gha_client import node_modules_dir
from tests.support.git_upstream import FileUpstream
from tests.support.remotes import generic_remote
from tests.support.tools import require_installed, require_tool

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIELDS = ["hit-ratio", "hits", "misses", "requests", "errors", "bytes-cache", "bytes-upstream", "store-bytes",
          "store-max", "store-entries", "inflight"]

SCRIPT = r"""
const pw = await import(process.env.PLAYWRIGHT_CORE);
const {chromium} = pw.default ?? pw;
const [url, shot, userDataDir, extra] = process.argv.slice(2);
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM, headless: true, args: JSON.parse(process.env.CHROMIUM_ARGS),
  viewport: {width: 1360, height: 900}, deviceScaleFactor: 1,
});
const problems = [];
const page = context.pages()[0] ?? await context.newPage();
page.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") problems.push(m.text()); });
page.on("pageerror", (e) => problems.push(String(e)));
page.on("requestfailed", (r) => problems.push("failed: " + r.url()));
const requested = [];
page.on("request", (r) => requested.push(r.url()));
try {
  const response = await page.goto(url, {waitUntil: "load"});
  const contentType = response.headers()["content-type"];
  await page.waitForFunction(() => Number(document.body.dataset.polls || 0) >= 1, null, {timeout: 20000});
  const before = Number(await page.getAttribute("#hits", "data-value"));
  // One more hit while the page is open: its next poll must show it.
  const r = await fetch(extra);
  await r.arrayBuffer();
  await page.waitForFunction((n) => Number(document.getElementById("hits").dataset.value) > n, before,
                             {timeout: 20000});
  const figures = await page.evaluate((ids) => {
    const out = {};
    for (const id of ids) {
      const e = document.getElementById(id);
      out[id] = {value: e.dataset.value, text: e.textContent};
    }
    const rows = {};
    for (const tr of document.querySelectorAll("#table-remotes tbody tr[data-row]")) {
      const cells = {};
      for (const td of tr.querySelectorAll("td[data-key]")) cells[td.dataset.key] = {value: td.dataset.value ?? null, text: td.textContent};
      rows[tr.dataset.row] = cells;
    }
    const mirrors = [...document.querySelectorAll("#table-git tbody tr[data-row]")].map((tr) => tr.dataset.row);
    const upstreams = {};
    for (const tr of document.querySelectorAll("#table-upstreams tbody tr[data-row]")) {
      upstreams[tr.dataset.row] = tr.querySelector("td[data-key=state]").textContent;
    }
    return {figures: out, remotes: rows, upstreams, mirrors, polls: Number(document.body.dataset.polls),
            bars: Number(document.getElementById("chart-bytes").dataset.bars),
            ready: document.getElementById("ready").textContent.trim(), title: document.title};
  }, JSON.parse(process.env.FIELDS));
  await page.screenshot({path: shot, fullPage: true});
  console.log("RESULT " + JSON.stringify({...figures, contentType, problems, requested, before}));
} finally {
  await context.close();
}
"""


def require_playwright() -> Path:
    require_tool("node")
    require_tool("chromium", "Debian's chromium package (see .ci/run)")
    return require_installed(node_modules_dir() / "playwright-core" / "index.mjs", "playwright-core")


def artifact_dir(tmp_path: Path) -> Path:
    root = os.environ.get("SPARKCACHE_TEST_ARTIFACTS")
    d = Path(root) if root else tmp_path / "artifacts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def metrics_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_status_page_in_chromium(upstream, daemon_factory, tmp_path):
    entry = require_playwright()
    for name, size in (("a", 200_000), ("b", 1_500_000), ("c", 40_000)):
        upstream.add(f"/files/{name}.bin", os.urandom(size))
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    require_tool("git")
    repo = FileUpstream(tmp_path / "git-upstream", branch="main")
    d = daemon_factory({"files": generic_remote(upstream), "broken": generic_remote(dead)},
                       extra={"git": {"repos": {"gitops": repo.url}}})
    ready = d.get("/ready")
    assert ready.status == 200 and ready.json()["ready"] is True, ready.describe()

    for name in ("a", "b", "c"):
        assert d.get(f"/api/files/files/{name}.bin").status == 200
    # All three committed: the page's own request for c must be a hit (a request
    # that joins a fetch still finishing is a miss, and the page would wait for
    # its hit count to move in vain).
    for name in ("a", "b", "c"):
        get_until_hit(d, f"/api/files/files/{name}.bin")
    assert d.get("/api/broken/files/x.bin").status in (502, 504)

    shot = artifact_dir(tmp_path) / f"status-page-{os.getpid()}.png"
    script = tmp_path / "status-page.mjs"
    script.write_text(SCRIPT)
    env = {**os.environ, "PLAYWRIGHT_CORE": entry.as_uri(), "CHROMIUM": require_tool("chromium"),
           "CHROMIUM_ARGS": json.dumps(CHROMIUM_ARGS), "FIELDS": json.dumps(FIELDS)}
    proc = subprocess.run(["node", str(script), d.url("/"), str(shot), str(tmp_path / "chromium-profile"),
                           d.url("/api/files/files/c.bin")],
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"node exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    page: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    print(f"status page screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    # Nothing blocked, nothing failing, nothing fetched from anywhere but the daemon.
    assert page["problems"] == [], page["problems"]
    assert all(u.startswith(d.url("/")) for u in page["requested"]), page["requested"]
    assert page["contentType"] == "text/html; charset=utf-8" and page["title"] == "sparkcache status"
    assert page["polls"] >= 2 and page["ready"] == "ready"
    assert page["bars"] >= 1  # the chart drew the traffic since the first sample

    # The figures shown are /metrics' (no request reached a remote since the page's last poll).
    m = metrics_of(d.get("/metrics").body.decode())

    def total(name: str, label: str, values: tuple[str, ...], remote: str | None = None) -> float:
        return sum(v for (n, labels), v in m.items() if n == name and dict(labels)[label] in values
                   and (remote is None or dict(labels)["remote"] == remote))

    hits = total("sparkcache_requests_total", "result", ("hit", "stale", "revalidated"))
    misses = total("sparkcache_requests_total", "result", ("miss", "joined"))
    errors = total("sparkcache_requests_total", "result", ("error",))
    f = {k: v["value"] for k, v in page["figures"].items()}
    assert float(f["hits"]) == hits == page["before"] + 1 >= 3
    assert float(f["misses"]) == misses >= 3
    assert float(f["errors"]) == errors == 1
    assert float(f["requests"]) == total("sparkcache_requests_total", "result", ("hit", "stale", "revalidated", "miss",
                                                                              "joined", "error", "pass"))
    assert float(f["hit-ratio"]) == pytest.approx(hits / (hits + misses))
    assert page["figures"]["hit-ratio"]["text"] == f"{100 * hits / (hits + misses):.1f}%"
    assert float(f["bytes-cache"]) == total("sparkcache_served_bytes_total", "source", ("cache",)) > 0
    assert float(f["bytes-upstream"]) == total("sparkcache_served_bytes_total", "source", ("upstream",)) > 0
    assert float(f["store-bytes"]) == m[("sparkcache_store_bytes", ())] == 1_740_000
    assert float(f["store-entries"]) == m[("sparkcache_store_entries", ())] == 3
    assert float(f["inflight"]) == m[("sparkcache_inflight_fetches", ())] == 0
    assert float(f["store-max"]) == 50 * 2**30

    files = page["remotes"]["files"]
    assert float(files["hits"]["value"]) == total("sparkcache_requests_total", "result", ("hit",), "files") == hits
    assert float(files["misses"]["value"]) == total("sparkcache_requests_total", "result", ("miss", "joined"), "files")
    assert files["upstream"]["text"] == "\u2014"  # never failed
    broken = page["remotes"]["broken"]
    assert float(broken["errors"]["value"]) == 1 and broken["hit_ratio"]["text"] == "\u2014"
    assert broken["upstream"]["text"].startswith("upstream unreachable: " + dead), broken["upstream"]
    assert page["upstreams"] == {upstream.base_url: "ok", dead: "failing"}
    assert page["mirrors"] == ["gitops"]
