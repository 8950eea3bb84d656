"""type: oci-local end to end: skopeo pushes into the daemon and pulls back out,
chunked uploads over raw HTTP through the real /v2/ router, and the token
handshake registry clients need before they send credentials."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess

import pytest

from tests.support.client import bearer, eventually, get_until_hit
from tests.support.oci_images import build_image
from tests.support.remotes import generic_remote
from tests.support.tools import require_tool, run_checked

WRITE = "oci-wr-3b9f0c71"
READ = "oci-rd-c2a81e55"
TOKENS = {"SPARKCACHE_WRITE_TOKEN": WRITE, "SPARKCACHE_READ_TOKEN": READ}
REMOTES = {"loc": {"type": "oci-local"}}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_error(resp, status: int, code: str) -> None:
    assert resp.status == status, resp.describe()
    assert resp.json()["errors"][0]["code"] == code, resp.describe()


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory(REMOTES, env=TOKENS)


def test_skopeo_push_then_pull_back(daemon, tmp_path):
    skopeo = require_tool("skopeo")
    image = build_image(tmp_path / "src", "v1", [300_000, 120_000, 5_000], seed=7)
    dest = f"docker://127.0.0.1:{daemon.port}/loc/team/app:v1"
    run_checked([skopeo, "copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds", f"ci:{WRITE}",
                 image.ref, dest], timeout=60)
    head = daemon.head("/v2/loc/team/app/manifests/v1")
    assert head.status == 200 and head.header("Docker-Content-Digest") == image.manifest_digest, head.describe()
    # Back out, anonymously (anonymous_read is on): the same manifest, byte for byte, and the same blobs.
    out = tmp_path / "out"
    run_checked([skopeo, "copy", "--src-tls-verify=false", dest, f"dir:{out}"], timeout=60)
    assert sha((out / "manifest.json").read_bytes()) == image.manifest_digest
    for digest in (image.config_digest, *image.layer_digests):
        assert sha((out / digest.split(":")[1]).read_bytes()) == digest
    # By digest, and listed.
    raw = run_checked([skopeo, "inspect", "--raw", "--tls-verify=false",
                       f"docker://127.0.0.1:{daemon.port}/loc/team/app@{image.manifest_digest}"]).stdout
    assert sha(raw.encode()) == image.manifest_digest
    tags = daemon.get("/v2/loc/team/app/tags/list")
    assert tags.json() == {"name": "loc/team/app", "tags": ["v1"]}, tags.describe()


def test_skopeo_push_without_credentials_is_refused(daemon, tmp_path):
    skopeo = require_tool("skopeo")
    image = build_image(tmp_path / "src", "v1", [10_000], seed=8)
    proc = subprocess.run(
        [skopeo, "copy", "--dest-tls-verify=false", image.ref, f"docker://127.0.0.1:{daemon.port}/loc/app:v1"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "unauthorized" in proc.stderr.lower() or "authentication required" in proc.stderr.lower(), proc.stderr
    assert daemon.head("/v2/loc/app/manifests/v1").status == 404


def test_missing_or_read_only_token_gets_oci_errors(daemon):
    resp = daemon.request("POST", "/v2/loc/app/blobs/uploads/")
    oci_error(resp, 401, "UNAUTHORIZED")
    challenge = resp.header("WWW-Authenticate") or ""
    assert challenge.startswith(f'Bearer realm="http://127.0.0.1:{daemon.port}/setup/token"'), resp.describe()
    assert 'scope="repository:loc/app:pull,push"' in challenge
    oci_error(daemon.request("POST", "/v2/loc/app/blobs/uploads/", headers=bearer(READ)), 403, "DENIED")
    oci_error(daemon.request("PUT", "/v2/loc/app/manifests/v1", headers=bearer("nope"), body=b"{}"), 401, "UNAUTHORIZED")


def test_login_handshake(daemon):
    # The ping challenges clients without credentials, so pushers learn where to log in.
    ping = daemon.get("/v2/")
    oci_error(ping, 401, "UNAUTHORIZED")
    assert "/setup/token" in (ping.header("WWW-Authenticate") or "")
    basic = "Basic " + base64.b64encode(f"ci:{WRITE}".encode()).decode()
    tok = daemon.get("/setup/token?service=sparkcache&scope=repository:loc/app:pull,push", headers={"Authorization": basic})
    assert tok.status == 200, tok.describe()
    assert daemon.get("/v2/", headers=bearer(tok.json()["token"])).status == 200
    # Clients without credentials get the anonymous token, good for reads only.
    anon = daemon.get("/setup/token?service=sparkcache").json()["token"]
    assert daemon.get("/v2/", headers=bearer(anon)).status == 200
    oci_error(daemon.request("POST", "/v2/loc/app/blobs/uploads/", headers=bearer(anon)), 401, "UNAUTHORIZED")
    # Wrong credentials are refused at the token endpoint; OAuth2 form posts work too.
    bad = "Basic " + base64.b64encode(b"ci:wrong").decode()
    assert daemon.get("/setup/token", headers={"Authorization": bad}).status == 401
    form = daemon.request("POST", "/setup/token", body=f"grant_type=password&username=ci&password={WRITE}".encode(),
                          headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    assert form.status == 200 and form.json()["access_token"] == WRITE, form.describe()


def test_chunked_upload_through_the_router(daemon):
    data = bytes(range(256)) * 2048  # 512 KiB
    auth = bearer(WRITE)
    start = daemon.request("POST", "/v2/loc/raw/blobs/uploads/", headers=auth)
    assert start.status == 202 and start.header("Range") == "0-0", start.describe()
    loc = start.header("Location")
    assert loc.startswith("/v2/loc/raw/blobs/uploads/") and start.header("Docker-Upload-UUID") in loc
    off = 0
    for size in (100_000, 200_000, len(data) - 300_000):
        chunk = data[off:off + size]
        resp = daemon.request("PATCH", loc, body=chunk,
                              headers={**auth, "Content-Range": f"{off}-{off + size - 1}",
                                       "Content-Type": "application/octet-stream"})
        assert resp.status == 202, resp.describe()
        off += size
        assert resp.header("Range") == f"0-{off - 1}"
        loc = resp.header("Location")
    oci_error(daemon.request("PATCH", loc, body=b"x", headers={**auth, "Content-Range": "0-0"}), 416, "RANGE_INVALID")
    done = daemon.request("PUT", f"{loc}?digest={sha(data)}", headers=auth)
    assert done.status == 201 and done.header("Docker-Content-Digest") == sha(data), done.describe()
    assert done.header("Location") == f"/v2/loc/raw/blobs/{sha(data)}"
    got = daemon.get(f"/v2/loc/raw/blobs/{sha(data)}")
    assert got.status == 200 and got.body == data
    part = daemon.get(f"/v2/loc/raw/blobs/{sha(data)}", headers={"Range": "bytes=1000-1999"})
    assert part.status == 206 and part.body == data[1000:2000]
    # A manifest naming it (and a config) can now be pushed; naming anything else cannot.
    config = b'{"architecture":"amd64","os":"linux"}'
    assert daemon.request("POST", f"/v2/loc/raw/blobs/uploads/?digest={sha(config)}", body=config, headers=auth).status == 201
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(data), "size": len(data)}],
    }).encode()
    ct = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    put = daemon.request("PUT", "/v2/loc/raw/manifests/latest", body=manifest, headers={**auth, **ct})
    assert put.status == 201 and put.header("Docker-Content-Digest") == sha(manifest), put.describe()
    other = manifest.replace(sha(data).encode(), sha(b"missing").encode())
    oci_error(daemon.request("PUT", "/v2/loc/raw/manifests/bad", body=other, headers={**auth, **ct}), 404,
              "MANIFEST_BLOB_UNKNOWN")
    got = daemon.get("/v2/loc/raw/manifests/latest", headers={"Accept": ct["Content-Type"]})
    assert got.body == manifest and got.header("Content-Type") == ct["Content-Type"]


def test_pushed_content_survives_a_restart(daemon):
    data = b"persistent layer"
    assert daemon.request("POST", f"/v2/loc/keep/blobs/uploads/?digest={sha(data)}", body=data,
                          headers=bearer(WRITE)).status == 201
    daemon.restart()
    got = daemon.get(f"/v2/loc/keep/blobs/{sha(data)}")
    assert got.status == 200 and got.body == data, got.describe()


def test_pushed_content_is_not_evicted(upstream, daemon_factory):
    """Over max_size, eviction drops cached bodies but never what was pushed (it exists nowhere else)."""
    upstream.add("/files/big.bin", b"c" * 30_000)
    d = daemon_factory({**REMOTES, "r": generic_remote(upstream)}, env=TOKENS,
                       storage={"max_size": "20KiB", "eviction_interval": "0.2s"})
    pushed = b"p" * 25_000
    assert d.request("POST", f"/v2/loc/keep/blobs/uploads/?digest={sha(pushed)}", body=pushed,
                     headers=bearer(WRITE)).status == 201
    get_until_hit(d, "/api/r/files/big.bin", b"c" * 30_000)
    eventually(lambda: d.get("/api/r/").json()["entries"] == [], message="the cached body was never evicted")
    got = d.get(f"/v2/loc/keep/blobs/{sha(pushed)}")
    assert got.status == 200 and got.body == pushed, got.describe()
