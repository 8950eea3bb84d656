#!/usr/bin/env python3
"""OCI pulls: sparkcache (``type: oci`` pull-through) versus distribution in proxy mode.

An image of about 200 MiB (several uncompressed layers of random bytes, so
nothing compresses them away) is built offline and pushed to an upstream
``docker-registry`` on 127.0.0.1. Two pull-through caches sit in front of it,
each behind its own byte-counting TCP relay (so upstream bytes are measured
the same way for both):

* sparkcache, with a ``type: oci`` remote (path routing:
  ``/v2/<remote>/<name>``);
* a second ``docker-registry`` with ``proxy: remoteurl:`` (Debian's
  ``docker-registry``, i.e. distribution, the reference).

Clients are ``skopeo copy docker://... oci:<tmp>`` (layers fetched in
parallel, as containerd does), one or eight in parallel,
released together. *Cold*: the cache's storage is emptied and the cache
restarted before the pull; *warm*: the same pull again right after. Runs
alternate between the two caches; medians of ``--runs`` are reported, along
with the upstream bytes each cold pull cost.

Goals (issue 4): warm pulls take at most 1.0x distribution's time; cold with 8
parallel pulls at most 1.0x, and upstream bytes equal to 1x the image size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import (LOOPBACK, MiB, REPO, Bench, BenchError, Daemon, _die_with_parent, _stop_process, apply_quick,
                    base_parser, clean_env, fmt_size, free_port, median, print_summary, print_table, run_main,
                    summary_row, tool, wait_port)

sys.path.insert(0, str(REPO))
from tests.support.oci_images import Image, blob_path, build_image, layout_manifest_digest  # noqa: E402

NAME = "oci_pull"
REPO_NAME = "bench/app"
TAG = "v1"


# -- a byte-counting TCP relay in front of the upstream registry --------------------------------------


class CountingRelay:
    """Relays 127.0.0.1:<port> to the upstream and counts the bytes the upstream sends back."""

    def __init__(self, target_port: int) -> None:
        self.target = (LOOPBACK, target_port)
        self.port = free_port()
        self.down = 0  # upstream → cache
        self.up = 0  # cache → upstream
        self.connections = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def start(self) -> "CountingRelay":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((LOOPBACK, self.port))
        s.listen(128)
        self._sock = s
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def reset(self) -> None:
        with self._lock:
            self.down = self.up = self.connections = 0

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                dst.sendall(view[:n])
                with self._lock:
                    if downstream:
                        self.down += n
                    else:
                        self.up += n
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- docker-registry (distribution) ---------------------------------------------------------------------


class Registry:
    """``docker-registry serve`` on 127.0.0.1, plain or as a pull-through proxy of ``remote``."""

    def __init__(self, bench: Bench, name: str, remote: str | None = None) -> None:
        self.bench = bench
        self.dir = bench.path(name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.dir / "storage"
        self.port = free_port()
        self.remote = remote
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Registry":
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True},
                        "cache": {"blobdescriptor": "inmemory"}},
            "http": {"addr": f"{LOOPBACK}:{self.port}", "secret": os.urandom(8).hex()},
        }
        if self.remote:
            cfg["proxy"] = {"remoteurl": self.remote}
        conf = self.dir / "config.yml"
        conf.write_text(json.dumps(cfg))  # JSON is YAML
        log = open(self.dir / "registry.log", "ab")
        try:
            self.proc = subprocess.Popen([tool("docker-registry"), "serve", str(conf)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean_env(),
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.bench.on_cleanup(self.stop)
        wait_port(self.port, 20, lambda: self.proc is not None and self.proc.poll() is None)
        return self

    def fresh_start(self) -> None:
        self.stop()
        shutil.rmtree(self.storage, ignore_errors=True)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            _stop_process(proc, 15, 20)

    def cpu_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


# -- clients ----------------------------------------------------------------------------------------------


def skopeo_pull(src: str, dest: Path, gate: int | None = None) -> subprocess.Popen[bytes]:
    # An OCI layout, not dir:, as the destination: skopeo fetches layers in
    # parallel only into destinations that take concurrent writes, as
    # containerd does; uncompressed layers are kept as they are.
    cmd = [tool("skopeo"), "copy", "--src-tls-verify=false", "--retry-times", "0",
           "--dest-oci-accept-uncompressed-layers", src, f"oci:{dest}:{TAG}"]
    if gate is not None:
        # bash: dash's redirections take single-digit descriptors only
        cmd = [tool("bash"), "-c", f'read _ <&{gate} || exit 99; exec "$@"', "gated-skopeo"] + cmd
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=clean_env(), preexec_fn=_die_with_parent, pass_fds=(gate,) if gate is not None else ())


def pull_together(src: str, dests: list[Path]) -> float:
    """``len(dests)`` skopeo pulls released at one instant; seconds until the last finished."""
    for d in dests:
        shutil.rmtree(d, ignore_errors=True)
    r_fd, w_fd = os.pipe()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        try:
            procs = [skopeo_pull(src, d, r_fd) for d in dests]
        finally:
            os.close(r_fd)
        t0 = time.monotonic()
        os.write(w_fd, b"\n" * len(procs))
        os.close(w_fd)
        w_fd = -1
        errors = []
        for p in procs:
            _out, err = p.communicate(timeout=900)
            if p.returncode != 0:
                errors.append(err.decode(errors="replace").strip()[-500:])
        wall = time.monotonic() - t0
    finally:
        if w_fd >= 0:
            os.close(w_fd)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if errors:
        raise BenchError(f"{len(errors)} of {len(procs)} pulls of {src} failed: {errors[0]}")
    return wall


def cpu_seconds(proc: subprocess.Popen[bytes] | None) -> float:
    """User + system CPU of a server process so far, all its threads (from /proc).

    On a shared machine wall times swing with other people's load; the CPU a
    cache spends serving the same pulls does not, and is its own overhead."""
    if proc is None:
        return 0.0
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_copy(dest: Path, image: Image, full: bool) -> None:
    """The pulled manifest is the pushed one, byte for byte; ``full`` hashes every blob too."""
    got = layout_manifest_digest(dest, TAG)
    if got != image.manifest_digest or blob_path(dest, got).read_bytes() != image.manifest:
        raise BenchError(f"{dest}: manifest {got}, expected {image.manifest_digest}")
    if full:
        for digest in (image.config_digest, *image.layer_digests):
            h = hashlib.sha256()
            with open(blob_path(dest, digest), "rb") as f:
                for chunk in iter(lambda: f.read(4 * MiB), b""):
                    h.update(chunk)
            if f"sha256:{h.hexdigest()}" != digest:
                raise BenchError(f"{dest}: blob {digest} has sha256:{h.hexdigest()}")


# -- the scenario ------------------------------------------------------------------------------------------


def layer_sizes(total: int, layers: int) -> list[int]:
    """``layers`` sizes summing to about ``total``, largest first (as real images tend to be)."""
    weights = list(range(layers, 0, -1))
    return [max(1024, total * w // sum(weights)) for w in weights]


def main() -> int:
    p = base_parser(__doc__ or NAME, "(40 MiB image, 1 run)")
    p.add_argument("--size", type=lambda s: int(float(s.rstrip("MiB")) * MiB) if s.endswith("MiB") else int(s),
                   default=None, help="image size, e.g. 200MiB (default 200MiB; --quick 40MiB)")
    p.add_argument("--layers", type=int, default=None, help="layers in the image (default 8)")
    p.add_argument("--runs", type=int, default=None, help="runs of each measurement (default 2)")
    p.add_argument("--parallel", type=int, default=8, help="parallel pulls in the parallel phases")
    args = p.parse_args()
    apply_quick(args, {"size": 40 * MiB, "runs": 1}, {"size": 200 * MiB, "layers": 8, "runs": 2})
    size, runs, par = args.size, max(1, args.runs), args.parallel

    with Bench(NAME, args) as b:
        b.check_disk((par + 4) * size + 512 * MiB)
        b.log(f"building a {fmt_size(size)} image with {args.layers} layers")
        image = build_image(b.path("layout"), TAG, layer_sizes(size, args.layers), seed=4)
        origin = Registry(b, "origin").start()
        b.log(f"pushing it to docker-registry on port {origin.port}")
        out = subprocess.run([tool("skopeo"), "copy", "--preserve-digests", "--dest-tls-verify=false", image.ref,
                              f"docker://{LOOPBACK}:{origin.port}/{REPO_NAME}:{TAG}"],
                             capture_output=True, text=True, env=clean_env(), timeout=600)
        if out.returncode != 0:
            raise BenchError(f"push to the origin registry failed: {out.stderr[-800:]}")

        relays = {"sparkcache": CountingRelay(origin.port).start(), "distribution": CountingRelay(origin.port).start()}
        b.on_cleanup(lambda: [r.stop() for r in relays.values()])
        daemon = Daemon(b, {"up": {"type": "oci", "upstream": f"http://{LOOPBACK}:{relays['sparkcache'].port}"}})
        daemon.start()
        ref = Registry(b, "distribution-proxy", remote=f"http://{LOOPBACK}:{relays['distribution'].port}").start()
        sources = {
            "sparkcache": lambda: f"docker://{LOOPBACK}:{daemon.port}/up/{REPO_NAME}:{TAG}",
            "distribution": lambda: f"docker://{LOOPBACK}:{ref.port}/{REPO_NAME}:{TAG}",
        }

        def make_cold(who: str) -> None:
            if who == "sparkcache":
                daemon.fresh_start()
            else:
                ref.fresh_start()

        dests = [b.path("pulls", f"p{i}") for i in range(par)]
        for d in dests:
            d.parent.mkdir(parents=True, exist_ok=True)

        # One untimed, verified cold + warm pull through each before the timed runs.
        for who in ("sparkcache", "distribution"):
            make_cold(who)
            pull_together(sources[who](), dests[:1])
            check_copy(dests[0], image, full=True)
            pull_together(sources[who](), dests[:1])
            check_copy(dests[0], image, full=True)
            b.log(f"verified cold and warm pulls through {who}")

        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            who: {phase: [] for phase in ("cold1", "warm1", f"cold{par}", f"warm{par}")} for who in sources}
        rows = []
        for run in range(runs):
            for n in (1, par):
                for who in ("sparkcache", "distribution"):
                    relay = relays[who]
                    make_cold(who)
                    for phase in ("cold", "warm"):
                        relay.reset()
                        server = daemon.proc if who == "sparkcache" else ref.proc
                        cpu0 = cpu_seconds(server)
                        wall = pull_together(sources[who](), dests[:n])
                        cpu = cpu_seconds(server) - cpu0
                        for d in dests[:n]:
                            check_copy(d, image, full=False)
                        if who == "sparkcache":
                            daemon.wait_idle()
                        r = {"seconds": wall, "upstream_bytes": relay.down, "upstream_connections": relay.connections,
                             "sent_upstream": relay.up, "server_cpu_seconds": cpu}
                        results[who][f"{phase}{n}"].append(r)
                        rows.append([str(run + 1), f"{phase} x{n}", who, f"{wall:.2f}", f"{cpu:.2f}",
                                     fmt_size(relay.down), f"{relay.down / image.size:.2f}", relay.connections])
                        b.log(f"run {run + 1} {phase} x{n} {who}: {wall:.2f}s, server CPU {cpu:.2f}s, "
                              f"upstream {fmt_size(relay.down)}")
        print_table(f"{NAME}: {fmt_size(image.size)} image, {args.layers} layers, skopeo copy to oci:",
                    ["run", "phase", "cache", "seconds", "server CPU s", "upstream bytes", "x image", "upstream conns"],
                    rows, left=3)

        def med(who: str, phase: str, key: str = "seconds") -> float:
            return median(x[key] for x in results[who][phase])

        summary = []
        for phase, goal in (("warm1", 1.0), (f"warm{par}", 1.0), ("cold1", None), (f"cold{par}", 1.0)):
            s, d = med("sparkcache", phase), med("distribution", phase)
            summary.append(summary_row(f"{phase} pull time, median", "s", s, "distribution proxy", d,
                                       f"<= {goal:.1f}x" if goal else "-", (s <= goal * d) if goal else None))
        for phase in ("warm1", f"warm{par}", "cold1", f"cold{par}"):
            s, d = med("sparkcache", phase, "server_cpu_seconds"), med("distribution", phase, "server_cpu_seconds")
            summary.append(summary_row(f"{phase} server CPU, median", "s", s, "distribution proxy", d, "-", None))
        for phase in ("cold1", f"cold{par}"):
            s, d = med("sparkcache", phase, "upstream_bytes"), med("distribution", phase, "upstream_bytes")
            summary.append(summary_row(f"{phase} upstream bytes / image size", "x", s / image.size,
                                       "distribution proxy", d / image.size, "= 1x (+headers)",
                                       s / image.size < 1.02 if phase == f"cold{par}" else None))
        print_summary(f"{NAME} summary (median of {runs})", summary)
        daemon.stop()
        b.write_results({
            "params": {"image_bytes": image.size, "layers": args.layers, "runs": runs, "parallel": par,
                       "client": "skopeo copy docker://... oci: (parallel layers)", "reference": "docker-registry proxy mode"},
            "image": {"manifest_digest": image.manifest_digest, "layers": list(image.layer_digests)},
            "runs": results,
            "summary": summary,
            "checks": {"daemon_exit_status": daemon.exit_status, "daemon_log_problems": daemon.log_problems()[:20]},
        })
    return 0


if __name__ == "__main__":
    run_main(main)
