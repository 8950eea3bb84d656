"""What each ``sparkcache`` command asks the daemon, and how it prints the answer.

Every command takes the parsed arguments, a :class:`Client` and the output
stream, and returns the process's exit status. ``--json`` prints the
daemon's own documents (with a few figures summed up for ``status``);
without it, tables for people.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from sparkcache.cli import output
from sparkcache.cli.client import EXIT_ERROR, CLIError, Client, path_of

# Results of sparkcache_requests that were answered from the store.
CACHE_RESULTS = ("hit", "stale", "revalidated")


# -- status --------------------------------------------------------------------------------


def metrics_summary(text: str) -> dict[str, Any]:
    """Per-remote request counts, bytes by source and upstream errors from ``/metrics``."""
    remotes: dict[str, dict[str, Any]] = {}

    def slot(name: str) -> dict[str, Any]:
        return remotes.setdefault(name, {"remote": name, "requests": 0, "from_cache": 0, "results": {},
                                         "bytes_from_cache": 0, "bytes_from_upstream": 0, "upstream_errors": 0})

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_created",)):
                continue
            labels, value = sample.labels, int(sample.value)
            if sample.name == "sparkcache_requests_total":
                s = slot(labels.get("remote", "?"))
                s["requests"] += value
                s["results"][labels.get("result", "?")] = value
                if labels.get("result") in CACHE_RESULTS:
                    s["from_cache"] += value
            elif sample.name == "sparkcache_served_bytes_total":
                s = slot(labels.get("remote", "?"))
                key = "bytes_from_cache" if labels.get("source") == "cache" else "bytes_from_upstream"
                s[key] += value
            elif sample.name == "sparkcache_upstream_requests_total":
                status = labels.get("status", "")
                if not status.isdigit() or int(status) >= 500:
                    slot(labels.get("remote", "?"))["upstream_errors"] += value
    rows = sorted(remotes.values(), key=lambda r: r["remote"])
    totals = {k: sum(r[k] for r in rows) for k in
              ("requests", "from_cache", "bytes_from_cache", "bytes_from_upstream", "upstream_errors")}
    return {"totals": totals, "remotes": rows}


def status(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    health = client.get("/health").json()
    index = client.get("/").json()
    summary = metrics_summary(client.get("/metrics").text())
    doc = {"url": client.base, "version": index.get("version"), "health": health, **summary}
    if args.json:
        output.dump_json(doc, out)
        return 0
    t = summary["totals"]
    out.write(output.pairs([
        ("daemon", f"{client.base} (sparkcache {index.get('version', '?')})"),
        ("status", health.get("status")),
        ("store", f"{output.size(health.get('store_bytes'))} in {health.get('store_entries', '?')} entries"),
        ("in flight", health.get("inflight_fetches")),
        ("remotes", len(index.get("remotes") or [])),
        ("requests", f"{t['requests']} (hit ratio {output.ratio(t['from_cache'], t['requests'])})"),
        ("served", f"{output.size(t['bytes_from_cache'])} from cache, "
                   f"{output.size(t['bytes_from_upstream'])} from upstream"),
        ("upstream errors", t["upstream_errors"]),
    ]))
    if summary["remotes"]:
        out.write("\n" + output.table(
            [(r["remote"], r["requests"], output.ratio(r["from_cache"], r["requests"]),
              output.size(r["bytes_from_cache"]), output.size(r["bytes_from_upstream"]), r["upstream_errors"])
             for r in summary["remotes"]],
            ["REMOTE", "REQUESTS", "HIT RATIO", "FROM CACHE", "FROM UPSTREAM", "UPSTREAM ERRORS"]))
    return 0


# -- remotes -------------------------------------------------------------------------------


def remote_list(doc: Any) -> list[dict[str, Any]]:
    """Remotes from ``GET /admin/remotes`` (a list, ``{"remotes": [...]}`` or name → remote) or ``GET /``."""
    if isinstance(doc, dict) and "remotes" in doc:
        doc = doc["remotes"]
    if isinstance(doc, dict):
        doc = [{"name": name, **(r if isinstance(r, dict) else {})} for name, r in doc.items()]
    if not isinstance(doc, list):
        raise CLIError("the daemon's list of remotes is not a list")
    return [r for r in doc if isinstance(r, dict)]


def remotes(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    reply = client.get("/admin/remotes", ok=(404, 405))
    skipped: dict[str, Any] = {}
    if reply.status in (404, 405):
        # A daemon without the runtime remotes API: its index lists the remotes
        # of its file, and so where each one comes from.
        found = [{**r, "origin": "file"} for r in remote_list(client.get("/").json())]
    else:
        doc = reply.json()
        found = remote_list(doc)
        # API remotes the file no longer composes with: kept, but not served.
        if isinstance(doc, dict) and isinstance(doc.get("not_in_effect"), dict):
            skipped = doc["not_in_effect"]
    if args.json:
        output.dump_json({"remotes": found, "not_in_effect": skipped}, out)
        return 0
    rows = [(r.get("name"), r.get("type"), _upstream(r), r.get("url"), r.get("origin")) for r in found]
    out.write(output.table(rows, ["NAME", "TYPE", "UPSTREAM", "URL", "ORIGIN"]) if rows else "no remotes\n")
    for name, why in sorted(skipped.items()):
        out.write(f"not in effect: {name}: {why}\n")
    return 0


def _upstream(r: dict[str, Any]) -> Any:
    up = r.get("upstream")
    if up is None and isinstance(r.get("config"), dict):
        up = r["config"].get("upstream")
    return up


# -- purge ---------------------------------------------------------------------------------


def purge(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    if args.remote is None and not args.all:
        raise CLIError("say what to purge: --remote NAME [--path PATH], or --all for the whole cache",
                       exit_code=2)
    if args.all and args.remote is not None:
        raise CLIError("--all purges everything: give it without --remote", exit_code=2)
    if args.path is not None and args.remote is None:
        raise CLIError("--path needs --remote", exit_code=2)
    doc = client.post("/admin/purge", {"remote": args.remote, "path": args.path}).json()
    if args.json:
        output.dump_json(doc, out)
        return 0
    what = "the cache" if args.all else (f"{args.remote}:{args.path}" if args.path else f"remote {args.remote}")
    out.write(f"purged {doc.get('purged', 0)} entries from {what}\n")
    return 0


# -- prefetch ------------------------------------------------------------------------------


def prefetch(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    paths = list(args.paths)
    if args.from_file:
        paths += read_paths(args.from_file)
    if not paths:
        raise CLIError("give the paths to prefetch as arguments or with --from FILE", exit_code=2)
    doc = client.post(path_of("api", args.remote) + "/", body={"paths": paths}).json()
    results = doc.get("results") or []
    failed = [r for r in results if r.get("status") != "cached"]
    if args.json:
        output.dump_json(doc, out)
    else:
        rows = [(r.get("path"), r.get("status"), r.get("code"),
                 output.size(r.get("size")) if r.get("status") == "cached" else r.get("message"))
                for r in results]
        out.write(output.table(rows, ["PATH", "STATUS", "CODE", "SIZE / ERROR"]))
        out.write(f"{len(results) - len(failed)} cached, {len(failed)} failed\n")
    return EXIT_ERROR if failed else 0


def read_paths(name: str) -> list[str]:
    """One path a line (``-`` is stdin); blank lines and ``#`` comments skipped."""
    try:
        if name == "-":
            text = sys.stdin.read()
        else:
            with open(name, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise CLIError(f"cannot read {name}: {e.strerror}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# -- git -----------------------------------------------------------------------------------


def repos(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    found = client.get("/repos").json()
    if not isinstance(found, list):
        raise CLIError("the daemon's list of repositories is not a list")
    if args.json:
        output.dump_json({"repos": found}, out)
        return 0
    rows = [(r.get("name"), r.get("url"), r.get("cloned"), output.age(r.get("last_fetch")), r.get("refs"),
             output.size(r.get("size")), r.get("last_error")) for r in found]
    out.write(output.table(rows, ["NAME", "UPSTREAM", "CLONED", "LAST FETCH", "REFS", "SIZE", "LAST ERROR"])
              if rows else "no repositories\n")
    return 0


def refresh(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    # A URL is looked up among the mirrors by upstream; anything else is a name.
    key = "repo" if "://" in args.repo or "@" in args.repo else "name"
    doc = client.post("/git/refresh", {key: args.repo}).json()
    if args.json:
        output.dump_json(doc, out)
        return 0
    refs = doc.get("refs")
    count = len(refs) if isinstance(refs, (list, dict)) else refs
    out.write(f"refreshed {doc.get('name')} from {doc.get('url')}: {output.cell(count)} refs\n")
    return 0


# -- setup ---------------------------------------------------------------------------------


def setup(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    query: dict[str, str | None] = {"remote": args.remote, "registry": args.registry}
    for item in args.param or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CLIError(f"--param takes NAME=VALUE, not {item!r}", exit_code=2)
        query[name] = value
    reply = client.get(path_of("setup", args.tool), query)
    if args.json:
        output.dump_json({"tool": args.tool, "install_path": reply.header("X-Install-Path"),
                          "content_type": reply.header("Content-Type"), "body": reply.text()}, out)
        return 0
    out.write(reply.text())
    return 0
