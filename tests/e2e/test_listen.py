"""Listeners: several Twisted endpoint strings at once (tcp + unix), from the
config, from --listen on the command line, and from SPARKCACHE_LISTEN."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time

from tests.support.daemon import daemon_env, free_port, twistd_path
from tests.support.remotes import generic_remote
from tests.support.tools import require_tool


def _short_sock() -> str:
    # AF_UNIX paths are limited to ~108 bytes: pytest's tmp dirs can be longer.
    return os.path.join(tempfile.mkdtemp(prefix="sc-"), "s.sock")


def _curl_unix(curl: str, sock: str, path: str) -> tuple[int, bytes]:
    proc = subprocess.run(
        [curl, "-sS", "--max-time", "20", "--unix-socket", sock, "-o", "-", "-w", "\n%{http_code}", f"http://cache{path}"],
        capture_output=True, timeout=40,
    )
    assert proc.returncode == 0, proc.stderr
    body, _, code = proc.stdout.rpartition(b"\n")
    return int(code), body


def test_tcp_and_unix_listeners_from_config(upstream, daemon_factory):
    curl = require_tool("curl", "curl --unix-socket talks to the unix listener")
    upstream.add("/files/x.bin", b"x" * 1000)
    sock = _short_sock()
    port = free_port()
    d = daemon_factory(
        {"r": generic_remote(upstream)},
        port=port,
        server={"listen": [f"tcp:{port}:interface=127.0.0.1", f"unix:{sock}"]},
    )
    assert d.get("/api/r/files/x.bin").status == 200
    code, body = _curl_unix(curl, sock, "/api/r/files/x.bin")
    assert code == 200 and body == b"x" * 1000
    assert upstream.count("/files/x.bin") == 1  # one store behind both listeners


def _wait_health(curl: str, sock: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "daemon exited"
        if os.path.exists(sock):
            code, body = _curl_unix(curl, sock, "/health")
            if code == 200:
                return json.loads(body)
        time.sleep(0.1)
    raise AssertionError("daemon never answered /health on its unix socket")


def test_listen_option_and_environment_override_the_config(tmp_path, upstream):
    curl = require_tool("curl", "curl --unix-socket talks to the unix listener")
    cfg = tmp_path / "cache.yaml"
    cfg.write_text(
        "server: {listen: ['tcp:1:interface=127.0.0.1']}\n"  # would fail to bind: must be overridden
        f"storage: {{data_dir: {tmp_path / 'data'}}}\n"
        f"remotes: {{r: {{upstream: '{upstream.base_url}'}}}}\n"
    )
    for how in ("option", "env"):
        sock = _short_sock()
        cmd = [twistd_path(), "-n", "--pidfile=", f"--logfile={tmp_path / (how + '.log')}", "sparkcache", "-c", str(cfg)]
        env = daemon_env()
        if how == "option":
            cmd += ["--listen", f"unix:{sock}"]
        else:
            env["SPARKCACHE_LISTEN"] = f"unix:{sock}"
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            # (A loaded machine took 15 s to start this daemon and its workers: 60 s, as Daemon.start.)
            assert _wait_health(curl, sock, proc)["status"] == "ok"
        finally:
            proc.terminate()
            assert proc.wait(60) == 0


def test_tls_listener_serves_large_bodies_encrypted(tmp_path, upstream, daemon_factory):
    """On TLS, bodies must go through the TLS transport, never os.sendfile."""
    curl = require_tool("curl", "curl fetches over the TLS listener")
    openssl = require_tool("openssl", "openssl makes the listener's self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    data = os.urandom(3 * 1024 * 1024)
    upstream.add("/files/big.bin", data)
    tcp_port, tls_port = free_port(), free_port()
    d = daemon_factory(
        {"r": generic_remote(upstream)},
        port=tcp_port,
        server={"listen": [f"tcp:{tcp_port}:interface=127.0.0.1",
                           f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]},
    )
    out = tmp_path / "out.bin"
    for _ in range(2):  # a miss (tailing the spool), then a hit
        proc = subprocess.run(
            [curl, "-sSk", "--max-time", "30", "-o", str(out), "-w", "%{http_code}", f"https://127.0.0.1:{tls_port}/api/r/files/big.bin"],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0 and proc.stdout == "200", proc.stderr
        assert out.read_bytes() == data
    assert upstream.count("/files/big.bin") == 1
    assert d.running
