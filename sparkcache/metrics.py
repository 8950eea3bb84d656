"""Prometheus metrics, one registry per service so tests stay independent.

With ``server.workers > 1`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
for its workers: prometheus_client then keeps every value in a per-process
file there, and ``render`` aggregates all the workers' files (its
multiprocess mode; docs/workers.rst)."""

from __future__ import annotations

import os
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
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

        # Label lookups take a lock and hash a tuple: keep the children, which
        # the hit path asks for on every request.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def response(self, remote: str, result: str) -> None:
        """One response for ``remote``: hit, miss, stale, revalidated or error."""
        self._child(self._responses, remote, result).inc()

    def form(self, remote: str, form: str, result: str) -> None:
        """One package-registry response of ``form`` (page, file...) for ``remote``:
        hit, miss, stale, revalidated or error (on top of ``response``)."""
        self._child(self._forms, remote, form, result).inc()

    def bytes_counter(self, remote: str, source: str) -> Callable[[int], None]:
        """An ``inc`` for body bytes sent to clients from ``source`` (cache or upstream)."""
        return self._child(self._served_bytes, remote, source).inc  # type: ignore[no-any-return]

    def upstream(self, remote: str, status: str) -> None:
        """One upstream exchange, by HTTP status or 'timeout' / 'unreachable'."""
        self._child(self._upstream, remote, status).inc()

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)
