"""``python -m sparkcache.workers.worker``: one worker process of ``server.workers: N``.

Started by the Supervisor only. It loads the parent's config (its path in
``SPARKCACHE_CONFIG``, the parent's overrides in the environment), adopts the
inherited sockets (``SPARKCACHE_WORKER_FDS``) and runs a SparkcacheService on
them; store-wide timers only when ``SPARKCACHE_WORKER_PRIMARY=1``. The store
was checked by the parent: the worker only opens it. Logs go to stdout, which
the parent copies into its own log. It stops gracefully on SIGTERM, and when
its stdin (a pipe the parent holds) closes: the parent is gone. SIGUSR2
(forwarded by the parent for another worker) re-reads the API's remotes.
"""

from __future__ import annotations

import os
import signal

# The parent forwards every SIGHUP (a reload) to every worker that catches it
# (supervisor.handles); its default action ends the process, and importing
# what follows takes seconds on a busy machine. So it is caught from here,
# and noted: main() reloads once the service runs if one came after the
# config was read.
HUP_SEEN: list[int] = []
if __name__ == "__main__":
    signal.signal(signal.SIGHUP, lambda sig, frame: HUP_SEEN.append(sig))

import faulthandler
import sys
from typing import Any, Mapping

from twisted.internet.protocol import Protocol
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

from sparkcache.config import ConfigError
from sparkcache.workers import metricfiles
from sparkcache.workers.sockets import AdoptedEndpoint, parse_fds, parse_specs, tls_options
from sparkcache.workers.supervisor import spool_subdir

log = Logger()


class _ParentWatch(Protocol):
    """stdin: nothing is ever sent; its end means the parent died."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.reactor.running:
            log.warn("the supervisor is gone; stopping")
            self.reactor.stop()


def _stop_once_on(reactor: Any, signals: tuple[int, ...]) -> None:
    """Replace the reactor's handlers: a worker gets SIGTERM from the parent and,
    under systemd (KillMode=control-group), from systemd too; the second must
    not try to stop a reactor already stopping."""
    def handler(sig: int, frame: Any) -> None:
        if not stopping:
            stopping.append(sig)
            log.info("received signal {sig}; stopping", sig=sig)
            reactor.callFromThread(reactor.stop)

    stopping: list[int] = []
    for sig in signals:
        signal.signal(sig, handler)


def adopted_endpoints(environ: Mapping[str, str], reactor: Any) -> list[AdoptedEndpoint]:
    """The inherited sockets; an ``ssl:`` one under its TLS context, read from
    the certificate files now and again on each SIGHUP (forwarded by the parent:
    renewed certificates reach every worker without a restart)."""
    fds = parse_fds(environ["SPARKCACHE_WORKER_FDS"])
    specs = parse_specs(environ.get("SPARKCACHE_WORKER_LISTEN", "[]"))
    out = []
    for n, (fd, family) in enumerate(fds):
        spec = specs[n] if n < len(specs) else ""
        try:
            tls = tls_options(reactor, spec)
        except Exception as e:  # a certificate the parent loaded may since have gone or changed
            raise ConfigError(environ.get("SPARKCACHE_CONFIG", ""), "server.listen", f"{spec!r}: {e}") from None
        out.append(AdoptedEndpoint(reactor, fd, family, tls=tls))
    return out


def build(environ: Mapping[str, str], reactor: Any) -> Any:
    """The worker's SparkcacheService, from the environment the Supervisor set."""
    from sparkcache.protocols import load_config
    from sparkcache.service import SparkcacheService

    path = environ["SPARKCACHE_CONFIG"]
    config = load_config(path, dict(environ))
    endpoints = adopted_endpoints(environ, reactor)
    # config_path: SIGHUP (forwarded by the parent) reloads the file here as in one process.
    service = SparkcacheService(config, reactor, config_path=path, environ=dict(environ), endpoints=endpoints,
                                primary=environ.get("SPARKCACHE_WORKER_PRIMARY") == "1", check_store=False,
                                spool_subdir=spool_subdir(int(environ["SPARKCACHE_WORKER"])),
                                worker=int(environ["SPARKCACHE_WORKER"]))
    # The other workers write this index too: cached rows are checked against change stamps.
    service.store.index.watch_changes()
    if not service.store.backed:
        # Which keys no worker ever stored: a cold miss then skips the index (store/keyfilter.py).
        service.store.index.share_keys()
    # A write error or a low disk one worker sees holds for all; the primary alone evicts for space.
    service.store.share_space(evicts=service.primary)
    return service


def _start(service: Any) -> None:
    service.startService()  # installs the service's own SIGHUP handler (a reload)
    if HUP_SEEN:
        log.info("SIGHUP while starting: reloading now")
        os.kill(os.getpid(), signal.SIGHUP)


def main() -> None:
    from twisted.internet import reactor as _reactor
    from twisted.internet import stdio as _stdio

    reactor: Any = _reactor
    stdio: Any = _stdio  # mypy sees the Windows StandardIO signature

    # A fatal signal (SIGSEGV, SIGBUS: a mapped file on a full disk) leaves the
    # Python stack in the parent's log, where "died (signal 7)" alone says little.
    faulthandler.enable()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    # Before any metric exists: its sample files get real blocks (no SIGBUS on a full disk).
    metricfiles.install()
    HUP_SEEN.clear()  # one before this point is in the file build() reads
    try:
        service = build(os.environ, reactor)
    except ConfigError as e:
        sys.exit(f"configuration error: {e}")
    # SIGUSR2 (another worker changed the API remotes) must not end it either: the service re-reads them once it starts.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    reactor.callWhenRunning(_start, service)
    reactor.callWhenRunning(_stop_once_on, reactor, (signal.SIGTERM, signal.SIGINT))
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    stdio.StandardIO(_ParentWatch(reactor), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))
    reactor.run()


if __name__ == "__main__":
    main()
