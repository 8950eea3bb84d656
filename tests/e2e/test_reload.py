"""Live configuration of the real daemon (``twistd sparkcache`` as a subprocess):
SIGHUP re-reads the file without dropping a download under way, a bad file
is logged and changes nothing, and a remote added through ``/admin/remotes``
is still there after a restart."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable

from tests.support.client import Fetch, sha256
from tests.support.daemon import Daemon
from tests.support.remotes import generic_remote

MiB = 1024 * 1024
ADMIN = "admin-e2e-3f1c9a"


def eventually(what: str, check: Callable[[], Any], d: Daemon, timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something true (the daemon reloads on its own time)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert d.running, f"the daemon died while waiting for {what}\n{d.log_tail()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout}s\n{d.log_tail()}"
        time.sleep(0.05)


def test_sighup_adds_a_remote_while_a_download_is_in_flight(upstream, daemon_factory):
    data = os.urandom(4 * MiB)
    upstream.add("/files/big.bin", data)
    upstream.add("/other/files/new.bin", b"served by the new remote")
    upstream.behave("/files/big.bin", pause_at=512 * 1024)
    d = daemon_factory({"r": generic_remote(upstream)})
    assert d.get("/api/new/files/new.bin").status == 404

    victim = Fetch(d.port, "/api/r/files/big.bin", timeout=60)
    victim.start()
    upstream.wait_paused("/files/big.bin")
    assert victim.got_headers.wait(30), "the download never started"

    d.remotes["new"] = generic_remote(upstream, prefix="/other")
    d.write_config()
    d.signal(signal.SIGHUP)
    resp = eventually("new remote", lambda: (r := d.get("/api/new/files/new.bin")).status == 200 and r, d)
    assert resp.body == b"served by the new remote"
    assert "new" in {r["name"] for r in d.get("/").json()["remotes"]}

    upstream.resume("/files/big.bin")
    got = victim.response(60)
    assert got.status == 200, got.describe()
    assert sha256(got.body) == sha256(data), "the download under way was cut or corrupted by the reload"
    assert d.running and "configuration applied" in d.log()
    # The old remote still serves, now from the store.
    assert d.get("/api/r/files/big.bin").body == data


def test_sighup_with_an_invalid_file_keeps_the_running_config(upstream, daemon_factory):
    upstream.add("/files/a.bin", b"still served")
    d = daemon_factory({"r": generic_remote(upstream)})
    good = d.config_path.read_text()
    d.config_path.write_text(good + "  broken:\n    type: generic\n    upstream: 12\n")
    d.signal(signal.SIGHUP)
    line = eventually("log line", lambda: next((ln for ln in d.log().splitlines() if "reload refused" in ln), None), d)
    assert str(d.config_path) in line and "remotes.broken.upstream" in line, line
    assert d.running
    resp = d.get("/api/r/files/a.bin")
    assert resp.status == 200 and resp.body == b"still served"
    assert {r["name"] for r in d.get("/").json()["remotes"]} == {"r"}

    # Listeners and the data dir change only at a restart: said in the log, the old ones kept.
    d.server["listen"] = ["tcp:0:interface=127.0.0.1"]
    d.remotes["s"] = generic_remote(upstream)
    d.write_config()
    d.signal(signal.SIGHUP)
    eventually("second remote", lambda: d.get("/api/s/files/a.bin").status == 200, d)
    assert "server.listen changed" in d.log() and "next restart" in d.log()
    assert d.get("/api/r/files/a.bin").status == 200  # still on the old port


def test_a_remote_added_through_the_api_survives_a_restart(upstream, daemon_factory):
    upstream.add("/files/x.bin", b"from the file's remote")
    upstream.add("/extra/files/y.bin", b"from the API's remote")
    d = daemon_factory({"r": generic_remote(upstream)}, env={"SPARKCACHE_ADMIN_TOKEN": ADMIN})
    admin = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    body = json.dumps(generic_remote(upstream, prefix="/extra")).encode()
    resp = d.request("PUT", "/admin/remotes/extra", admin, body)
    assert resp.status == 201, resp.describe()
    assert d.get("/api/extra/files/y.bin").body == b"from the API's remote"
    refused = d.request("PUT", "/admin/remotes/r", admin, body)
    assert refused.status == 409 and "cache.yaml" in refused.json()["error"], refused.describe()

    d.restart()
    listing = d.get("/admin/remotes", {"Authorization": f"Bearer {ADMIN}"}).json()
    assert {r["name"]: r["origin"] for r in listing["remotes"]} == {"r": "file", "extra": "api"}
    resp = d.get("/api/extra/files/y.bin")
    assert resp.status == 200 and resp.body == b"from the API's remote"
    # A reload keeps it too.
    d.signal(signal.SIGHUP)
    eventually("reload", lambda: d.log().count("configuration applied") >= 1, d)
    assert d.get("/api/extra/files/y.bin").status == 200
