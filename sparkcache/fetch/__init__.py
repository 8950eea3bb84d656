"""Producing cache entries once: the upstream client, the produce-once engine
(singleflight, spool, tail readers, one commit path) and its sources."""

from sparkcache.fetch.cache import Body, Cache, CacheRequest, Failed, Hit, Live, Result, Source, Target, Upstream
from sparkcache.fetch.upstream import UpstreamClient, UpstreamError

__all__ = ["Body", "Cache", "CacheRequest", "Failed", "Hit", "Live", "Result", "Source", "Target", "Upstream",
           "UpstreamClient", "UpstreamError"]
