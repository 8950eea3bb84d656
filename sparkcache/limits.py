"""Process limits the daemon sets for itself at start.

A cache host holds a connection, a store file and often an upstream socket
per client; the usual soft ``RLIMIT_NOFILE`` (1024) is far below what the
hard limit allows. Every process of the daemon (the single process, or the
supervisor and each worker) raises its soft limit to the hard one before it
builds anything that sizes itself from it (``server.max_connections``'s
default is three quarters of the soft limit). The daemon logs the limit
once: the single process, or the supervisor (its workers inherit the raised
limit and raise it silently).
"""

from __future__ import annotations

import resource

from twisted.logger import Logger

log = Logger()

_logged = False


def raise_nofile(quiet: bool = False) -> tuple[int, int]:
    """Raise the soft open-file limit to the hard limit; returns the (soft,
    hard) limits now in effect. Logged the first time in this process unless ``quiet``."""
    global _logged
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, why = before, ""
    if before != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # e.g. an unlimited hard limit above fs.nr_open
            why = f" (could not raise it: {e})"
    if not _logged and not quiet:
        _logged = True
        raised = f", raised from {_show(before)}" if soft != before else ""
        log.info("open-file limit {soft} (hard {hard}{raised}){why}", soft=_show(soft), hard=_show(hard),
                 raised=raised, why=why)
    return soft, hard


def _show(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else str(n)
