"""The seed endpoints against the real daemon, driven by the real curl (and tar):
binaries and dependency archives up and down, artifacts uploaded one by one
and fetched back with ``?glob=`` piped into ``tar -x``, and uploads too large
for the store refused cleanly (413 before the body, JSON, nothing kept)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.client import eventually
from tests.support.tools import require_tool, run_checked

WRITE = "seed-e2e-w-5c1d"
TOKENS = {"SPARKCACHE_WRITE_TOKEN": WRITE}
AUTH = f"Authorization: Bearer {WRITE}"


@pytest.fixture
def curl() -> str:
    return require_tool("curl")


def url(d: Any, path: str) -> str:
    return f"http://127.0.0.1:{d.port}{path}"


def fetch(curl: str, *args: str) -> tuple[int, bytes]:
    """curl's answer: (HTTP status, body); curl itself must not fail."""
    proc = subprocess.run([curl, "-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", *args],
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode()
    body, _, status = proc.stdout.rpartition(b"\n")
    return int(status), body


def test_binaries_and_archives(daemon_factory: Any, curl: str, tmp_path: Path) -> None:
    d = daemon_factory({}, env=TOKENS)
    binary = tmp_path / "pipeline"
    binary.write_bytes(os.urandom(300_000))
    run_checked([curl, "-fsS", "-T", str(binary), "-H", AUTH, url(d, "/bin/pipeline-linux-amd64")])
    out = tmp_path / "out"
    run_checked([curl, "-fsS", "-o", str(out), url(d, "/bin/pipeline-linux-amd64")])
    assert out.read_bytes() == binary.read_bytes()
    head = run_checked([curl, "-fsSI", url(d, "/bin/pipeline-linux-amd64")]).stdout.lower()
    assert "content-length: 300000" in head
    # A new build of the same pipeline replaces the binary.
    binary.write_bytes(b"\x7fELF rebuilt")
    run_checked([curl, "-fsS", "-T", str(binary), "-H", AUTH, url(d, "/bin/pipeline-linux-amd64")])
    assert fetch(curl, url(d, "/bin/pipeline-linux-amd64")) == (200, b"\x7fELF rebuilt")

    archive = tmp_path / "deps.tar.zst"
    archive.write_bytes(os.urandom(2_000_000))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    key = "/cache/npm/linux-x64/package-lock-9c1e2f.tar.zst"
    put = run_checked([curl, "-fsS", "-T", str(archive), "-H", AUTH, "-H", f"X-Checksum-Sha256: {digest}", url(d, key)])
    assert json.loads(put.stdout) == {"name": key[len("/cache/"):], "size": 2_000_000, "sha256": digest}
    run_checked([curl, "-fsS", "-o", str(out), url(d, key)])
    assert out.read_bytes() == archive.read_bytes()
    status, body = fetch(curl, "-T", str(archive), "-H", AUTH, "-H", f"X-Checksum-Sha256: {'0' * 64}",
                         url(d, "/cache/npm/other"))
    assert status == 400 and "error" in json.loads(body)
    assert fetch(curl, url(d, "/cache/npm/other"))[0] == 404
    status, body = fetch(curl, "-T", str(archive), url(d, "/cache/anonymous"))
    assert status == 401 and json.loads(body)["status"] == 401
    remotes = {r["name"] for r in json.loads(fetch(curl, url(d, "/"))[1])["internal_remotes"]}
    assert {"seed/bin", "seed/cache", "seed/artifacts"} <= remotes


def test_artifacts_glob_into_tar(daemon_factory: Any, curl: str, tmp_path: Path) -> None:
    tar = require_tool("tar")
    d = daemon_factory({}, env=TOKENS)
    files = {
        "dist/app-linux-amd64": os.urandom(700_000),
        "dist/app-darwin-arm64": os.urandom(65_537),
        "dist/checksums.txt": b"abc  app\n",
        "reports/junit.xml": b"<testsuite tests='3'/>",
    }
    src = tmp_path / "src"
    for path, body in files.items():
        f = src / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(body)
        run_checked([curl, "-fsS", "--data-binary", f"@{f}", "-H", AUTH,
                     url(d, f"/artifacts/run-1234-build?path={path}")])
    status, body = fetch(curl, url(d, "/artifacts/run-1234-build"))
    listing = json.loads(body)["artifacts"]
    assert status == 200 and [a["path"] for a in listing] == sorted(files)
    assert all(a["sha256"] == hashlib.sha256(files[a["path"]]).hexdigest() for a in listing)

    out = tmp_path / "out"
    out.mkdir()
    # Several matches: one tar stream, extracted as it arrives.
    pipe = subprocess.run(f"set -o pipefail; {curl} -fsS '{url(d, '/artifacts/run-1234-build?glob=dist/*')}' "
                          f"| {tar} -x -C {out}", shell=True, executable="/bin/bash", capture_output=True,
                          timeout=60)
    assert pipe.returncode == 0, pipe.stderr.decode()
    got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == {k: v for k, v in files.items() if k.startswith("dist/")}
    # One match: the file itself.
    assert fetch(curl, url(d, "/artifacts/run-1234-build?glob=*.xml")) == (200, files["reports/junit.xml"])
    assert fetch(curl, url(d, "/artifacts/run-1234-build?glob=nothing*"))[0] == 404
    status, body = fetch(curl, "--data-binary", "x", "-H", AUTH, url(d, "/artifacts/run-1?path=../../etc/passwd"))
    assert status == 400 and json.loads(body)["status"] == 400


def test_a_store_too_small_answers_cleanly(daemon_factory: Any, curl: str, tmp_path: Path) -> None:
    d = daemon_factory({}, env=TOKENS, extra={"seed": {"max_entry_size": "1MiB", "quota": "3MiB"}})
    big = tmp_path / "big"
    big.write_bytes(os.urandom(5 << 20))
    small = tmp_path / "small"
    small.write_bytes(os.urandom(900_000))
    for args in (["-T", str(big), url(d, "/cache/too-big")],
                 ["--data-binary", f"@{big}", url(d, "/artifacts/j?path=too-big")],
                 # Chunked: no length announced, refused once past the limit.
                 ["-T", "-", url(d, "/bin/streamed")]):
        proc = subprocess.run([curl, "-sS", "--max-time", "30", "-H", AUTH, "-H", "Transfer-Encoding: chunked",
                               "-w", "\n%{http_code}", *args] if args[1] == "-" else
                              [curl, "-sS", "--max-time", "30", "-H", AUTH, "-w", "\n%{http_code}", *args],
                              input=big.read_bytes() if args[1] == "-" else None, capture_output=True, timeout=60)
        # curl may see the connection close while it still sends: a clean 413 or a send error, never a hang.
        body, _, status = proc.stdout.rpartition(b"\n")
        if proc.returncode == 0:
            assert status == b"413" and json.loads(body)["status"] == 413, proc.stdout
        else:
            assert proc.returncode in (55, 56), proc.stderr  # failed sending/receiving after the 413
    for path in ("/cache/too-big", "/artifacts/j?glob=*", "/bin/streamed"):
        assert fetch(curl, url(d, path))[0] == 404
    assert not d.spool_files()
    # The quota keeps the newest: four 900 kB archives in 3 MiB leave the last three.
    for i in range(4):
        run_checked([curl, "-fsS", "-T", str(small), "-H", AUTH, url(d, f"/cache/k{i}")])
    # Eviction follows the upload that went over the quota.
    eventually(lambda: fetch(curl, "-o", "/dev/null", url(d, "/cache/k0"))[0] == 404)
    assert [fetch(curl, "-o", "/dev/null", url(d, f"/cache/k{i}"))[0] for i in (1, 2, 3)] == [200, 200, 200]
