"""A real wget through a generic remote.

wget runs with no configuration file (``--no-config``), no proxy, one try and
a private HOME, and prints the response headers it got (``-S``) so the tests
can see ``X-Cache`` and the status line. Covered: a download and its cache
HIT, resuming a partial file with ``wget -c`` (``Range`` → ``206``), and a
path outside the remote's patterns (``403``, wget exit code 8).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.client import eventually
from tests.support.remotes import generic_remote
from tests.support.tools import require_tool

REMOTE = "gh"
WGET_SERVER_ERROR = 8  # wget(1) EXIT STATUS: "Server issued an error response."


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Wget:
    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("WGET")}
        self.env.update({"HOME": str(base), "LC_ALL": "C", "LANG": "C"})

    def run(self, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["wget", "--no-config", "--no-proxy", "--tries=1", "--timeout=20", "-S", *args]
        proc = subprocess.run(cmd, cwd=cwd or self.base, env=self.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc


def _responses(stderr: str) -> list[dict[str, str]]:
    """The server responses ``wget -S`` printed: status line and headers (lower-cased names) each."""
    out: list[dict[str, str]] = []
    for line in stderr.splitlines():
        m = re.match(r"^\s+HTTP/\d(?:\.\d)? (\d{3})", line)
        if m:
            out.append({":status": m.group(1)})
            continue
        m = re.match(r"^\s+([A-Za-z0-9-]+): (.*)$", line)
        if m and out:
            out[-1][m.group(1).lower()] = m.group(2).strip()
    return out


def _last_response(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    got = _responses(proc.stderr)
    assert got, f"wget -S printed no server response:\n{proc.stderr}"
    return got[-1]


def _cached(d, path: str) -> bool:
    """The remote's listing (docs/http-api.rst) shows ``path`` as a committed entry."""
    resp = d.get(f"/api/{REMOTE}/")
    return resp.status == 200 and any(e.get("path") == path for e in resp.json().get("entries", []))


@pytest.fixture
def wget(tmp_path: Path) -> Wget:
    require_tool("wget", "wget is the client under test")
    return Wget(tmp_path / "wget")


def test_wget_download_then_hit(wget, upstream, daemon_factory):
    data = os.urandom(300_000)
    upstream.add("/files/tool-1.0.tar.gz", data, content_type="application/gzip")
    d = daemon_factory({REMOTE: generic_remote(upstream)})
    url = d.url(f"/api/{REMOTE}/files/tool-1.0.tar.gz")

    first = wget.run("-O", "first.tar.gz", url)
    assert _sha((wget.base / "first.tar.gz").read_bytes()) == _sha(data)
    resp = _last_response(first)
    assert resp[":status"] == "200", first.stderr
    assert resp.get("x-cache") == "MISS", first.stderr

    # The client can finish reading before the entry is committed; wait
    # until the listing shows it, then a second wget must be a HIT.
    eventually(lambda: _cached(d, "files/tool-1.0.tar.gz"), message=f"files/tool-1.0.tar.gz never listed:\n{d.get(f'/api/{REMOTE}/').body!r}")
    second = wget.run("-O", "second.tar.gz", url)
    assert _sha((wget.base / "second.tar.gz").read_bytes()) == _sha(data)
    resp = _last_response(second)
    assert resp[":status"] == "200", second.stderr
    assert resp.get("x-cache") == "HIT", second.stderr
    assert resp.get("x-artifact-source") == "cache", second.stderr
    assert resp.get("content-length") == str(len(data)), second.stderr
    assert upstream.count("/files/tool-1.0.tar.gz") == 1, upstream.describe()


def _resume(wget: Wget, url: str, name: str, data: bytes, have: int) -> dict[str, str]:
    """Leave the first ``have`` bytes in ``name``, ``wget -c`` the rest; return the response."""
    workdir = wget.base / f"resume-{name}"
    workdir.mkdir()
    partial = workdir / name
    partial.write_bytes(data[:have])
    proc = wget.run("-c", url, cwd=workdir)
    resp = _last_response(proc)
    assert resp[":status"] == "206", f"the daemon did not answer wget's Range with 206:\n{proc.stderr}"
    assert resp.get("content-range") == f"bytes {have}-{len(data) - 1}/{len(data)}", proc.stderr
    assert resp.get("content-length") == str(len(data) - have), proc.stderr
    got = partial.read_bytes()
    assert len(got) == len(data), f"resumed file has {len(got)} bytes, expected {len(data)}\n{proc.stderr}"
    assert _sha(got) == _sha(data), f"resumed file differs from the original\n{proc.stderr}"
    return resp


def test_wget_continue_from_cache(wget, upstream, daemon_factory):
    data = os.urandom(500_000)
    upstream.add("/files/big.iso", data)
    d = daemon_factory({REMOTE: generic_remote(upstream)})
    url = d.url(f"/api/{REMOTE}/files/big.iso")
    assert d.get(f"/api/{REMOTE}/files/big.iso").status == 200
    eventually(lambda: _cached(d, "files/big.iso"), message="files/big.iso never listed")

    resp = _resume(wget, url, "big.iso", data, 123_457)
    assert resp.get("x-cache") == "HIT", resp
    assert upstream.count("/files/big.iso") == 1, upstream.describe()


def test_wget_continue_on_a_miss(wget, upstream, daemon_factory):
    """Range on an object the cache does not hold yet: still 206 (docs/http-api.rst)."""
    data = os.urandom(500_000)
    upstream.add("/files/fresh.iso", data)
    d = daemon_factory({REMOTE: generic_remote(upstream)})
    url = d.url(f"/api/{REMOTE}/files/fresh.iso")

    _resume(wget, url, "fresh.iso", data, 200_000)
    # The object is now cached whole: a plain wget is a HIT with every byte.
    eventually(lambda: _cached(d, "files/fresh.iso"), message="files/fresh.iso never listed")
    proc = wget.run("-O", "whole.iso", url)
    assert _sha((wget.base / "whole.iso").read_bytes()) == _sha(data)
    assert _last_response(proc).get("x-cache") == "HIT", proc.stderr


def test_wget_forbidden_path(wget, upstream, daemon_factory):
    upstream.add("/other/secret.txt", b"not for the cache")
    d = daemon_factory({REMOTE: generic_remote(upstream)})

    proc = wget.run("-O", "secret.txt", d.url(f"/api/{REMOTE}/other/secret.txt"), check=False)
    assert proc.returncode == WGET_SERVER_ERROR, f"wget exited {proc.returncode}, expected {WGET_SERVER_ERROR}\n{proc.stderr}"
    assert "ERROR 403" in proc.stderr, proc.stderr
    assert _last_response(proc)[":status"] == "403", proc.stderr
    assert upstream.count("/other/secret.txt") == 0, upstream.describe()
