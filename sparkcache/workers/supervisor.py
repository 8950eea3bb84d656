"""The parent of ``server.workers: N``: sockets, the store check, N workers.

It never accepts a connection and never opens the store after the start-up
check: it listens once (so systemd and clients see one service on the
configured sockets), hands the sockets to N ``sparkcache.workers.worker``
processes, restarts a worker that exits, forwards SIGHUP (and SIGUSR2, which
a worker sends it after a remotes API change, to every worker), and on stop
forwards SIGTERM and waits for the workers to drain (docs/workers.rst).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from sparkcache.config import Config
from sparkcache.limits import raise_nofile
from sparkcache.store.index import prepare_key_filter
from sparkcache.store.space import reset_shared
from sparkcache.store.spool import clear_spool
from sparkcache.workers.sockets import Listener, close_listeners, format_fds, format_specs, open_listeners

log = Logger()

RESTART_MIN = 0.5
RESTART_MAX = 30.0
# A worker that lived this long was healthy: its next restart is immediate-ish again.
STABLE_AFTER = 60.0
# Past server.shutdown_timeout, how long a worker gets to exit before SIGKILL.
KILL_GRACE = 5.0
FIRST_FD = 3


class WorkerProtocol(ProcessProtocol):
    """One worker: its output into the parent's log, its end to the supervisor."""

    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.started = 0.0
        self.ended: Deferred[None] = Deferred()
        self._partial = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.started = self.supervisor.clock.seconds()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buf = self._partial.get(fd, b"") + data
        *lines, self._partial[fd] = buf.split(b"\n")
        for line in lines:
            log.info("[worker {i} {pid}] {line}", i=self.index, pid=self.pid,
                     line=line.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self.childDataReceived(fd, b"\n")
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.supervisor.worker_ended(self, code, sig)
        self.ended.callback(None)

    def signal(self, sig: int) -> None:
        try:
            self.transport.signalProcess(sig)  # type: ignore[union-attr]
        except Exception:  # already gone
            pass


def check_store(config: Config) -> Deferred[None]:
    """The start-up store check (spool sweep, rows against bodies), once, in the
    parent, before any worker opens the store: no other process may be using it."""
    from sparkcache.store import Store

    async def run() -> None:
        from twisted.internet import reactor

        content = None
        pool = None
        if config.storage.backend == "s3":
            # Bodies in a bucket: the check empties the spool and checks the tier
            # (its ledger against its files); rows without a tier copy are normal.
            from twisted.python.threadpool import ThreadPool

            from sparkcache.store.s3 import content_store

            pool = ThreadPool(minthreads=1, maxthreads=2, name="sparkcache-check")
            pool.start()
            content = content_store(config.storage, reactor, pool)
        try:
            store = Store(config.storage.data_dir, reactor, config.storage.max_size, io_pool=pool, content=content)
            await store.start()
            await store.stop()
        finally:
            if pool is not None:
                pool.stop()

    return ensureDeferred(run())


def spool_subdir(index: int) -> str:
    """Worker ``index``'s own directory in the spool: only it writes there, so
    the parent may empty it before starting that worker (again)."""
    return f"w{index}"


def reset_metrics_dir(path: str) -> None:
    """Values of a previous run are not this run's: start from an empty directory."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        # The metric files, the status page's history, each worker's last upstream errors (web/status.py)
        # and the temporary files of a worker killed while writing one (workers/metricfiles.py).
        if name.endswith((".db", ".json", ".new", ".tmp")):
            os.unlink(os.path.join(path, name))


def mark_dead(path: str, pid: int) -> None:
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, path)
    except OSError as e:
        log.warn("metrics of worker pid {pid}: {e}", pid=pid, e=e)


def handles(pid: int, sig: int) -> bool:
    """Whether process ``pid`` catches or ignores ``sig`` (Linux: /proc; elsewhere assumed)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = {k: int(v, 16) for k, _, v in (line.partition(":") for line in f)
                     if k in ("SigCgt", "SigIgn")}
    except (OSError, ValueError):
        return True
    bit = 1 << (sig - 1)
    return any(m & bit for m in masks.values())


def worker_command() -> list[str]:
    return [sys.executable, "-m", "sparkcache.workers.worker"]


class Supervisor(Service):
    """Runs ``config.server.workers`` workers over the listeners of ``config``.

    ``config_path`` and ``environ`` (the ``SPARKCACHE_*`` overrides the parent
    was started with) let each worker load exactly the parent's config.
    ``spawn`` is ``reactor.spawnProcess`` (tests pass a fake), ``check_store``
    the once-only store check (None: skip it)."""

    def __init__(self, config: Config, config_path: str, environ: Mapping[str, str], reactor: Any = None,
                 clock: Any = None, spawn: Callable[..., Any] | None = None,
                 check_store: Callable[[], Deferred[Any]] | None = None,
                 in_thread: Callable[..., Deferred[Any]] | None = None) -> None:
        raise_nofile()  # the workers inherit it
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.config = config
        self.config_path = os.path.abspath(config_path)
        self.environ = dict(environ)
        self.reactor = reactor
        self.clock = clock or reactor
        self.spawn = spawn or reactor.spawnProcess
        self.check_store = check_store
        self.in_thread = in_thread or (lambda fn, *a: deferToThread(fn, *a))
        self.spool_dir = os.path.join(os.path.abspath(config.storage.data_dir), "spool")
        self.count = config.server.workers
        self.listeners: list[Listener] = []
        self.workers: dict[int, WorkerProtocol] = {}
        self.backoff: dict[int, float] = {}
        self.pending: dict[int, Any] = {}  # index -> the delayed call restarting it
        self.stopping = False
        self.ready: Deferred[None] = Deferred()
        # Every worker's metric values, aggregated by whichever worker renders /metrics.
        self.metrics_dir = os.path.join(os.path.abspath(config.storage.data_dir), "metrics")

    def startService(self) -> None:
        super().startService()
        from sparkcache.service import start_failed

        ensureDeferred(self._start()).addErrback(start_failed, self.reactor, self.ready)

    async def _start(self) -> None:
        if hasattr(self.reactor, "addSystemEventTrigger"):
            # First: twistd leaves SIGHUP's default action (the end of the
            # process), and the store check below can take minutes; a reload
            # meanwhile has no worker to reach (they read the file as they start).
            self._install_sighup()
        self.listeners = await open_listeners(self.reactor, self.config.server.listen)
        if self.check_store is not None:
            await self.check_store()
        reset_metrics_dir(self.metrics_dir)
        reset_shared(self.config.storage.data_dir)  # a previous run's disk state is not this run's
        # This run's key filter (store/keyfilter.py), new and empty: the primary fills it.
        await self.in_thread(prepare_key_filter, self.config.storage.data_dir, self.config.storage.backend != "s3")
        for i in range(self.count):
            clear_spool(os.path.join(self.spool_dir, spool_subdir(i)))
        for i in range(self.count):
            self._spawn(i)
        log.info("sparkcache listening on {listen} with {n} worker processes; data in {data}",
                 listen=", ".join(self.config.server.listen), n=self.count, data=self.config.storage.data_dir)
        self.ready.callback(None)

    def _install_sighup(self) -> None:
        try:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.forward, signal.SIGHUP))
            # A worker changed the API remotes: every worker re-reads them (reload.Spread).
            signal.signal(signal.SIGUSR2, lambda *_: self.reactor.callFromThread(self.forward, signal.SIGUSR2))
        except ValueError:  # not the main thread (tests)
            pass

    def _env(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.environ)
        env["SPARKCACHE_CONFIG"] = self.config_path
        env["SPARKCACHE_WORKER"] = str(index)
        env["SPARKCACHE_WORKER_PRIMARY"] = "1" if index == 0 else "0"
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        env["SPARKCACHE_WORKER_FDS"] = format_fds([(FIRST_FD + n, l.family) for n, l in enumerate(self.listeners)])
        # The same order: the worker wraps an ssl: socket in TLS (sockets.tls_options).
        env["SPARKCACHE_WORKER_LISTEN"] = format_specs([l.spec for l in self.listeners])
        return env

    def _spawn(self, index: int) -> None:
        self.pending.pop(index, None)
        if self.stopping:
            return
        proto = WorkerProtocol(self, index)
        # stdin is a pipe the parent holds: a worker whose parent died sees it close and stops.
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for n, listener in enumerate(self.listeners):
            fds[FIRST_FD + n] = listener.fd
        cmd = worker_command()
        self.spawn(proto, cmd[0], cmd, env=self._env(index), path=os.getcwd(), childFDs=fds)
        self.workers[index] = proto
        log.info("started worker {i} (pid {pid}){primary}", i=index, pid=proto.pid,
                 primary=" as primary" if index == 0 else "")

    def worker_ended(self, proto: WorkerProtocol, code: int | None, sig: int | None) -> None:
        index = proto.index
        if proto.pid is not None:  # its live gauges leave the aggregate; its counters stay
            mark_dead(self.metrics_dir, proto.pid)
        if self.workers.get(index) is proto:
            del self.workers[index]
        if self.stopping:
            log.info("worker {i} (pid {pid}) exited", i=index, pid=proto.pid)
            return
        lived = self.clock.seconds() - proto.started
        delay = RESTART_MIN if lived >= STABLE_AFTER else min(RESTART_MAX, self.backoff.get(index, RESTART_MIN / 2) * 2)
        self.backoff[index] = delay
        why = f"signal {sig}" if sig is not None else f"status {code}"
        log.warn("worker {i} (pid {pid}) died ({why}); restarting it in {d}s", i=index, pid=proto.pid, why=why, d=delay)
        self.pending[index] = self.clock.callLater(delay, self._restart, index)

    def _restart(self, index: int) -> None:
        # The dead worker's unfinished spool files: nobody will finish them.
        d = self.in_thread(clear_spool, os.path.join(self.spool_dir, spool_subdir(index)))
        d.addErrback(lambda f: log.warn("emptying worker {i}'s spool: {why}", i=index, why=f.getErrorMessage()))
        d.addCallback(lambda _: self._spawn(index))

    def forward(self, sig: int) -> None:
        for proto in list(self.workers.values()):
            if sig in (signal.SIGUSR2, signal.SIGHUP) and proto.pid is not None and not handles(proto.pid, sig):
                # Still starting: the default action would kill it; it reads the
                # config (and api.json) as it starts, so it misses nothing.
                continue
            proto.signal(sig)

    def pids(self) -> list[int]:
        return [p.pid for p in self.workers.values() if p.pid is not None]

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.stopping = True
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
        procs = list(self.workers.values())
        ends = [p.ended for p in procs]
        self.forward(signal.SIGTERM)
        if ends:
            grace = self.config.server.shutdown_timeout + KILL_GRACE
            kill = self.clock.callLater(grace, self._kill_all, procs)
            await DeferredList(ends, consumeErrors=True)
            if kill.active():
                kill.cancel()
        close_listeners(self.listeners)
        self.listeners = []
        # A graceful stop is a success (as SparkcacheService._stop says).
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None

    def _kill_all(self, procs: list[WorkerProtocol]) -> None:
        log.warn("workers did not stop within the deadline; killing them")
        for proto in procs:
            proto.signal(signal.SIGKILL)
