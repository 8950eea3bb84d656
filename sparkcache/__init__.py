"""sparkcache: a caching proxy for CI fleets, built on Twisted."""

__version__ = "0.1.0"
