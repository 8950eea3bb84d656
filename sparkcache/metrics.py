"""Prometheus metrics, one registry per service so tests stay independent."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sparkcache_requests", "Requests by remote and result (hit, miss, stale, revalidated, error...)",
            ["remote", "result"], registry=r,
        )
        self.served_bytes = Counter(
            "sparkcache_served_bytes", "Body bytes sent to clients, by where they came from",
            ["remote", "source"], registry=r,
        )
        self.upstream_requests = Counter(
            "sparkcache_upstream_requests", "Upstream requests by remote and status (or timeout/unreachable)",
            ["remote", "status"], registry=r,
        )
        self.upstream_latency = Histogram(
            "sparkcache_upstream_latency_seconds", "Time to upstream response headers", ["remote"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.store_bytes = Gauge("sparkcache_store_bytes", "Bytes of bodies in the store", registry=r)
        self.store_entries = Gauge("sparkcache_store_entries", "Index entries", registry=r)
        self.inflight = Gauge("sparkcache_inflight_fetches", "Upstream fetches in progress", registry=r)
        self.evicted = Counter("sparkcache_evicted", "Bodies removed by LRU eviction", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
