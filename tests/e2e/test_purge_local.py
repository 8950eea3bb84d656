"""Purge end to end, a real daemon (``twistd``) and a real upstream on
127.0.0.1: uploads and pushes survive every purge, deleting them is the
explicit ``DELETE /admin/local``, and a purge during a download keeps that
download from being stored."""

from __future__ import annotations

import hashlib
import threading
import time

from tests.support.client import assert_json_error, bearer, get_until_hit
from tests.support.remotes import generic_remote

ADMIN, WRITE = "adm-5ca1ab1e", "wrt-c0ffee00"
TOKENS = {"SPARKCACHE_ADMIN_TOKEN": ADMIN, "SPARKCACHE_WRITE_TOKEN": WRITE}
LAYER = b"layer of an image pushed here, and nowhere else" * 100


def test_uploads_and_pushes_survive_purges_until_deleted_one_by_one(upstream, daemon_factory):
    upstream.add("/files/a.bin", b"cached object")
    d = daemon_factory({"r": generic_remote(upstream), "uploads": {"type": "local"}, "images": {"type": "oci-local"}},
                       env=TOKENS)
    assert d.request("PUT", "/api/uploads/builds/42.tar", headers=bearer(WRITE), body=b"build 42").status == 201
    digest = "sha256:" + hashlib.sha256(LAYER).hexdigest()
    pushed = d.request("POST", f"/v2/images/app/blobs/uploads/?digest={digest}", headers=bearer(WRITE), body=LAYER)
    assert pushed.status == 201, pushed.describe()
    get_until_hit(d, "/api/r/files/a.bin", b"cached object")

    for purge in ("/admin/purge", "/admin/purge?remote=r"):
        resp = d.request("POST", purge, headers=bearer(ADMIN))
        assert resp.status == 200, resp.describe()
        assert d.get("/api/uploads/builds/42.tar").body == b"build 42"
        assert d.get(f"/v2/images/app/blobs/{digest}").body == LAYER
        assert d.get("/api/r/files/a.bin").header("X-Cache") == "MISS"  # the cached object was purged
        get_until_hit(d, "/api/r/files/a.bin", b"cached object")

    for purge in ("/admin/purge?remote=uploads", "/admin/purge?remote=images",
                  "/admin/purge?remote=uploads&path=builds/42.tar"):
        refused = d.request("POST", purge, headers=bearer(ADMIN))
        assert_json_error(refused, 400)
        assert "DELETE /admin/local" in refused.json()["error"], refused.describe()
    assert_json_error(d.request("DELETE", "/api/uploads/", headers=bearer(ADMIN)), 400)

    listed = d.get("/admin/local", headers=bearer(ADMIN)).json()
    assert {r["remote"] for r in listed["remotes"]} == {"uploads", "images"}
    gone = d.request("DELETE", "/admin/local?remote=uploads&path=builds/42.tar", headers=bearer(ADMIN))
    assert gone.status == 200 and gone.json() == {"deleted": 1}, gone.describe()
    assert_json_error(d.get("/api/uploads/builds/42.tar"), 404)
    assert d.get(f"/v2/images/app/blobs/{digest}").body == LAYER
    assert_json_error(d.request("POST", "/admin/purge?remote=r&path=%ff", headers=bearer(ADMIN)), 400)


def test_a_purge_during_a_download_keeps_it_from_being_stored(upstream, daemon_factory):
    body = bytes(range(256)) * 4096  # 1 MiB
    upstream.add("/files/big.bin", body)
    upstream.behave("/files/big.bin", pause_at=64 * 1024, times=1)
    d = daemon_factory({"r": generic_remote(upstream)}, env=TOKENS)
    got: dict[str, object] = {}

    def download() -> None:
        resp = d.get("/api/r/files/big.bin")
        got.update(status=resp.status, body=resp.body, cache=resp.header("X-Cache"))

    t = threading.Thread(target=download)
    t.start()
    try:
        upstream.wait_paused("/files/big.bin")
        purged = d.request("POST", "/admin/purge?remote=r", headers=bearer(ADMIN))
        assert purged.status == 200 and purged.json() == {"purged": 0}, purged.describe()
    finally:
        upstream.resume("/files/big.bin")
        t.join(60)
    assert got == {"status": 200, "body": body, "cache": "MISS"}
    idle(d)  # the download's commit (refused) is over: the next GET cannot join it
    # Not a HIT of what the purge was meant to drop: fetched again, and then kept.
    again = d.get("/api/r/files/big.bin")
    assert again.status == 200 and again.body == body and again.header("X-Cache") == "MISS", again.describe()
    get_until_hit(d, "/api/r/files/big.bin", body)
    assert upstream.count("/files/big.bin") == 2


def idle(d, timeout: float = 30.0) -> None:
    """Wait until the daemon has no fetch in progress."""
    deadline = time.monotonic() + timeout
    while d.get("/health").json()["inflight_fetches"]:
        assert time.monotonic() < deadline, "a fetch never ended"
        time.sleep(0.02)
