"""Ceph's radosgw for the tests: a single-node cluster in a tmp dir, no systemd.

``RadosGW(workdir).start()`` brings up, on 127.0.0.1 and free ports:

- one ``ceph-mon`` (cephx off: every daemon and tool is local to the test);
- one ``ceph-osd`` on ``memstore`` (objects in memory, nothing on disk but
  the mon's store and the logs), registered with ``ceph osd new``;
- an S3 user with the test keys (``radosgw-admin user create``), which also
  creates RGW's default realm, zone and pools;
- ``radosgw`` with the ``beast`` front end on a free port.

Every daemon runs in the foreground in one process group (the mon's), so
``stop()`` kills the group and nothing is left behind; each daemon also dies
with the test process (PR_SET_PDEATHSIG). It starts in about 3 s on a quiet
machine (4-11 s at a load average of 20): the one mon proposes map changes
every 50 ms instead of every second. The Debian packages ``ceph-mon ceph-osd radosgw ceph-common``
(.ci/run installs them); ``require_radosgw()`` skips without them, fails
under CI=true.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.support.s3 import ACCESS_KEY, SECRET_KEY, boto_client, free_port, unique_bucket
from tests.support.tools import require_tool

TOOLS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")

CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_port}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
log to stderr = false
err to stderr = false
mon data = {d}/$name
osd data = {d}/$name
osd objectstore = memstore
memstore device bytes = 4294967296
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
# A shared test machine's disk may be nearly full: the mon must start anyway.
mon data avail crit = 0
mon data avail warn = 0
# One mon: propose map changes at once, not once a second (RGW's first start
# creates its pools one epoch at a time).
paxos propose interval = 0.05
paxos min wait = 0.01
mon osd full ratio = .99
mon osd nearfull ratio = .98
osd max object name len = 460
osd max object namespace len = 64

[client.rgw]
# radosgw's own default is "secure", which needs cephx.
ms mon client mode = crc
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {d}/rgw
rgw dns name = localhost
rgw enable apis = s3, admin
"""


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies (a worker killed by the
    suite's watchdog must not leave a cluster holding memory behind)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def require_radosgw() -> None:
    for tool in TOOLS:
        require_tool(tool, "Debian's ceph-mon ceph-osd radosgw ceph-common (see .ci/run)")


class RadosGW:
    """A one-OSD memstore Ceph cluster and radosgw on 127.0.0.1 (see the module's doc)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.mon_port = free_port()
        self.conf = self.dir / "ceph.conf"
        self.pgid: int | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.startup_seconds = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _tool(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run([*args, "-c", str(self.conf)], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=self.dir)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n"
                                 f"{self.log_tail()}")
        return proc.stdout

    def _daemon(self, *args: str) -> subprocess.Popen[bytes]:
        # -f: in the foreground (no fork: the process we kill is the daemon).
        # Every daemon joins the first one's process group: stop() kills the group.
        out = open(self.dir / "log" / f"{args[0]}.out", "ab")
        proc = subprocess.Popen([*args, "-f", "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=self.dir, preexec_fn=_die_with_parent,
                                process_group=0 if self.pgid is None else self.pgid)
        out.close()
        if self.pgid is None:
            self.pgid = proc.pid
        self.procs[args[0]] = proc
        return proc

    def start(self, timeout: float = 120.0) -> "RadosGW":
        require_radosgw()
        began = time.monotonic()
        for sub in ("run", "log", "mon.a", "osd.0", "rgw"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self.conf.write_text(CONF.format(fsid=fsid, mon_port=self.mon_port, rgw_port=self.port, d=self.dir))
        try:
            monmap = str(self.dir / "monmap")
            self._tool("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                       f"[v2:127.0.0.1:{self.mon_port}]", monmap)
            self._tool("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
            self._daemon("ceph-mon", "-i", "a")
            osd_uuid = str(uuid.uuid4())
            osd_id = self._tool("ceph", "--connect-timeout", "60", "osd", "new", osd_uuid, timeout=timeout).strip()
            self._tool("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
            self._daemon("ceph-osd", "-i", osd_id)
            # Creates the default realm, zone and pools as well (the OSD must be up for that).
            self._tool("radosgw-admin", "--rados-mon-op-timeout=60", "--rados-osd-op-timeout=60", "user", "create",
                       "--uid=sparkcache", "--display-name=sparkcache tests", f"--access-key={ACCESS_KEY}",
                       f"--secret-key={SECRET_KEY}", timeout=timeout)
            self._daemon("radosgw", "-n", "client.rgw")
            self._wait_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_ready(self, deadline: float) -> None:
        probe = unique_bucket("probe")
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"{name} exited {p.returncode}:\n{self.log_tail()}")
            try:
                s3 = boto_client(self.endpoint)
                s3.create_bucket(Bucket=probe)
                s3.put_object(Bucket=probe, Key="probe", Body=b"x")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"radosgw did not start in time:\n{self.log_tail()}") from None
                time.sleep(0.2)

    def log_tail(self, n: int = 15) -> str:
        out = []
        for log in sorted((self.dir / "log").glob("*")):
            try:
                lines = log.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """Kill the whole process group (a memstore cluster has nothing to flush)."""
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = {}


__all__ = ["RadosGW", "require_radosgw"]
