"""Projects and environments for driving ccache, sccache and Gradle against a kv remote.

Each tool gets its own home, config and cache directories under the test's
tmp dir, and an environment scrubbed of the caller's settings for it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from tests.support.daemon import free_port
from tests.support.tools import run_checked

# A small C project: a few translation units and a program that links them.
C_SOURCES = {
    "util.h": "int add(int a, int b);\nint mul(int a, int b);\nconst char *greeting(void);\n",
    "add.c": '#include "util.h"\nint add(int a, int b) { return a + b; }\n',
    "mul.c": '#include "util.h"\nint mul(int a, int b) { int r = 0; for (int i = 0; i < b; i++) r = add(r, a); return r; }\n',
    "greet.c": '#include "util.h"\nconst char *greeting(void) { return "hello from a cached build"; }\n',
    "main.c": '#include <stdio.h>\n#include "util.h"\n'
              'int main(void) { printf("%s %d\\n", greeting(), mul(add(2, 4), 7)); return 0; }\n',
}
C_UNITS = sorted(n for n in C_SOURCES if n.endswith(".c"))
PROGRAM_OUTPUT = "hello from a cached build 42\n"

# Environment variables of the tools under test that must come from the test alone.
_SCRUB_PREFIXES = ("CCACHE_", "SCCACHE_", "GRADLE_", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "RUSTC_WRAPPER")


def write_c_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in C_SOURCES.items():
        (root / name).write_text(text)
    return root


def tool_env(home: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env.update(extra)
    return env


def build_c(project: Path, wrapper: list[str], env: dict[str, str], out: str = "prog") -> None:
    """Compile each unit through ``wrapper`` (``ccache`` or ``sccache``), link, run the program."""
    for unit in C_UNITS:
        run_checked([*wrapper, "gcc", "-O1", "-c", unit, "-o", unit[:-2] + ".o"], cwd=project, env=env)
    run_checked(["gcc", "-o", out, *(u[:-2] + ".o" for u in C_UNITS)], cwd=project, env=env)
    ran = run_checked([str(project / out)], cwd=project, env=env)
    assert ran.stdout == PROGRAM_OUTPUT
    for unit in C_UNITS:
        (project / (unit[:-2] + ".o")).unlink()


def ccache_stats(env: dict[str, str]) -> dict[str, int]:
    out = run_checked(["ccache", "--print-stats"], env=env).stdout
    stats = {}
    for line in out.splitlines():
        name, _, value = line.partition("\t")
        if value.strip().isdigit():
            stats[name] = int(value)
    return stats


def sccache_stats(sccache: str, env: dict[str, str]) -> dict[str, object]:
    import json

    return json.loads(run_checked([sccache, "--show-stats", "--stats-format=json"], env=env).stdout)  # type: ignore[no-any-return]


class SccacheServer:
    """An sccache server on a free port of its own, stopped by ``stop()``."""

    def __init__(self, sccache: str, env: dict[str, str]) -> None:
        self.sccache = sccache
        self.port = free_port()
        self.env = {**env, "SCCACHE_SERVER_PORT": str(self.port),
                    "SCCACHE_IDLE_TIMEOUT": "0"}

    def start(self) -> "SccacheServer":
        run_checked([self.sccache, "--start-server"], env=self.env, timeout=60)
        return self

    def stop(self) -> None:
        subprocess.run([self.sccache, "--stop-server"], env=self.env, capture_output=True, timeout=60,
                       stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _listening(self.port):
            time.sleep(0.1)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


GRADLE_SOURCES = {
    "build.gradle": "apply plugin: 'java'\n",
    "src/main/java/demo/Greeter.java":
        "package demo;\npublic class Greeter {\n  public static String greet(String who) { return \"hello \" + who; }\n}\n",
    "src/main/java/demo/Main.java":
        "package demo;\npublic class Main {\n  public static void main(String[] a) { System.out.println(Greeter.greet(\"cache\")); }\n}\n",
}


def write_gradle_project(root: Path, settings: str) -> Path:
    for name, text in {**GRADLE_SOURCES, "settings.gradle": "rootProject.name = 'demo'\n" + settings}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def gradle_command(gradle: str, *tasks: str) -> list[str]:
    # No daemon: each build is its own JVM, ended with the build (no process outlives the test).
    # Never --offline: it turns the remote build cache off. The project has no dependencies
    # to resolve, so nothing but the cache is contacted.
    return [gradle, "--no-daemon", "--console=plain", "--build-cache", *tasks]
