"""The ``sparkcache`` command line: argument parsing, tables and JSON, errors.

Commands run in-process (``main(argv, out, err, environ)``) against a tiny
local HTTP server that answers canned documents and records each request;
``config check`` validates real files. tests/e2e/test_cli.py runs every
command against a real daemon.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from sparkcache.cli import main, parser
from sparkcache.cli.client import EXIT_UNREACHABLE
from sparkcache.metrics import Metrics
from tests.support.daemon import free_port

TOKEN = "tok-5f2e91"


class Canned:
    """Answers: (method, path) → (status, content type, body); every request is recorded."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], tuple[int, str, bytes]] = {}
        self.seen: list[dict[str, Any]] = []

    def json(self, method: str, path: str, doc: Any, status: int = 200) -> None:
        self.answers[(method, path)] = (status, "application/json", json.dumps(doc).encode())

    def text(self, method: str, path: str, body: bytes, ctype: str = "text/plain", status: int = 200) -> None:
        self.answers[(method, path)] = (status, ctype, body)


@pytest.fixture
def daemon() -> Iterator[tuple[Canned, str]]:
    canned = Canned()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            path, _, query = self.path.partition("?")
            length = int(self.headers.get("Content-Length") or 0)
            canned.seen.append({"method": self.command, "path": path, "query": query,
                                "auth": self.headers.get("Authorization"),
                                "body": self.rfile.read(length) if length else b""})
            status, ctype, body = canned.answers.get(
                (self.command, path), (404, "application/json", b'{"error": "no such endpoint", "status": 404}'))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if path.startswith("/setup/"):
                self.send_header("X-Install-Path", "/etc/somewhere")
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield canned, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err, env or {})
    return code, out.getvalue(), err.getvalue()


def metrics_text() -> str:
    m = Metrics()
    for _ in range(3):
        m.response("files", "hit")
    m.response("files", "miss")
    m.response("pypi", "stale")
    m.bytes_counter("files", "cache")(3 * 1024)
    m.bytes_counter("files", "upstream")(1024)
    m.upstream("files", "200")
    m.upstream("files", "503")
    m.upstream("pypi", "timeout")
    return m.render().decode()


def status_daemon(canned: Canned) -> None:
    canned.json("GET", "/health", {"status": "ok", "store_bytes": 5 * 1024 * 1024, "store_entries": 7,
                                   "inflight_fetches": 2})
    canned.json("GET", "/", {"name": "sparkcache", "version": "9.9", "remotes": [
        {"name": "files", "type": "generic", "upstream": "http://up.example", "url": "/api/files/"}]})
    canned.text("GET", "/metrics", metrics_text().encode())


# -- arguments -------------------------------------------------------------------------------


def test_common_options_go_before_or_after_the_command() -> None:
    a = parser().parse_args(["--json", "--url", "http://a:1", "status"])
    b = parser().parse_args(["status", "--json", "--url", "http://a:1"])
    assert (a.json, a.url) == (b.json, b.url) == (True, "http://a:1")
    assert parser().parse_args(["status"]).json is False
    c = parser().parse_args(["purge", "--remote", "files", "--path", "a/b"])
    assert (c.remote, c.path, c.all) == ("files", "a/b", False)


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parser().parse_args([])
    assert e.value.code == 2


def test_url_and_token_from_the_environment(daemon: tuple[Canned, str]) -> None:
    canned, url = daemon
    status_daemon(canned)
    code, out, err = run("status", env={"SPARKCACHE_URL": url, "SPARKCACHE_ADMIN_TOKEN": TOKEN})
    assert code == 0, err
    assert {s["auth"] for s in canned.seen} == {f"Bearer {TOKEN}"}
    assert TOKEN not in out + err
    canned.seen.clear()
    # --token wins over the environment, SPARKCACHE_TOKEN over SPARKCACHE_ADMIN_TOKEN.
    run("status", "--token", "flag", env={"SPARKCACHE_URL": url, "SPARKCACHE_TOKEN": "env"})
    run("status", env={"SPARKCACHE_URL": url, "SPARKCACHE_TOKEN": "env", "SPARKCACHE_ADMIN_TOKEN": "admin"})
    assert [s["auth"] for s in canned.seen][::3] == ["Bearer flag", "Bearer env"]


def test_a_url_with_credentials_is_refused() -> None:
    code, out, err = run("status", "--url", f"http://ci:{TOKEN}@127.0.0.1:1")
    assert code == 1 and "--token" in err and TOKEN not in err


# -- status ----------------------------------------------------------------------------------


def test_status_table(daemon: tuple[Canned, str]) -> None:
    canned, url = daemon
    status_daemon(canned)
    code, out, err = run("status", "--url", url)
    assert code == 0, err
    assert "status:          ok\n" in out
    assert "store:           5.0 MiB in 7 entries\n" in out
    assert "in flight:       2\n" in out
    assert "requests:        5 (hit ratio 80.0%)\n" in out
    assert "served:          3.0 KiB from cache, 1.0 KiB from upstream\n" in out
    assert "upstream errors: 2\n" in out
    rows = [ln.split() for ln in out.split("\n\n", 1)[1].splitlines()]
    assert rows[0][0] == "REMOTE"
    assert rows[1] == ["files", "4", "75.0%", "3.0", "KiB", "1.0", "KiB", "1"]
    assert rows[2] == ["pypi", "1", "100.0%", "0", "B", "0", "B", "1"]


def test_status_json(daemon: tuple[Canned, str]) -> None:
    canned, url = daemon
    status_daemon(canned)
    code, out, _ = run("status", "--json", "--url", url)
    doc = json.loads(out)
    assert code == 0 and doc["version"] == "9.9" and doc["health"]["inflight_fetches"] == 2
    assert doc["totals"] == {"requests": 5, "from_cache": 4, "bytes_from_cache": 3072,
                             "bytes_from_upstream": 1024, "upstream_errors": 2}
    files = next(r for r in doc["remotes"] if r["remote"] == "files")
    assert files["results"] == {"hit": 3, "miss": 1}


def test_unreachable_daemon_is_one_line_and_exit_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run("status", "--url", url)
    assert code == EXIT_UNREACHABLE and out == ""
    assert err.startswith(f"sparkcache status: cannot reach the daemon at {url}: ") and err.count("\n") == 1


# -- remotes ---------------------------------------------------------------------------------


def test_remotes_from_the_admin_api(daemon: tuple[Canned, str]) -> None:
    canned, url = daemon
    canned.json("GET", "/admin/remotes", {"remotes": [
        {"name": "files", "type": "generic", "upstream": "http://up.example", "origin": "file"},
        {"name": "extra", "type": "deb", "upstream": "http://deb.example", "origin": "api"}],
        "not_in_effect": {"old": "its type is unknown"}})
    code, out, _ = run("remotes", "--url", url)
    lines = [ln.split() for ln in out.splitlines()]
    assert code == 0 and lines[0] == ["NAME", "TYPE", "UPSTREAM", "URL", "ORIGIN"]
    assert lines[1] == ["files", "generic", "http://up.example", "-", "file"]
    assert lines[2] == ["extra", "deb", "http://deb.example", "-", "api"]
    assert out.endswith("not in effect: old: its type is unknown\n")
    assert json.loads(run("remotes", "--json", "--url", url)[1])["remotes"][1]["origin"] == "api"


def test_remotes_fall_back_to_the_index(daemon: tuple[Canned, str]) -> None:
    canned, url = daemon
    status_daemon(canned)
    code, out, _ = run("remotes", "--url", url)
    assert code == 0 and out.splitlines()[1].split() == ["files", "generic", "http://up.example", "/api/files/", "file"]
    assert [s["path"] for s in canned.seen] == ["/admin/remotes", "/"]


# -- purge, prefetch -------------------------------------------------------------------------


def test_purge_sends_what_to_purge(daemon: tuple[Canned, str]) -> None:
    canned, url = daemon
    canned.json("POST", "/admin/purge", {"purged": 3})
    assert run("purge", "--url", url, "--remote", "files", "--path", "a b/c") == (
        0, "purged 3 entries from files:a b/c\n", "")
    assert canned.seen[-1]["query"] == "remote=files&path=a+b%2Fc"
    assert run("purge", "--url", url, "--all")[1] == "purged 3 entries from the cache\n"
    assert canned.seen[-1]["query"] == ""
    assert json.loads(run("purge", "--url", url, "--all", "--json")[1]) == {"purged": 3}


def test_purge_needs_a_target() -> None:
    code, _, err = run("purge")
    assert code == 2 and "--all" in err
    assert run("purge", "--path", "x")[0] == 2
    assert run("purge", "--all", "--remote", "x")[0] == 2


def test_a_daemon_error_shows_its_message(daemon: tuple[Canned, str]) -> None:
    canned, url = daemon
    canned.json("POST", "/admin/purge", {"error": "the admin scope is required", "status": 403}, status=403)
    code, out, err = run("purge", "--url", url, "--all")
    assert (code, out) == (1, "")
    assert err == "sparkcache purge: POST /admin/purge: 403 the admin scope is required\n"


def test_prefetch_posts_the_paths_and_fails_on_any_error(daemon: tuple[Canned, str], tmp_path: Path) -> None:
    canned, url = daemon
    canned.json("POST", "/api/files/", {"results": [
        {"path": "a.bin", "status": "cached", "code": 200, "size": 2048},
        {"path": "gone", "status": "error", "code": 404, "message": "upstream answered 404"}]})
    listing = tmp_path / "paths.txt"
    listing.write_text("# wanted\ngone\n\n")
    code, out, _ = run("prefetch", "--url", url, "files", "a.bin", "--from", str(listing))
    assert code == 1
    assert json.loads(canned.seen[-1]["body"]) == {"paths": ["a.bin", "gone"]}
    assert out.splitlines()[1].split() == ["a.bin", "cached", "200", "2.0", "KiB"]
    assert out.splitlines()[2].split()[:3] == ["gone", "error", "404"] and "upstream answered 404" in out
    assert out.endswith("1 cached, 1 failed\n")
    canned.json("POST", "/api/files/", {"results": [{"path": "a.bin", "status": "cached", "code": 200, "size": 1}]})
    assert run("prefetch", "--url", url, "files", "a.bin")[0] == 0
    assert run("prefetch", "--url", url, "files")[0] == 2


# -- git -------------------------------------------------------------------------------------


def test_repos_and_refresh(daemon: tuple[Canned, str]) -> None:
    canned, url = daemon
    canned.json("GET", "/repos", [{"name": "app", "url": "https://forge.example/app.git", "cloned": True,
                                   "last_fetch": None, "refs": 3, "size": 4096, "last_error": None}])
    code, out, _ = run("repos", "--url", url)
    assert code == 0 and out.splitlines()[1].split() == [
        "app", "https://forge.example/app.git", "yes", "never", "3", "4.0", "KiB", "-"]
    assert json.loads(run("repos", "--json", "--url", url)[1])["repos"][0]["refs"] == 3
    canned.json("POST", "/git/refresh", {"name": "app", "url": "https://forge.example/app.git",
                                         "refs": {"refs/heads/main": "a" * 40}})
    assert run("refresh", "--url", url, "app")[1] == "refreshed app from https://forge.example/app.git: 1 refs\n"
    assert canned.seen[-1]["query"] == "name=app"
    run("refresh", "--url", url, "https://forge.example/app.git")
    assert canned.seen[-1]["query"] == "repo=https%3A%2F%2Fforge.example%2Fapp.git"


# -- setup -----------------------------------------------------------------------------------


def test_setup_prints_the_snippet(daemon: tuple[Canned, str]) -> None:
    canned, url = daemon
    canned.text("GET", "/setup/apt", b"#!/bin/sh\necho hi\n", "text/x-shellscript; charset=utf-8")
    assert run("setup", "apt", "--url", url, "--remote", "debian", "--param", "x=1") == (0, "#!/bin/sh\necho hi\n", "")
    assert canned.seen[-1]["query"] == "remote=debian&x=1"
    doc = json.loads(run("setup", "apt", "--json", "--url", url)[1])
    assert doc == {"tool": "apt", "install_path": "/etc/somewhere", "body": "#!/bin/sh\necho hi\n",
                   "content_type": "text/x-shellscript; charset=utf-8"}
    code, _, err = run("setup", "podman", "--url", url)
    assert code == 1 and err == "sparkcache setup: GET /setup/podman: 404 no such endpoint\n"


# -- config check ----------------------------------------------------------------------------


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    good = tmp_path / "cache.yaml"
    good.write_text("storage: {data_dir: /var/lib/sparkcache}\n"
                    "remotes:\n  files: {type: generic, upstream: 'https://files.example'}\n"
                    "  debian: {type: deb, upstream: 'https://deb.mirror.example/debian'}\n")
    code, out, err = run("config", "check", str(good))
    assert (code, err) == (0, "")
    assert out == (f"{good}: OK: 2 remotes (1 deb, 1 generic), 0 git repos, "
                   "listen tcp:8090:interface=127.0.0.1, data_dir /var/lib/sparkcache\n")
    doc = json.loads(run("config", "check", "--json", str(good))[1])
    assert doc["valid"] is True and doc["types"] == {"deb": 1, "generic": 1}


def test_config_check_refuses_a_bad_file_with_the_daemons_error(tmp_path: Path) -> None:
    from sparkcache.config import ConfigError
    from sparkcache.protocols import load_config

    bad = tmp_path / "cache.yaml"
    bad.write_text("remotes:\n  files: {type: generic, upstream: 'https://files.example', colour: blue}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad), {})
    code, out, err = run("config", "check", str(bad))
    assert (code, out) == (1, "")
    assert err == f"configuration error: {e.value}\n" and "remotes.files.colour" in err
    missing = run("config", "check", str(tmp_path / "nope.yaml"))
    assert missing[0] == 1 and "cannot read" in missing[2]
