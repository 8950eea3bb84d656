"""How often each mirror is checked, and how fast one forge host is asked.

Intervals adapt: a mirror served or changed within the last ``ACTIVE`` seconds
is checked every ``fetch_interval``; past that its interval grows in proportion
to how long it has been idle, up to ``max_interval``; a few percent of jitter
keeps mirrors that became idle together from being checked together.

Every ref check is counted against its forge host's cap (``max_upstream_rate``
checks a second, a GCRA token bucket on the clock): the fetch loop waits for
its slot, so the rate a forge sees is bounded whatever the number of mirrors. A
check a client waits for (a clone of a stale mirror) takes its slot without
waiting, and so delays the loop's next checks of that host instead.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from sparkcache.git.config import GitConfig, url_host

ACTIVE = 3600.0     # served or changed within this long: checked every fetch_interval
JITTER = 0.1        # +/- this fraction of each interval
RATE_WINDOW = 60.0  # GET /repos and the metrics report the rate over this window
DEBT = 1.0          # how far ahead of the clock checks clients waited for can book the loop's slots


def forge_host(url: str) -> str:
    """The key a mirror's checks are capped under: ``host[:port]``, or ``local`` for file://."""
    if url.startswith("file:"):
        return "local"
    return url_host(url) or "local"


def interval_for(cfg: GitConfig, now: float, last_served: float | None, last_change: float | None) -> float:
    """The adaptive check interval (without jitter) of a mirror."""
    recent = max((t for t in (last_served, last_change) if t is not None), default=None)
    if recent is None:
        return cfg.max_interval
    idle = max(0.0, now - recent)
    if idle <= ACTIVE:
        return cfg.fetch_interval
    return min(cfg.max_interval, max(cfg.fetch_interval, cfg.fetch_interval * idle / ACTIVE))


def jittered(interval: float, rng: random.Random) -> float:
    return interval * rng.uniform(1.0 - JITTER, 1.0 + JITTER)


class RateCap:
    """A GCRA token bucket: ``rate`` a second on average, ``burst`` at once."""

    def __init__(self, rate: float, clock: Any, burst: float = 1.0) -> None:
        self.step = 1.0 / rate
        self.tolerance = max(0.0, burst - 1.0) * self.step
        self.clock = clock
        self.tat = 0.0  # theoretical arrival time of the next request
        self.sent: deque[float] = deque()
        self.total = 0

    def reserve(self) -> float:
        """Book the next slot; returns how long to wait before using it."""
        now = self.clock.seconds()
        start = max(self.tat, now)
        self.tat = start + self.step
        return max(0.0, start - self.tolerance - now)

    def take(self) -> None:
        """Use a slot now, waiting or not (a check a client waits for). The loop's
        next slots move back, but by at most DEBT seconds: a burst of clones after a
        restart must not silence the loop for minutes afterwards."""
        now = self.clock.seconds()
        self.tat = max(self.tat, min(max(self.tat, now) + self.step, now + DEBT))

    def record(self) -> None:
        """One request went out (for the reported rate)."""
        now = self.clock.seconds()
        self.total += 1
        self.sent.append(now)
        while self.sent and self.sent[0] <= now - RATE_WINDOW:
            self.sent.popleft()

    def rate(self) -> float:
        """Requests a second over the last RATE_WINDOW seconds."""
        now = self.clock.seconds()
        while self.sent and self.sent[0] <= now - RATE_WINDOW:
            self.sent.popleft()
        return len(self.sent) / RATE_WINDOW


@dataclass
class HostStats:
    host: str
    checks: int
    rate: float
    cap: float
    mirrors: int = 0


class HostRates:
    """One RateCap per forge host."""

    def __init__(self, rate: float, clock: Any) -> None:
        self.rate = rate
        self.clock = clock
        self.caps: dict[str, RateCap] = {}

    def cap(self, host: str) -> RateCap:
        c = self.caps.get(host)
        if c is None:
            c = self.caps[host] = RateCap(self.rate, self.clock)
        return c

    def stats(self) -> list[HostStats]:
        return [HostStats(h, c.total, c.rate(), self.rate) for h, c in sorted(self.caps.items())]


class HostCollector:
    """Prometheus families read at scrape time (nothing is counted twice on the hot
    path): per forge host, the mirrors, the ref checks sent, their rate and the cap.
    Per-mirror intervals and times are in ``GET /repos``: one series per mirror
    would make ten thousand."""

    def __init__(self, mirrors: Any) -> None:
        self.mirrors = mirrors

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        checks = CounterMetricFamily("sparkcache_git_ref_checks", "Ref checks sent to each forge host", labels=["host"])
        rate = GaugeMetricFamily("sparkcache_git_ref_check_rate",
                                 "Ref checks a second to each forge host over the last minute", labels=["host"])
        cap = GaugeMetricFamily("sparkcache_git_max_upstream_rate", "The configured cap (checks a second per host)",
                                labels=["host"])
        count = GaugeMetricFamily("sparkcache_git_mirrors", "Registered mirrors per forge host", labels=["host"])
        for h in self.mirrors.hosts():
            checks.add_metric([h["host"]], h["checks"])
            rate.add_metric([h["host"]], h["checks_per_second"])
            cap.add_metric([h["host"]], h["max_upstream_rate"])
            count.add_metric([h["host"]], h["mirrors"])
        return [checks, rate, cap, count]


class HostGauges:
    """HostCollector's families for worker processes: prometheus_client's multiprocess
    mode aggregates only its own metric files, not collectors read at scrape time, so
    each worker sets these gauges from its own checks (``publish``, every second) and
    ``/metrics`` in any worker sums them."""

    def __init__(self, mirrors: Any, registry: Any) -> None:
        from prometheus_client import Gauge

        self.mirrors = mirrors
        self.checks = Gauge("sparkcache_git_ref_checks_total", "Ref checks sent to each forge host", ["host"],
                            registry=registry, multiprocess_mode="livesum")
        self.rate = Gauge("sparkcache_git_ref_check_rate", "Ref checks a second to each forge host over the last "
                          "minute", ["host"], registry=registry, multiprocess_mode="livesum")
        self.cap = Gauge("sparkcache_git_max_upstream_rate", "The configured cap (checks a second per host)",
                         ["host"], registry=registry, multiprocess_mode="livemax")
        self.count = Gauge("sparkcache_git_mirrors", "Registered mirrors per forge host", ["host"],
                           registry=registry, multiprocess_mode="livemax")

    def publish(self) -> None:
        for h in self.mirrors.hosts():
            self.checks.labels(h["host"]).set(h["checks"])
            self.rate.labels(h["host"]).set(h["checks_per_second"])
            self.cap.labels(h["host"]).set(h["max_upstream_rate"])
            self.count.labels(h["host"]).set(h["mirrors"])
