"""Debian's ``bazel-bootstrap`` (Bazel 4.2) driven offline, isolated in a tmp dir.

A workspace of ``genrule`` targets only needs no external repository, so
Bazel builds it with no network. Every run is ``--batch`` (no server left
behind) with its own ``--output_user_root``, ``--nosystem_rc --nohome_rc`` and
a HOME in tmp. Debian's system rc (``/etc/bazel/bazelrc``) sets the install
base; with the system rc off, :data:`STARTUP` repeats what it says.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# From /etc/bazel/bazelrc of bazel-bootstrap: the binary is not a self-extracting zip.
STARTUP = ["--nosystem_rc", "--nohome_rc", "--install_base=/usr/share/bazel", "--trust_install_base", "--batch"]
BUILD_FLAGS = ["--host_javabase=@local_jdk//:jdk", "--noshow_progress", "--color=no", "--curses=no"]


def write_genrules(root: Path, n: int, work: int = 0, lines: int = 20) -> None:
    """A workspace of ``n`` genrules ``g0``..``g{n-1}``, each from its own source;
    ``work`` > 0 makes each action spend that many rounds of sha256sum (a
    stand-in for a compile step, so a hit saves something); each source and
    output is ``lines`` lines of 9 bytes or more."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "WORKSPACE").write_text('workspace(name = "sparkcache_bazel_test")\n')
    rules = []
    for i in range(n):
        (root / f"src{i}.txt").write_text(f"source {i}\n" * lines)
        cmd = "cat $< > $@; echo built $@"
        if work:
            cmd = f"x=$$(cat $<); for r in $$(seq {work}); do x=$$(echo $$x | sha256sum); done; " \
                  f"cat $< > $@; echo $$x >> $@; echo built $@"
        rules.append(f'genrule(name = "g{i}", srcs = ["src{i}.txt"], outs = ["out{i}.txt"], cmd = "{cmd}")')
    (root / "BUILD").write_text("\n".join(rules) + "\n")


@dataclass
class Bazel:
    """One isolated Bazel: ``run("build", "//...")``."""

    binary: str
    workspace: Path
    home: Path
    cache_url: str | None = None
    token: str | None = None
    extra: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home), "LANG": "C.UTF-8",
                "USER": "bazel-test", "TMPDIR": str(self.home / "tmp")}

    def command(self, *args: str) -> list[str]:
        startup = [*STARTUP, f"--output_user_root={self.home / 'root'}"]
        cmd = [self.binary, *startup, args[0]]
        if args[0] == "build":
            cmd += BUILD_FLAGS
            if self.cache_url:
                cmd += [f"--remote_cache={self.cache_url}", "--remote_upload_local_results"]
            if self.token:
                cmd.append(f"--remote_header=Authorization=Bearer {self.token}")
            cmd += self.extra
        return cmd + list(args[1:])

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(self.command(*args), cwd=self.workspace, env=self.env(), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"bazel {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}")
        return proc
