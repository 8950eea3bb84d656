"""What the status page and ``GET /status.json`` show, and what ``/ready`` decides.

Every figure is read from the daemon's one :class:`~sparkcache.metrics.Metrics`
registry (the counters ``/metrics`` exposes), the store and the cache, so the
page and a Prometheus scrape taken at the same moment agree. The chart of the
last hour comes from :class:`History`, a ring buffer of cumulative totals that
a clocked timer (:meth:`Status.timer`) fills every ``SAMPLE_INTERVAL`` seconds;
a sample costs a few dictionary reads, and an hour of them a few tens of KiB.

With worker processes (``server.workers > 1``) every figure is the whole
daemon's, the same whichever worker answers: the counters and gauges come
from the aggregate of every worker's metric files (as ``/metrics``), the
store's state from the files they share, and the history is sampled by the
primary alone, which writes it to ``<data_dir>/metrics/status-history.json``
after each sample; the other workers read that file.

Hit ratio: responses served from the store (``hit``, ``stale``,
``revalidated``) over those plus the ones that went upstream (``miss``,
``joined``...); errors and pass-through requests count as requests but in
neither side of the ratio.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from twisted.application.service import IServiceCollection
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

import sparkcache
from sparkcache.context import Context
from sparkcache.fetch.upstream import origin_name
from sparkcache.metrics import Metrics, UpstreamOutcome, multiprocess_dir, sample_values
from sparkcache.timers import Periodic

log = Logger()

SAMPLE_INTERVAL = 10.0
HISTORY_SIZE = 360  # one hour of samples
# With worker processes: how often each writes its last upstream errors for the others (when they changed).
ERRORS_INTERVAL = 1.0
HIT_RESULTS = frozenset({"hit", "stale", "revalidated"})
NEITHER = frozenset({"error", "pass"})  # counted as requests, in neither side of the ratio
# Served-bytes sources; anything else (git packs computed here...) is "other".
CACHE, UPSTREAM = "cache", "upstream"


@dataclass
class Totals:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    errors: int = 0
    bytes_cache: int = 0
    bytes_upstream: int = 0
    bytes_other: int = 0

    @property
    def hit_ratio(self) -> float | None:
        counted = self.hits + self.misses
        return self.hits / counted if counted else None

    def add_result(self, result: str, n: int) -> None:
        self.requests += n
        if result in HIT_RESULTS:
            self.hits += n
        elif result == "error":
            self.errors += n
        elif result not in NEITHER:
            self.misses += n

    def add_bytes(self, source: str, n: int) -> None:
        if source == CACHE:
            self.bytes_cache += n
        elif source == UPSTREAM:
            self.bytes_upstream += n
        else:
            self.bytes_other += n

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "hit_ratio": self.hit_ratio}


def totals(metrics: Metrics, families: Iterable[Any] | None = None) -> tuple[Totals, dict[str, Totals]]:
    """The whole daemon's totals and each remote's, from the metric counters
    (``families``: what ``metrics.collect()`` gave, when already at hand)."""
    responses, served = metrics.totals(families)
    overall = Totals()
    per: dict[str, Totals] = {}
    for (remote, result), value in responses.items():
        overall.add_result(result, int(value))
        per.setdefault(remote, Totals()).add_result(result, int(value))
    for (remote, source), value in served.items():
        overall.add_bytes(source, int(value))
        per.setdefault(remote, Totals()).add_bytes(source, int(value))
    return overall, per


COLUMNS = ("time", "hits", "misses", "bytes_cache", "bytes_upstream")


class History:
    """The last ``size`` samples of the cumulative totals, oldest first. Counters
    only grow, so the page draws the difference between neighbours."""

    def __init__(self, interval: float = SAMPLE_INTERVAL, size: int = HISTORY_SIZE) -> None:
        self.interval = interval
        self.samples: deque[tuple[float, int, int, int, int]] = deque(maxlen=size)

    def add(self, now: float, t: Totals) -> None:
        self.samples.append((now, t.hits, t.misses, t.bytes_cache, t.bytes_upstream))

    def as_json(self) -> dict[str, Any]:
        return {"interval": self.interval, "size": self.samples.maxlen, "columns": list(COLUMNS),
                "samples": [list(s) for s in self.samples]}

    def load(self, data: Any) -> None:
        """Take the samples of ``as_json``'s output (another process's history)."""
        self.samples.clear()
        for row in data.get("samples", []) if isinstance(data, dict) else []:
            if isinstance(row, list) and len(row) == len(COLUMNS):
                self.samples.append((float(row[0]), *(int(v) for v in row[1:])))  # type: ignore[arg-type]


HISTORY_FILE = "status-history.json"


def write_json(path: str, data: Any) -> None:
    """Blocking (I/O pool): replace a file shared with the other workers whole (a reader never sees half of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        # A full disk: no half-written temp file stays behind (nothing removes it later).
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Any:
    """Blocking (I/O pool): a file shared by another worker, or None when there is none (yet)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# This process's index among server.workers (set by the supervisor); None: the only process.
WORKER = int(os.environ["SPARKCACHE_WORKER"]) if os.environ.get("SPARKCACHE_WORKER", "").isdigit() else None
# A failure another worker saw whose text it has not shared yet (it does within ERRORS_INTERVAL).
ELSEWHERE = "failed in another worker process (its log says why)"


def inflight(ctx: Context, families: Iterable[Any]) -> int:
    """Productions in progress in the whole daemon."""
    if multiprocess_dir():
        return int(sum(sample_values(families, "sparkcache_inflight_fetches").values()))
    return ctx.cache.inflight


ERRORS_PREFIX = "upstream-errors-"
Texts = dict[str, tuple[float, str]]  # name -> (when it failed, the error)


def write_errors(folder: str, data: dict[str, Texts]) -> None:
    """Blocking (I/O pool): this worker's last upstream errors, for the others' status."""
    write_json(os.path.join(folder, f"{ERRORS_PREFIX}{os.getpid()}.json"), data)


def read_errors(folder: str) -> dict[str, Texts]:
    """Blocking (I/O pool): the latest error of each origin and remote over every worker's file."""
    out: dict[str, Texts] = {"origins": {}, "remotes": {}}
    try:
        names = [n for n in os.listdir(folder) if n.startswith(ERRORS_PREFIX) and n.endswith(".json")]
    except OSError:
        return out
    for name in names:
        data = read_json(os.path.join(folder, name))
        for kind, texts in out.items():
            rows = data.get(kind) if isinstance(data, dict) else None
            for key, row in (rows or {}).items():
                if isinstance(row, list) and len(row) == 2 and (key not in texts or row[0] > texts[key][0]):
                    texts[key] = (float(row[0]), str(row[1]))
    return out


def _texts(outcomes: dict[str, UpstreamOutcome]) -> Texts:
    return {k: (o.last_failure, o.last_error) for k, o in outcomes.items()
            if o.last_failure is not None and o.last_error is not None}


def merged_outcomes(local: dict[str, UpstreamOutcome], families: Iterable[Any], ok_name: str, failed_name: str,
                    label: str, texts: Texts | None = None) -> dict[str, UpstreamOutcome]:
    """With worker processes: each name's last success and failure over every
    worker (the timestamp gauges, aggregated by max), and the latest error
    text any worker shared (``texts``). One process: ``local`` as it is."""
    if not multiprocess_dir():
        return local
    texts = texts or {}
    families = list(families)
    ok = {k[0]: v for k, v in sample_values(families, ok_name, label).items()}
    failed = {k[0]: v for k, v in sample_values(families, failed_name, label).items()}
    out: dict[str, UpstreamOutcome] = {}
    for name in set(local) | set(ok) | set(failed):
        mine = local.get(name) or UpstreamOutcome()
        last_ok = max((t for t in (mine.last_success, ok.get(name)) if t), default=None)
        last_failed = max((t for t in (mine.last_failure, failed.get(name)) if t), default=None)
        if last_failed is not None and mine.last_failure == last_failed:
            error = mine.last_error
        else:
            error = texts[name][1] if name in texts else ELSEWHERE
        out[name] = UpstreamOutcome(last_ok, last_failed, error if last_failed is not None else None,
                                    last_failed is not None and (last_ok is None or last_failed >= last_ok))
    return out


def outcome_json(o: UpstreamOutcome | None) -> dict[str, Any]:
    o = o or UpstreamOutcome()
    state = "unknown" if o.last_success is None and o.last_failure is None else "failing" if o.failing else "ok"
    return {"state": state, "last_success": o.last_success, "last_failure": o.last_failure,
            "last_error": o.last_error}


class Status:
    """The status of one daemon: built by the service tree, read by the admin app."""

    def __init__(self, ctx: Context, services: IServiceCollection | None = None,
                 interval: float = SAMPLE_INTERVAL, size: int = HISTORY_SIZE) -> None:
        """``services``: where to find the git service (named ``git``) for its mirrors."""
        self.ctx = ctx
        self.services = services
        self.history = History(interval, size)
        # With worker processes: the history every worker shows, kept by the primary (module doc).
        folder = multiprocess_dir() if ctx.config.server.workers > 1 else None
        self.history_path = os.path.join(folder, HISTORY_FILE) if folder else None
        self.loaded = False  # the primary: whether it took up the history of its predecessor
        self._errors_shared = 0  # Metrics.outcomes_changed when this worker's errors were last written
        self._write_failed = False  # the last write of a shared file failed (a full disk): said once
        # Set by the service tree as it starts and stops (see readiness()).
        self.store_open = False
        self.listening = False
        self.stopping = False

    def share_errors_timer(self) -> Periodic | None:
        """With worker processes: each second, this worker's last upstream
        errors into its file when they changed (the other workers show them)."""
        if self.history_path is None:
            return None
        return Periodic("status-errors", ERRORS_INTERVAL, self._share_errors, self.ctx.clock)

    async def _share_errors(self) -> None:
        metrics = self.ctx.metrics
        changed = metrics.outcomes_changed
        if changed == self._errors_shared:
            return
        data = {"origins": _texts(metrics.origins), "remotes": _texts(metrics.remote_errors)}
        if await self._write_shared(write_errors, os.path.dirname(self.history_path or ""), data):
            self._errors_shared = changed  # else the next tick tries again

    async def _write_shared(self, write: Any, *args: Any) -> bool:
        """One of the files shared with the other workers; on a full disk one
        line in the log (not a traceback each tick) and False: the next tick
        writes it again, whole."""
        try:
            await self.ctx.store.in_io(write, *args)
        except OSError as e:
            if not self._write_failed:
                log.warn("status: cannot write the files shared with the other workers ({e}); "
                         "the others show what was last written until it can", e=e.strerror or e)
            self._write_failed = True
            return False
        if self._write_failed:
            self._write_failed = False
            log.info("status: the files shared with the other workers are written again")
        return True

    def timer(self) -> Periodic:
        """The clocked timer that fills the history (a sample at start, then one per interval)."""
        return Periodic("status-history", self.history.interval, self.sample, self.ctx.clock)

    def sample(self) -> Any:
        if self.history_path is not None:
            # Worker processes: the primary samples for all (the others read its file).
            return self._sample_shared(self.history_path) if self.ctx.primary else None
        overall, _ = totals(self.ctx.metrics)
        self.history.add(self.ctx.clock.seconds(), overall)
        return None

    async def _sample_shared(self, path: str) -> None:
        store = self.ctx.store
        if not self.loaded:  # a restarted primary goes on with its predecessor's history
            self.loaded = True
            self.history.load(await store.in_io(read_json, path))
        overall, _ = totals(self.ctx.metrics, await self.ctx.metrics.collected(store.in_io))
        self.history.add(self.ctx.clock.seconds(), overall)
        await self._write_shared(write_json, path, self.history.as_json())

    async def _history_json(self) -> dict[str, Any]:
        if self.history_path is None or self.ctx.primary:
            return self.history.as_json()
        shared = History(self.history.interval, self.history.samples.maxlen or HISTORY_SIZE)
        shared.load(await self.ctx.store.in_io(read_json, self.history_path))
        return shared.as_json()

    # -- readiness -----------------------------------------------------------------

    def readiness(self) -> list[str]:
        """Why the daemon should not get traffic now; empty when it is ready."""
        reasons = []
        if self.stopping:
            reasons.append("shutting down")
        if not self.store_open:
            reasons.append("store not open yet")
        if not self.listening:
            reasons.append("listeners not up yet")
        if self.ctx.store.low_space:
            reasons.append(f"free disk space in {self.ctx.store.data_dir} is below storage.min_free")
        return reasons

    # -- the snapshot --------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as JSON-ready data (times in clock seconds)."""
        ctx, metrics, store = self.ctx, self.ctx.metrics, self.ctx.store
        # With worker processes, reading every worker's metric file is file I/O: off the reactor.
        families = await metrics.collected(store.in_io) if multiprocess_dir() else metrics.collect()
        texts = await store.in_io(read_errors, os.path.dirname(self.history_path)) if self.history_path else None
        overall, per = totals(metrics, families)
        max_size = store.max_size
        reasons = self.readiness()
        return {
            "name": "sparkcache",
            "version": sparkcache.__version__,
            "time": ctx.clock.seconds(),
            "ready": not reasons,
            "not_ready": reasons,
            "totals": overall.as_json(),
            "store": {"bytes": store.size, "entries": store.entries, "max_size": max_size,
                      "used_ratio": store.size / max_size if max_size else None,
                      "low_space": store.low_space},
            "inflight_fetches": inflight(ctx, families),
            "connections": metrics.connection_counts(families),
            "remotes": self._remotes(per, families, (texts or {}).get("remotes")),
            "upstreams": self._upstreams(families, (texts or {}).get("origins")),
            "git": await self._git(),
            "history": await self._history_json(),
            # Which process answered (server.workers > 1: every figure above is the whole daemon's).
            "workers": ctx.config.server.workers,
            "pid": os.getpid(),
            "worker": WORKER,
        }

    def _remotes(self, per: dict[str, Totals], families: Iterable[Any], texts: Texts | None = None) -> list[dict[str, Any]]:
        ctx = self.ctx
        errors = merged_outcomes(ctx.metrics.remote_errors, families,
                                 "sparkcache_remote_upstream_last_success_timestamp_seconds",
                                 "sparkcache_remote_upstream_last_failure_timestamp_seconds", "remote", texts)
        rows = []
        named = list(ctx.config.remotes)
        # Protocols' own remotes and names only the counters know (the git packs...).
        extra = sorted((set(ctx.internal_remotes) | set(per) | set(errors)) - set(named))
        for name in named + extra:
            t = per.get(name, Totals())
            if name not in ctx.config.remotes and not t.requests and name not in errors:
                continue  # a protocol's own remote that nothing asked for yet
            remote = ctx.config.remotes.get(name)
            if remote is not None:
                rtype, upstreams, url = remote.type, list(remote.upstreams), ctx.remote_url(name)
            elif name in ctx.internal_remotes:
                rtype, url = ctx.internal_remotes[name]
                upstreams = []
            else:
                rtype, upstreams, url = "", [], None
            rows.append({"name": name, "type": rtype, "url": url, "upstreams": upstreams, **t.as_json(),
                         "upstream": outcome_json(errors.get(name))})
        return rows

    def _upstreams(self, families: Iterable[Any], texts: Texts | None = None) -> list[dict[str, Any]]:
        seen = dict(merged_outcomes(self.ctx.metrics.origins, families,
                                    "sparkcache_upstream_last_success_timestamp_seconds",
                                    "sparkcache_upstream_last_failure_timestamp_seconds", "origin", texts))
        remotes: dict[str, list[str]] = {}
        for remote in self.ctx.config.remotes.values():
            for url in remote.upstreams:
                try:
                    name = origin_name(url)
                except ValueError:
                    continue
                remotes.setdefault(name, []).append(remote.name)
        return [{"origin": o, "remotes": remotes.get(o, []), **outcome_json(seen.get(o))}
                for o in sorted(set(seen) | set(remotes))]

    async def _git(self) -> dict[str, Any] | None:
        """The git mirrors (None when the git protocol is not served)."""
        svc = self.services.namedServices.get("git") if self.services is not None else None  # type: ignore[attr-defined]
        mirrors = getattr(svc, "mirrors", None)
        if mirrors is None:
            return None
        try:
            rows: Iterable[dict[str, Any]] = await maybeDeferred(mirrors.status)
        except Exception as e:
            log.failure("status: listing the git mirrors failed")
            return {"mirrors": [], "error": f"could not list the mirrors: {type(e).__name__}"}
        keep = ("name", "url", "cloned", "fetching", "last_fetch", "last_change", "last_error", "next_check")
        return {"mirrors": [{k: r.get(k) for k in keep} for r in rows], "error": None}
