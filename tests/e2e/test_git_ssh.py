"""Git mirrors of an ssh:// upstream authenticated with a key (``git.credentials.<name or
host>.ssh_key``), end to end: a private sshd (tests/support/sshd.py) in front of a bare
repository, the daemon fetching through libgit2/libssh2, a real git client cloning
from the daemon. Also: the key never leaks (argv, data dir), and an upstream whose
host key is not in the daemon user's ``~/.ssh/known_hosts`` is refused cleanly."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.tools import files_containing

from tests.e2e.test_git_mirrors import ProcessWatcher, mirror_dirs, repos
from tests.support.client import eventually
from tests.support.git_upstream import GitUpstream, git, git_client, git_daemon_config
from tests.support.sshd import Sshd, keypair, ssh_home, start_sshd


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = start_sshd(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.stop()


def _private_key_body(private_key: Path) -> list[bytes]:
    """The base64 lines of an OpenSSH private key file, without the BEGIN/END lines."""
    return private_key.read_bytes().strip().splitlines()[1:-1]


def ed25519_seed(private_key: Path) -> tuple[bytes, int]:
    """The 32-byte secret of an unencrypted OpenSSH ed25519 private key file, and
    where it starts in the decoded key."""
    blob = base64.b64decode(b"".join(_private_key_body(private_key)))
    magic = b"openssh-key-v1\0"
    assert blob.startswith(magic)
    pos = len(magic)

    def string() -> bytes:
        nonlocal pos
        (n,) = struct.unpack(">I", blob[pos:pos + 4])
        pos += 4 + n
        return blob[pos - n:pos]

    assert string() == b"none"  # cipher: not encrypted
    string(), string()  # kdf name and options
    pos += 4  # number of keys
    string()  # public key
    pos += 4 + 8  # the private section's length, its two check integers
    assert string() == b"ssh-ed25519"
    string()  # public part
    (n,) = struct.unpack(">I", blob[pos:pos + 4])
    assert n == 64  # seed + public part
    return blob[pos + 4:pos + 4 + 32], pos + 4


def key_needles(private_key: Path) -> list[bytes]:
    """Forms the private key could take in a file: the PEM text, its base64 body
    unwrapped, the raw secret and its hex."""
    seed, _ = ed25519_seed(private_key)
    return [private_key.read_bytes(), b"".join(_private_key_body(private_key)), seed, seed.hex().encode()]


def secret_line(private_key: Path) -> bytes:
    """The line of the key file that encodes the start of its secret: a key file
    handed to a child on its command line would show it."""
    body = _private_key_body(private_key)
    _, offset = ed25519_seed(private_key)
    width = len(body[0])
    return body[(offset + 2) // 3 * 4 // width]


def test_ssh_key_mirror_clone_refresh_and_no_key_leak(sshd: Sshd, daemon_factory: Any, tmp_path: Path) -> None:
    up = GitUpstream(tmp_path / "upstream")  # bare repositories only: served by sshd, not HTTP
    first = up.create("app", files={"ssh.txt": "over ssh\n"})
    key = keypair(tmp_path / "keys" / "id_ed25519")
    sshd.authorize(key.public_line())
    home = ssh_home(tmp_path / "daemon-home", sshd.known_hosts_line() + "\n")
    cfg = git_daemon_config({"sshrepo": sshd.url(up.path("app"))}, fetch_interval="1s",
                            credentials={"sshrepo": {"ssh_key": str(key.private)}})
    d = daemon_factory(extra=cfg, env={"HOME": str(home)})
    client_home = tmp_path / "client-home"

    watcher = ProcessWatcher(secret_line(key.private), d.pid)
    watcher.start()
    try:
        c = tmp_path / "c"
        git_client("clone", "-q", d.url("/git/sshrepo"), str(c), home=client_home)
        assert git("rev-parse", "HEAD", cwd=c) == first
        assert (c / "ssh.txt").read_text() == "over ssh\n"
        for i in range(3):
            sha = up.commit({f"f{i}.txt": f"{i}\n"}, f"change {i}", name="app")
            r = d.request("POST", "/git/refresh?name=sshrepo")
            assert r.status == 200, r.describe()
            assert json.loads(r.body)["refs"]["refs/heads/main"] == sha
        git_client("pull", "-q", "--ff-only", cwd=c, home=client_home)
        assert git("rev-parse", "HEAD", cwd=c) == sha
        assert (c / "f2.txt").read_text() == "2\n"
        # the fetch loop (every second) runs over ssh too, while the watcher scans
        eventually(lambda: watcher.scans > 20 and sshd.log().count("Accepted publickey for root") >= 10,
                   timeout=60, message="the fetch loop did not reach the ssh upstream")
    finally:
        watcher.stop_event.set()
        watcher.join(10)
    assert watcher.hits == [], (watcher.hits, watcher.seen_git_children)
    # the key is what got the daemon in: sshd allows nothing else
    assert "Accepted publickey for root" in sshd.log()
    st = repos(d)["sshrepo"]
    assert st["cloned"] and st["last_error"] is None and st["credentials"] == "ssh-key"

    needles = key_needles(key.private)
    held = files_containing(d.data_dir, needles)
    assert held == [], f"{held} hold the private key"
    (mirror,) = mirror_dirs(d)
    assert git("config", "remote.origin.url", cwd=mirror) == sshd.url(up.path("app"))
    assert all(n.decode(errors="replace") not in d.log() for n in needles)


def test_unknown_or_wrong_host_key_is_refused(sshd: Sshd, daemon_factory: Any, tmp_path: Path) -> None:
    up = GitUpstream(tmp_path / "upstream")
    first = up.create("app")
    key = keypair(tmp_path / "keys" / "id_ed25519")
    sshd.authorize(key.public_line())
    home = ssh_home(tmp_path / "daemon-home", None)  # ~/.ssh without known_hosts
    # credentials by host this time
    cfg = git_daemon_config({"sshrepo": sshd.url(up.path("app"))},
                            credentials={f"127.0.0.1:{sshd.port}": {"ssh_key": str(key.private)}})
    d = daemon_factory(extra=cfg, env={"HOME": str(home)})
    client_home = tmp_path / "client-home"

    def refused(what: str) -> None:
        r = d.request("POST", "/git/refresh?name=sshrepo")
        assert r.status in (502, 503), (what, r.describe())
        error = repos(d)["sshrepo"]["last_error"]
        assert error and "invalid or unknown remote ssh hostkey" in error, (what, error)
        assert mirror_dirs(d) == [], what
        p = git_client("clone", "-q", d.url("/git/sshrepo"), str(tmp_path / "c"), home=client_home, check=False)
        assert p.returncode != 0 and "503" in p.stderr, (what, p.stderr)
        assert d.running and d.get("/health").status == 200, what

    refused("no known_hosts")
    other = keypair(tmp_path / "keys" / "other_host_key")
    kind, other_key = other.public_line().split()[:2]
    ssh_home(home, f"[127.0.0.1]:{sshd.port} {kind} {other_key}\n")
    refused("another key in known_hosts")
    # the host key is checked before authentication: the client key was never offered
    assert "publickey" not in sshd.log(), sshd.log()

    # the right entry: the same daemon now clones
    ssh_home(home, sshd.known_hosts_line() + "\n")
    r = d.request("POST", "/git/refresh?name=sshrepo")
    assert r.status == 200, r.describe()
    git_client("clone", "-q", d.url("/git/sshrepo"), str(tmp_path / "c"), home=client_home)
    assert git("rev-parse", "HEAD", cwd=tmp_path / "c") == first
    st = repos(d)["sshrepo"]
    assert st["last_error"] is None and st["credentials"] == "ssh-key"

    # the host key changes under an existing mirror: fetches are refused, the mirror is still served
    ssh_home(home, f"[127.0.0.1]:{sshd.port} {kind} {other_key}\n")
    up.commit({"x": "y\n"}, "not fetched", name="app")
    r = d.request("POST", "/git/refresh?name=sshrepo")
    assert r.status in (502, 503), r.describe()
    assert "invalid or unknown remote ssh hostkey" in repos(d)["sshrepo"]["last_error"]
    git_client("clone", "-q", d.url("/git/sshrepo"), str(tmp_path / "c2"), home=client_home)
    assert git("rev-parse", "HEAD", cwd=tmp_path / "c2") == first
