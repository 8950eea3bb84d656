"""Upstream fetching: the pooled client, singleflight spooling and freshness."""

from sparkcache.fetch.cache import Cache, CacheRequest, Failed, Hit, Live, Result
from sparkcache.fetch.upstream import UpstreamClient, UpstreamError

__all__ = ["Cache", "CacheRequest", "Failed", "Hit", "Live", "Result", "UpstreamClient", "UpstreamError"]
