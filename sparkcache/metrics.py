"""Prometheus metrics, one registry per service so tests stay independent.

With ``server.workers > 1`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
for its workers: prometheus_client then keeps every value in a per-process
file there, and ``render`` aggregates all the workers' files (its
multiprocess mode; docs/workers.rst)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.python import threadable


@dataclass
class UpstreamOutcome:
    """The last answers of one upstream origin (or one remote's upstreams): times are clock seconds."""

    last_success: float | None = None
    last_failure: float | None = None
    last_error: str | None = None
    failing: bool = False  # the last answer was a failure


class HitBatch:
    """Hits (and their body bytes) counted but not yet in their counters (see ``Metrics.hit_batch``)."""

    __slots__ = ("hits", "bytes", "_inc_hits", "_inc_bytes")

    def __init__(self, inc_hits: Callable[[int], None], inc_bytes: Callable[[int], None]) -> None:
        self.hits = self.bytes = 0
        self._inc_hits, self._inc_bytes = inc_hits, inc_bytes

    def flush(self) -> None:
        hits, size = self.hits, self.bytes
        self.hits = self.bytes = 0
        if hits:
            self._inc_hits(hits)
        if size:
            self._inc_bytes(size)


class Metrics:
    def __init__(self, clock: Any = None) -> None:
        """``clock``: what timestamps the last upstream success/failure (the reactor when None)."""
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self._responses = Counter(
            "sparkcache_requests", "Requests by remote and result (hit, miss, stale, revalidated, error...)",
            ["remote", "result"], registry=r,
        )
        self._served_bytes = Counter(
            "sparkcache_served_bytes", "Body bytes sent to clients, by where they came from",
            ["remote", "source"], registry=r,
        )
        self._upstream = Counter(
            "sparkcache_upstream_requests", "Upstream requests by remote and status (or timeout/unreachable)",
            ["remote", "status"], registry=r,
        )
        self.upstream_latency = Histogram(
            "sparkcache_upstream_latency_seconds", "Time to upstream response headers", ["remote"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        # multiprocess_mode: how worker processes' values combine (ignored in one process).
        self.store_bytes = Gauge("sparkcache_store_bytes", "Bytes of bodies in the store", registry=r,
                                 multiprocess_mode="livemostrecent")
        self.store_entries = Gauge("sparkcache_store_entries", "Index entries", registry=r,
                                   multiprocess_mode="livemostrecent")
        self.inflight = Gauge("sparkcache_inflight_fetches",
                              "Productions in progress: upstream fetches, pack computations, archive builds",
                              registry=r, multiprocess_mode="livesum")
        self._forms = Counter(
            "sparkcache_registry_requests",
            "Package-registry requests by remote, form (page, file, metadata, packument, tarball...) and result",
            ["remote", "form", "result"], registry=r,
        )
        self.evicted = Counter("sparkcache_evicted", "Bodies removed by LRU eviction", registry=r)
        # Client connections (web/site.py counts them; ``publish`` copies them here).
        self._connections = Gauge("sparkcache_connections", "Open client connections (not counting shed ones)",
                                  registry=r, multiprocess_mode="livesum")
        self._shedding = Gauge("sparkcache_connections_shedding",
                               "Connections over server.max_connections whose 503 is going out",
                               registry=r, multiprocess_mode="livesum")
        self._shed = Counter("sparkcache_connections_shed", "Connections refused over server.max_connections",
                             registry=r)
        self.site: Any = None
        self._shed_published = 0
        self._origin_ok = Gauge("sparkcache_upstream_last_success_timestamp_seconds",
                                "When an upstream origin last answered (any status below 500 but 429)",
                                ["origin"], registry=r, multiprocess_mode="max")
        self._origin_failed = Gauge("sparkcache_upstream_last_failure_timestamp_seconds",
                                    "When an upstream origin last failed (unreachable, timeout, 5xx, 429)",
                                    ["origin"], registry=r, multiprocess_mode="max")
        self._remote_ok = Gauge("sparkcache_remote_upstream_last_success_timestamp_seconds",
                                "When a remote's upstream last answered usably", ["remote"], registry=r,
                                multiprocess_mode="max")
        self._remote_failed = Gauge("sparkcache_remote_upstream_last_failure_timestamp_seconds",
                                    "When a remote's upstream last failed (or refused its credentials)", ["remote"],
                                    registry=r, multiprocess_mode="max")
        # Several hosts on one bucket: the cross-host lease (store/s3/lease.py)
        # and peer streaming (fetch/peer.py follows, web/peer.py serves).
        self._leases = Counter(
            "sparkcache_s3_leases",
            "Cross-host fill leases by outcome: taken, taken_over (an expired one), waited (another host held it), "
            "lost (taken over while held), inert (the bucket unreachable: fetched without one)",
            ["outcome"], registry=r,
        )
        self._peer_streams = Counter(
            "sparkcache_peer_streams",
            "Flights streamed between hosts, by direction (served to another host, followed from one) and outcome "
            "(complete, error: broken off or not the published body, fallback: none there, waited for the entry "
            "instead; refused: a bad token)",
            ["direction", "outcome"], registry=r,
        )
        self._peer_bytes = Counter("sparkcache_peer_bytes", "Body bytes streamed between hosts, by direction",
                                   ["direction"], registry=r)
        # What the status page shows beside the counters: text has no place in
        # a Prometheus sample.
        self.origins: dict[str, UpstreamOutcome] = {}
        self.remote_errors: dict[str, UpstreamOutcome] = {}
        self.outcomes_changed = 0  # bumped with each of them (the status shares them between workers)

        # Label lookups take a lock and hash a tuple: keep the children, which
        # the hit path asks for on every request.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._batches: dict[str, HitBatch] = {}  # by remote

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def response(self, remote: str, result: str) -> None:
        """One response for ``remote``: hit, miss, stale, revalidated or error."""
        self._child(self._responses, remote, result).inc()

    def hit_batch(self, remote: str) -> HitBatch:
        """Counts of ``remote``'s hits and their body bytes that the caller adds
        to on the reactor thread, moved into the counters by ``publish`` (on
        the reactor thread): a hit then costs two integer additions. One
        process: ``publish`` runs before anything reads the counters. Worker
        processes: each publishes every second (the service's timer) and
        before it reads the aggregate itself (``collected``), so another
        worker's hits reach /metrics within a second; counting each hit in the
        shared file at once cost a worker a lock, a getpid and two writes per
        hit (docs/workers.rst, "Metrics")."""
        batch = self._batches.get(remote)
        if batch is None:  # one per remote, however often the apps are rebuilt
            batch = self._batches[remote] = HitBatch(self._child(self._responses, remote, "hit").inc,
                                                     self.bytes_counter(remote, "cache"))
        return batch

    def form(self, remote: str, form: str, result: str) -> None:
        """One package-registry response of ``form`` (page, file...) for ``remote``:
        hit, miss, stale, revalidated or error (on top of ``response``)."""
        self._child(self._forms, remote, form, result).inc()

    def bytes_counter(self, remote: str, source: str) -> Callable[[int], None]:
        """An ``inc`` for body bytes sent to clients from ``source`` (cache or upstream)."""
        return self._child(self._served_bytes, remote, source).inc  # type: ignore[no-any-return]

    def lease(self, outcome: str) -> None:
        """One cross-host lease event: taken, taken_over, waited, lost or inert."""
        self._child(self._leases, outcome).inc()

    def peer_stream(self, direction: str, outcome: str) -> None:
        """One flight streamed to (``served``) or from (``followed``) another host:
        complete, error, fallback or refused."""
        self._child(self._peer_streams, direction, outcome).inc()

    def peer_bytes(self, direction: str) -> Callable[[int], None]:
        """An ``inc`` for body bytes streamed to (``served``) or from (``followed``) other hosts."""
        return self._child(self._peer_bytes, direction).inc  # type: ignore[no-any-return]

    def upstream(self, remote: str, status: str) -> None:
        """One upstream exchange, by HTTP status or 'timeout' / 'unreachable'."""
        self._child(self._upstream, remote, status).inc()

    def upstream_outcome(self, remote: str, origin: str, code: int | None, error: str | None) -> None:
        """What one request to ``origin`` (scheme://host:port, the configured
        upstream a request started at) for ``remote`` came to: an HTTP status
        ``code``, or ``error`` when nothing usable came back. Feeds the health
        of each origin and each remote's last upstream error."""
        now = self._now()
        failed = error is not None or code is None or code >= 500 or code == 429
        self.outcomes_changed += 1
        if error is None:
            error = f"HTTP {code} from {origin}"
        o = self.origins.setdefault(origin, UpstreamOutcome())
        o.failing = failed
        if failed:
            o.last_failure, o.last_error = now, error
            self._child(self._origin_failed, origin).set(now)
        else:
            o.last_success = now
            self._child(self._origin_ok, origin).set(now)
        r = self.remote_errors.setdefault(remote, UpstreamOutcome())
        # A refused credential is the remote's problem, not the origin's.
        r.failing = failed or code in (401, 403, 407)
        if r.failing:
            r.last_failure, r.last_error = now, error
            self._child(self._remote_failed, remote).set(now)
        else:
            r.last_success = now
            self._child(self._remote_ok, remote).set(now)

    def _now(self) -> float:
        if self.clock is None:
            from twisted.internet import reactor

            return float(reactor.seconds())  # type: ignore[attr-defined]
        return float(self.clock.seconds())

    def totals(self, families: Iterable[Any] | None = None) -> tuple[dict[tuple[str, ...], float], dict[tuple[str, ...], float]]:
        """The counters the status page shows, read from what /metrics renders
        (so they agree with it; with worker processes, the whole daemon's):
        requests by (remote, result) and served bytes by (remote, source)."""
        if families is None:
            families = self.collect()
        families = list(families)
        return (sample_values(families, "sparkcache_requests_total", "remote", "result"),
                sample_values(families, "sparkcache_served_bytes_total", "remote", "source"))

    def publish(self) -> None:
        """Move the batched hits (``hit_batch``) into their counters and copy
        the site's connection counts into the metrics. The hit path and the
        site keep plain integers (they pay nothing for them); this runs when
        /metrics or the status is rendered, and with worker processes every
        second too, so the other workers' aggregate is at most that old.
        The batches only on the reactor thread, which adds to them."""
        if self._batches and (threadable.ioThread is None or threadable.isInIOThread()):
            for batch in self._batches.values():
                batch.flush()
        site = self.site
        if site is None:
            return
        self._connections.set(site.connections)
        self._shedding.set(site.shedding)
        shed = site.shed_total
        if shed > self._shed_published:
            self._shed.inc(shed - self._shed_published)
            self._shed_published = shed

    def connection_counts(self, families: Iterable[Any] | None = None) -> dict[str, int]:
        """Open connections, those being shed and those shed since start: the
        whole daemon's (with worker processes, from the aggregate)."""
        if not multiprocess_dir():
            site = self.site
            if site is None:
                return {"connections": 0, "shedding": 0, "shed_total": 0}
            return {"connections": site.connections, "shedding": site.shedding, "shed_total": site.shed_total}
        families = list(self.collect() if families is None else families)

        def one(name: str) -> int:
            return int(sum(sample_values(families, name).values()))

        return {"connections": one("sparkcache_connections"), "shedding": one("sparkcache_connections_shedding"),
                "shed_total": one("sparkcache_connections_shed_total")}

    def collected(self, in_io: Callable[..., Any]) -> Any:
        """``collect`` run by ``in_io`` (the store's I/O pool: with worker
        processes it reads every worker's file), once this process's batched
        hits are published, on the calling (reactor) thread: a Deferred of
        the families. The page and /health a client reads then count every
        hit it had answered by this worker."""
        self.publish()
        return in_io(self.collect)

    def collect(self) -> Iterable[Any]:
        """The metric families of the whole daemon: with worker processes, every
        worker's values aggregated (prometheus_client's multiprocess mode)."""
        self.publish()
        if multiprocess_dir():
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return list(merged.collect())
        return list(self.registry.collect())

    def render(self) -> bytes:
        self.publish()
        if multiprocess_dir():
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


def multiprocess_dir() -> str | None:
    """Where worker processes keep their metric values (set by the supervisor); None: one process."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def sample_values(families: Iterable[Any], name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples called ``name`` (e.g. ``sparkcache_requests_total``), by the
    values of ``labels``, summed over any other label."""
    out: dict[tuple[str, ...], float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == name:
                key = tuple(sample.labels.get(label, "") for label in labels)
                out[key] = out.get(key, 0.0) + sample.value
    return out

