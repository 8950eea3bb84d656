#!/usr/bin/env python3
"""A Maven build through sparkcache vs straight from the upstream repository.

The test project of tests/e2e/test_maven_build.py scaled up: ``--artifacts``
generated release dependencies (pom + jar + ``.sha1``/``.md5`` each) and one
timestamped SNAPSHOT, in a repository on disk served by nginx on 127.0.0.1.
``mvn -B compile`` of a project depending on all of them runs, each time with
an empty local repository (``-Dmaven.repo.local``), so every dependency file is
downloaded again:

- cold: through a fresh sparkcache (empty data dir), ``--runs`` times;
- then ``--runs`` times, alternating: direct (Maven's mirror is nginx itself)
  and warm (through the last sparkcache again, everything cached).

Plugins resolve from the machine's local ``~/.m2`` repository as a ``file://``
repository, as in the tests. Reported: wall time of each build, requests
nginx saw (warm: 0, since the snapshot's metadata is within its TTL), the
daemon's CPU seconds per build and its peak RSS (VmHWM, goal <= 150 MiB;
the daemon restarts for each cold build, so it is the peak of the last cold
build and the warm ones).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from common import (REPO, AccessLog, Bench, BenchError, Daemon, Nginx, apply_quick, base_parser, cpu_seconds,
                    free_port, median, print_summary, print_table, run_main, static_server, summary_row, tool)

sys.path.insert(0, str(REPO))
from tests.support.maven_repo import Artifact, plugin_repository, project, publish, run_mvn, settings  # noqa: E402

NAME = "maven_build"
GOAL_RSS_MIB = 150
MAIN = "package app;\npublic class App { public static void main(String[] a) { System.out.println(\"ok\"); } }\n"


def main() -> int:
    p = base_parser(__doc__ or NAME, "(30 artifacts, 1 run)")
    p.add_argument("--artifacts", type=int, default=None, help="generated release dependencies (default 120)")
    p.add_argument("--runs", type=int, default=None, help="direct and warm builds each (default 3)")
    args = p.parse_args()
    apply_quick(args, {"artifacts": 30, "runs": 1}, {"artifacts": 120, "runs": 3})
    tool("mvn")
    tool("javac")
    tool("nginx")
    try:
        plugins = plugin_repository()
    except BaseException as e:  # pytest's skip outside pytest
        raise BenchError(f"no local plugin repository: {e}") from None

    with Bench(NAME, args) as b:
        root = b.path("repo")
        deps = [Artifact(f"dep{i:03d}", "1.0") for i in range(args.artifacts)]
        deps.append(Artifact("snap", "2.0-SNAPSHOT"))
        b.log(f"writing {len(deps)} artifacts")
        publish(root, deps)
        app = project(b.path("app"), deps, MAIN)

        up_port = free_port()
        Nginx(b, "origin", [static_server(up_port, root, "access.log")]).start()
        log = AccessLog(b.path("nginx-origin", "access.log"))
        upstream = f"http://127.0.0.1:{up_port}"
        daemon = Daemon(b, {"central": {"type": "maven", "upstream": upstream}}).start()
        status, _h, body = daemon.request("GET", "/setup/maven?mirrorOf=*,!central")
        if status != 200:
            raise BenchError(f"/setup/maven answered {status}")
        mirror = body.decode()
        cache_settings = b.path("settings-cache.xml")
        cache_settings.write_text(settings(mirror, plugins))
        direct_settings = b.path("settings-direct.xml")
        direct_settings.write_text(settings(mirror.replace(daemon.url("/maven/central/"), upstream + "/"), plugins))

        def build(what: str, settings_file: Path, through_cache: bool) -> dict:
            local = b.path("m2", what)
            shutil.rmtree(local, ignore_errors=True)
            shutil.rmtree(app / "target", ignore_errors=True)
            log.mark()
            cpu0 = cpu_seconds([daemon.pid]) if through_cache else 0.0
            t0 = time.monotonic()
            proc = run_mvn(app, settings_file, local, "compile")
            wall = time.monotonic() - t0
            if proc.returncode != 0:
                raise BenchError(f"{what}: mvn exited {proc.returncode}\n{proc.stdout[-4000:]}")
            if through_cache:
                daemon.wait_idle()
            missing = [a.artifact for a in deps if not (local / a.dir / f"{a.artifact}-{a.version}.jar").is_file()]
            if missing:
                raise BenchError(f"{what}: the local repository lacks the jars of {', '.join(missing[:5])}")
            r = {"what": what, "wall_s": round(wall, 2), "upstream_requests": len(log.settle())}
            if through_cache:
                r["daemon_cpu_s"] = round(cpu_seconds([daemon.pid]) - cpu0, 2)
            b.log(f"{what}: {wall:.1f}s, {r['upstream_requests']} upstream requests"
                  + (f", daemon CPU {r['daemon_cpu_s']:.2f}s" if through_cache else ""))
            return r

        build("warm-up (direct, untimed)", direct_settings, False)
        cold_runs = []
        for i in range(args.runs):
            daemon.fresh_start()  # an empty data dir: every file is fetched again
            cold_runs.append(build(f"cold {i + 1}", cache_settings, True))
        # Direct and warm builds alternate, so that load from other processes
        # falls on both alike.
        direct, warm = [], []
        for i in range(args.runs):
            direct.append(build(f"direct {i + 1}", direct_settings, False))
            warm.append(build(f"warm {i + 1}", cache_settings, True))
        proc = daemon.proc_status()
        hwm_mib = proc["VmHWM"] / (1 << 20)
        print_table(f"{NAME}: mvn compile of a project with {len(deps)} dependencies, empty local repository",
                    ["build", "wall s", "upstream requests", "daemon CPU s"],
                    [[r["what"], r["wall_s"], r["upstream_requests"], r.get("daemon_cpu_s", "-")]
                     for r in [*direct, *cold_runs, *warm]], left=1)
        direct_wall = median(r["wall_s"] for r in direct)
        warm_wall = median(r["wall_s"] for r in warm)
        cold_wall = median(r["wall_s"] for r in cold_runs)
        summary = [
            summary_row("warm build wall time, median", "s", warm_wall, "direct from upstream", direct_wall, "-", None),
            summary_row("cold build wall time, median", "s", cold_wall, "direct from upstream", direct_wall, "-", None),
            summary_row("warm upstream requests, max", "", max(r["upstream_requests"] for r in warm),
                        "direct build", direct[0]["upstream_requests"], "0", all(r["upstream_requests"] == 0
                                                                                   for r in warm)),
            summary_row("daemon CPU, cold build median", "s", median(r["daemon_cpu_s"] for r in cold_runs), "", None,
                        "-", None),
            summary_row("daemon CPU, warm build median", "s", median(r["daemon_cpu_s"] for r in warm), "", None,
                        "-", None),
            summary_row("daemon peak RSS (VmHWM)", "MiB", round(hwm_mib, 1), "", None, f"<= {GOAL_RSS_MIB}",
                        hwm_mib <= GOAL_RSS_MIB),
        ]
        print_summary(f"{NAME} summary", summary)
        daemon.stop()
        b.write_results({
            "params": {"artifacts": len(deps), "runs": args.runs, "upstream": "nginx static",
                       "client": "mvn -B compile, empty local repository per build"},
            "builds": {"direct": direct, "cold": cold_runs, "warm": warm},
            "daemon": {"VmHWM": proc["VmHWM"], "exit_status": daemon.exit_status,
                       "log_problems": daemon.log_problems()[:20]},
            "summary": summary,
        })
    return 0


if __name__ == "__main__":
    run_main(main)
