"""A private OpenSSH server on 127.0.0.1 for end-to-end tests of git over ssh://.

    server = start_sshd(tmp_path / "sshd")   # host key generated, listening, ready
    key = keypair(tmp_path / "client")       # a fresh ed25519 client key
    server.authorize(key.public)              # authorized for the server's user
    server.known_hosts_line()                 # "[127.0.0.1]:<port> ssh-ed25519 AAAA..."
    server.stop()

The server runs ``sshd -D -e`` as the current user (root on CI: sshd needs it
to switch users) with its own config, host key and authorized_keys file in its
directory; its log is ``<dir>/sshd.log``. Commands run through the user's
login shell, so ``git-upload-pack`` comes from the system's PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon import _die_with_parent, free_port
from tests.support.tools import require_tool, run_checked

SSHD = "/usr/sbin/sshd"


def require_sshd() -> str:
    """The path of sshd (not on a normal user's PATH, so require_tool cannot find it):
    skip without it, fail on CI (``CI=true``), as require_tool does. sshd must also
    run as root."""
    require_tool("ssh-keygen")
    why = None
    if not os.path.exists(SSHD):
        why = f"{SSHD} not found: install openssh-server"
    elif os.geteuid() != 0:
        why = "sshd must run as root"
    if why is None:
        return SSHD
    if os.environ.get("CI") == "true":
        pytest.fail(f"required tool 'sshd': {why}", pytrace=False)
    pytest.skip(f"required tool 'sshd': {why}")


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    def public_line(self) -> str:
        return self.public.read_text().strip()


def keypair(path: Path, comment: str = "sparkcache-test") -> KeyPair:
    """A fresh ed25519 key without a passphrase at ``path`` (and ``path``.pub)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run_checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return KeyPair(path, Path(f"{path}.pub"))


class Sshd:
    """One sshd in ``dir``, listening on 127.0.0.1:``port``."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_key = keypair(self.dir / "ssh_host_ed25519_key", comment="sparkcache-test-host")
        self.authorized_keys = self.dir / "authorized_keys"
        self.authorized_keys.touch()
        self.config_path = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def authorize(self, public_key_line: str, options: str = "restrict") -> None:
        with open(self.authorized_keys, "a") as f:
            f.write(f"{options + ' ' if options else ''}{public_key_line}\n")

    def known_hosts_line(self) -> str:
        """The known_hosts entry for this server (key type and key, without the comment)."""
        kind, key = self.host_key.public_line().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {key}"

    def url(self, path: Path | str, user: str = "root") -> str:
        return f"ssh://{user}@127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _write_config(self) -> None:
        self.config_path.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.host_key.private}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "UsePAM no",
            "LogLevel VERBOSE",
            "",
        ]))

    def start(self, timeout: float = 15.0) -> "Sshd":
        sshd = require_sshd()
        # privilege separation directory, which sshd checks at start
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            self._write_config()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sshd, "-D", "-e", "-f", str(self.config_path)], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            if self._wait_ready(timeout):
                return self
            lost_race = "Address already in use" in self.log()
            self.stop()
            if not lost_race or attempt == 2:
                break
        raise AssertionError(f"sshd did not start on 127.0.0.1:{self.port}\n{self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        """True once the server answers with its SSH banner; False if it exited."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start_sshd(dir: Path) -> Sshd:
    return Sshd(dir).start()


def ssh_home(home: Path, known_hosts: str | None) -> Path:
    """A HOME whose ``.ssh/known_hosts`` holds ``known_hosts`` (none at all when None)."""
    ssh = home / ".ssh"
    if ssh.exists():
        shutil.rmtree(ssh)
    ssh.mkdir(parents=True, mode=0o700)
    if known_hosts is not None:
        (ssh / "known_hosts").write_text(known_hosts)
    return home
