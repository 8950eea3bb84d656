"""The daemon process end to end: crash recovery, graceful stop, config errors."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time

import pytest
import yaml

from tests.support.client import Fetch, get_until_hit, sha256
from tests.support.daemon import daemon_env, free_port, twistd_command
from tests.support.remotes import generic_remote

MiB = 1024 * 1024


def _exit_message(rc: int) -> str:
    if rc == -signal.SIGTERM:
        return (
            "the daemon died of SIGTERM (status -15) instead of exiting 0: twistd re-raises the "
            "stop signal after a clean shutdown (twisted.application.app._exitWithSignal)"
        )
    return f"exit status {rc}"


def test_restart_after_kill_mid_download(upstream, daemon_factory):
    data = os.urandom(4 * MiB)
    upstream.add("/files/crash.bin", data)
    upstream.behave("/files/crash.bin", pause_at=512 * 1024)
    d = daemon_factory({"r": generic_remote(upstream)})

    victim = Fetch(d.port, "/api/r/files/crash.bin", timeout=30)
    victim.start()
    upstream.wait_paused("/files/crash.bin")
    time.sleep(0.3)  # the daemon has written part of the body to its spool
    d.kill()
    victim.join(30)
    if not isinstance(victim.result, BaseException):
        assert victim.result is not None and len(victim.result.body) < len(data), "got a full body from a killed daemon"
    upstream.clear("/files/crash.bin")

    d.start()
    assert d.spool_files() == [], f"leftover spool files after restart: {d.spool_files()}"
    resp = d.get("/api/r/files/crash.bin")
    assert resp.status == 200, resp.describe()
    assert resp.header("X-Cache") == "MISS", "a torn download must not be visible after a crash"
    assert sha256(resp.body) == sha256(data)
    assert upstream.count("/files/crash.bin") == 2, upstream.describe()
    get_until_hit(d, "/api/r/files/crash.bin", data)


def test_cache_survives_restart(upstream, daemon_factory):
    upstream.add("/files/keep.bin", b"kept across restarts")
    d = daemon_factory({"r": generic_remote(upstream)})
    assert d.get("/api/r/files/keep.bin").header("X-Cache") == "MISS"
    get_until_hit(d, "/api/r/files/keep.bin", b"kept across restarts")
    d.stop()
    d.start()
    resp = d.get("/api/r/files/keep.bin")
    assert resp.header("X-Cache") == "HIT", resp.describe()
    assert resp.body == b"kept across restarts"
    assert upstream.count("/files/keep.bin") == 1


def test_sigterm_right_after_a_miss_keeps_the_entry(upstream, daemon_factory):
    """A graceful stop lets the commit of a body already served finish."""
    data = os.urandom(1 * MiB)
    upstream.add("/files/late.bin", data)
    d = daemon_factory({"r": generic_remote(upstream)})
    assert d.get("/api/r/files/late.bin").header("X-Cache") == "MISS"
    d.stop()
    d.start()
    assert d.spool_files() == []
    resp = d.get("/api/r/files/late.bin")
    assert resp.header("X-Cache") == "HIT", "the entry being committed at SIGTERM was dropped"
    assert sha256(resp.body) == sha256(data)
    assert upstream.count("/files/late.bin") == 1


def test_graceful_stop_finishes_in_flight_download(upstream, daemon_factory):
    data = os.urandom(2 * MiB)
    upstream.add("/files/slow.bin", data)
    upstream.behave("/files/slow.bin", pause_at=256 * 1024)
    d = daemon_factory({"r": generic_remote(upstream)}, server={"shutdown_timeout": "20s"})

    client = Fetch(d.port, "/api/r/files/slow.bin", timeout=40)
    client.start()
    upstream.wait_paused("/files/slow.bin")
    assert client.got_headers.wait(60), "no response headers while the fetch was in flight"
    d.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert d.running, "the daemon exited with a download in flight"
    upstream.resume("/files/slow.bin")

    resp = client.response(40)
    assert resp.status == 200, resp.describe()
    assert sha256(resp.body) == sha256(data), f"client got {len(resp.body)} of {len(data)} bytes"
    rc = d.wait_exit()
    assert rc == 0, _exit_message(rc)
    assert d.spool_files() == [], f"spool not empty after a graceful stop: {d.spool_files()}"


def test_sigterm_when_idle_exits_zero(upstream, daemon_factory):
    d = daemon_factory({"r": generic_remote(upstream)})
    rc = d.stop()
    assert rc == 0, _exit_message(rc)
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", d.port, timeout=2).connect()


BAD_CONFIGS = {
    "unknown-key": ({"mutable_tll": "1s"}, None, "remotes.foo.cache.mutable_tll"),
    "bad-duration": ({"mutable_ttl": "soon"}, None, "remotes.foo.cache.mutable_ttl"),
    "bad-regex": (None, {"immutable_patterns": ["(["]}, "remotes.foo.immutable_patterns[0]"),
    "missing-env": (None, {"credentials": {"username": "u", "password_env": "SPARKCACHE_TEST_SURELY_UNSET"}}, "remotes.foo.credentials.password_env"),
    "bad-type": (None, {"type": "ftp"}, "remotes.foo.type"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_error_is_reported_without_traceback(tmp_path, case):
    cache, remote_extra, key_path = BAD_CONFIGS[case]
    remote = {"type": "generic", "upstream": "http://127.0.0.1:9/", "immutable_patterns": ["files/"]}
    if cache is not None:
        remote["cache"] = cache
    remote.update(remote_extra or {})
    cfg = {
        "server": {"listen": [f"tcp:{free_port()}:interface=127.0.0.1"]},
        "storage": {"data_dir": str(tmp_path / "data")},
        "remotes": {"foo": remote},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))

    proc = subprocess.run(
        twistd_command(path),
        cwd=tmp_path,
        env=daemon_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"twistd accepted a bad config:\n{out}"
    assert str(path) in out, f"the message does not name the file:\n{out}"
    assert key_path in out, f"the message does not name {key_path}:\n{out}"
    assert "Traceback" not in out, f"a traceback instead of a message:\n{out}"


def test_listen_port_in_use_fails_fast(tmp_path):
    """A daemon that cannot listen must say so and exit, not run deaf."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = {
            "server": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
            "storage": {"data_dir": str(tmp_path / "data")},
            "remotes": {"uploads": {"type": "local"}},
        }
        path = tmp_path / "cache.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen(
            twistd_command(path), cwd=tmp_path, env=daemon_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(f"the daemon kept running without its listening port:\n{out}") from None
    assert proc.returncode != 0, out
    assert str(port) in out, f"the message does not name the port:\n{out}"
