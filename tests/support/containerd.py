"""A private containerd daemon for end-to-end tests, and ``ctr`` against it.

:func:`private_containerd` runs ``containerd`` with a temporary root, state
and socket (the CRI plugin off), so tests never touch a containerd of the
machine. containerd mounts snapshots when it unpacks, so it needs root: as
another user, or when the daemon does not come up, the test is skipped with
the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from .tools import require_tool


@contextmanager
def private_containerd(timeout: float = 60) -> Iterator[SimpleNamespace]:
    """Start a private containerd; yields ``SimpleNamespace(sock=, base=)`` and stops and removes it on exit."""
    require_tool("containerd")
    require_tool("ctr")
    if os.geteuid() != 0:
        pytest.skip("containerd needs root here (it mounts snapshots); the tests run unprivileged")
    # A short path: the socket's must fit in sockaddr_un (108 bytes).
    base = Path(tempfile.mkdtemp(prefix="sc-ctrd-", dir="/tmp"))
    sock = base / "c.sock"
    (base / "config.toml").write_text(f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
""")
    with open(base / "containerd.log", "wb") as log:
        proc = subprocess.Popen(["containerd", "--config", str(base / "config.toml")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not (sock.exists() and subprocess.run(["ctr", "--address", str(sock), "version"], capture_output=True,
                                                    timeout=10).returncode == 0):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (base / "containerd.log").read_text(errors="replace")[-2000:]
                pytest.skip(f"containerd could not start on this runner:\n{why}")
            time.sleep(0.1)
        yield SimpleNamespace(sock=sock, base=base)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        subprocess.run(["umount", "-R", str(base / "root")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def ctr(ctrd: SimpleNamespace, namespace: str, *args: str) -> str:
    """``ctr -n namespace args...`` against ``ctrd`` (no proxy variables); its stdout, or an AssertionError."""
    cmd = ["ctr", "--address", str(ctrd.sock), "-n", namespace, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
