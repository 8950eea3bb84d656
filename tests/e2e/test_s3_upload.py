"""Streamed uploads of large misses (store/s3/upload.py) end to end: a twistd
daemon on a real SeaweedFS (signatures checked) behind the fault proxy, a real
upstream that pauses mid-body, urllib clients.

- the parts of a large miss reach the bucket while its body is still
  downloading (the upstream paused halfway): to a temporary object, or
  straight to its name when the upstream announced its sha256
  (X-Checksum-Sha256); once it is complete the object is named by its
  sha256, no temporary object is left and no multipart upload is open;
- SeaweedFS killed while a large body (with a Content-Length) is mid-download
  and mid-upload: the download stops, the client's response is cut off,
  nothing is named by the digest, no spool is left; once SeaweedFS is back
  the next request is a MISS that stores the body (then a HIT).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support.client import Fetch, eventually, get_until_hit, sha256
from tests.support.daemon import Daemon
from tests.support.remotes import generic_remote
from tests.support.s3 import FaultProxy, SeaweedFS, boto_client, list_keys, make_bucket, s3_daemon_options

MiB = 1 << 20
PATH = "/files/big.bin"


@pytest.fixture
def s3_daemon(daemon_factory: Callable[..., Daemon]) -> Callable[..., Daemon]:
    def make(endpoint: str, bucket: str, remotes: dict[str, Any], **s3: Any) -> Daemon:
        # 5 MiB parts above 5 MiB; a short lease, so that one its holder could
        # not delete (the bucket down) does not hold the next fetch for long.
        return daemon_factory(remotes, **s3_daemon_options(endpoint, bucket, multipart_threshold="5MiB",
                                                           part_size="5MiB", lease_ttl="2s", sweep=False, **s3))

    return make


@pytest.fixture
def own_weed(tmp_path: Path) -> Iterator[SeaweedFS]:
    s = SeaweedFS(tmp_path / "weed").start()
    yield s
    s.kill()


def open_uploads(endpoint: str, bucket: str) -> list[str]:
    return [u["Key"] for u in boto_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def parts_sent(proxy: FaultProxy) -> int:
    return sum(1 for m, p in proxy.paths if m == "PUT" and "partNumber=" in p)


@pytest.mark.parametrize("announced", [False, True], ids=["digest-unknown", "x-checksum-sha256"])
def test_parts_go_up_while_the_body_downloads(upstream, s3_daemon, own_weed, announced):
    bucket = make_bucket(own_weed.endpoint)
    proxy = FaultProxy(own_weed.endpoint)
    try:
        data = os.urandom(24 * MiB + 7)
        upstream.add(PATH, data)
        # With its Content-Length; announced: with its sha256 too (as Artifactory sends it).
        headers = {"X-Checksum-Sha256": sha256(data)} if announced else {}
        upstream.behave(PATH, pause_at=16 * MiB, times=1, headers=headers)
        d = s3_daemon(proxy.endpoint, bucket, {"r": generic_remote(upstream)})
        f = Fetch(d.port, f"/api/r{PATH}", timeout=60)
        f.start()
        upstream.wait_paused(PATH, timeout=60)
        # The whole parts of the first 16 MiB go up while the upstream holds the rest.
        eventually(lambda: parts_sent(proxy) >= 3, timeout=60, message="no part went up during the download")
        uploading = open_uploads(own_weed.endpoint, bucket)
        # Straight to its name when the digest was announced; else to a temporary object.
        want = f"sc/cas/{sha256(data)}" if announced else "sc/tmp/"
        assert len(uploading) == 1 and uploading[0].startswith(want), uploading
        upstream.resume(PATH)
        f.join(60)
        assert isinstance(f.result, tuple) and f.result.status == 200, f.result
        assert sha256(f.result.body) == sha256(data) and f.result.header("X-Cache") == "MISS"
        get_until_hit(d, f"/api/r{PATH}", data, timeout=60)
        assert list(list_keys(own_weed.endpoint, bucket, "sc/cas/")) == [f"sc/cas/{sha256(data)}"]
        got = boto_client(own_weed.endpoint).get_object(Bucket=bucket, Key=f"sc/cas/{sha256(data)}")["Body"].read()
        assert got == data
        assert not list_keys(own_weed.endpoint, bucket, "sc/tmp/"), "the temporary object was left behind"
        assert open_uploads(own_weed.endpoint, bucket) == []
        assert parts_sent(proxy) == 5  # 4 x 5 MiB + the last 4 MiB, each sent once
        # A copy (a PUT of the name, no query) only for the body whose digest came at the end.
        copied = any(m == "PUT" and "?" not in p and p.endswith(f"sc/cas/{sha256(data)}") for m, p in proxy.paths)
        assert copied == (not announced) and any("/sc/tmp/" in p for _, p in proxy.paths) == (not announced)
    finally:
        proxy.stop()


def test_s3_killed_mid_download_and_upload_cuts_the_client_off(upstream, s3_daemon, tmp_path: Path):
    weed = SeaweedFS(tmp_path / "weed").start()  # killed, then started again on its port and data
    try:
        bucket = make_bucket(weed.endpoint)
        proxy = FaultProxy(weed.endpoint)
        size = 40 * MiB
        data = os.urandom(size)
        upstream.add(PATH, data)
        # A Content-Length body that stops at 30 MiB until resumed: the client
        # could read all it was sent, yet must see its response cut off.
        upstream.behave(PATH, pause_at=30 * MiB, times=1)
        d = s3_daemon(proxy.endpoint, bucket, {"r": generic_remote(upstream)})
        proxy.arm("PUT", "partNumber=4", "stall")  # in flight when SeaweedFS goes
        f = Fetch(d.port, f"/api/r{PATH}", timeout=60)
        f.start()
        upstream.wait_paused(PATH, timeout=60)
        eventually(lambda: any("partNumber=4" in p for _, p in proxy.paths), timeout=60,
                   message="the upload never reached its fourth part")
        weed.kill()
        proxy.released.set()  # part 4 now meets a dead server: the upload fails mid-download
        f.join(60)
        assert not f.is_alive(), "the client hung"
        cut = isinstance(f.result, BaseException) or f.result is None or len(f.result.body) < size
        assert cut, f"the response was not cut off: {f.result!r}"
        eventually(lambda: not d.spool_files(), timeout=30, message="a spool file was left behind")
        assert "upload to the bucket failed" in d.log() or "uploading" in d.log()
        upstream.resume(PATH)

        weed = SeaweedFS(tmp_path / "weed", port=weed.port).start()
        assert not list_keys(weed.endpoint, bucket, "sc/cas/"), "something was committed"
        # The bucket counts as down for a few seconds after the failure (misses
        # pass through); once it is writable again the big body is a MISS, stored.
        small = os.urandom(1024)
        upstream.add("/files/probe.bin", small)
        eventually(lambda: d.get("/api/r/files/probe.bin").header("X-Cache") == "MISS", timeout=60, interval=0.5,
                   message="the daemon never stored again after SeaweedFS came back")
        resp = d.get(f"/api/r{PATH}", timeout=60)
        assert resp.status == 200 and sha256(resp.body) == sha256(data), resp.describe()
        assert resp.header("X-Cache") == "MISS", resp.describe()
        get_until_hit(d, f"/api/r{PATH}", data, timeout=60)
        assert f"sc/cas/{sha256(data)}" in list_keys(weed.endpoint, bucket, "sc/cas/")
        # The upload that could not be aborted while SeaweedFS was down is aborted now.
        eventually(lambda: open_uploads(weed.endpoint, bucket) == [], timeout=30,
                   message="the failed multipart upload was never aborted")
        proxy.stop()
    finally:
        weed.kill()
