"""A ``type: dagger`` remote's options: the keyed-blob keys plus the periods an
engine is told, how long signed URLs last, the signing secret and the graph's bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparkcache.config import Loader, Section, parse_duration
from sparkcache.protocols._keyed import KeyedOptions, read_keyed_options


@dataclass(frozen=True)
class DaggerOptions:
    keyed: KeyedOptions
    # Told to engines by GET /config (they refuse zero): how often they import and export.
    import_period: float = 300.0
    export_period: float = 300.0
    export_timeout: float = 600.0
    # How long a signed blob URL stays valid.
    url_ttl: float = 3600.0
    # The HMAC secret of the signed URLs (None: the daemon's own, generated once).
    signing_secret: str | None = None
    # The cache graph is bounded to this many keys (links: twice as many).
    max_keys: int = 20_000

    def redacted(self) -> dict[str, Any]:
        return {**self.keyed.redacted(), "import_period": self.import_period, "export_period": self.export_period,
                "export_timeout": self.export_timeout, "url_ttl": self.url_ttl,
                "signing_secret": "<set>" if self.signing_secret else None, "max_keys": self.max_keys}


def _positive(value: Any) -> float:
    d = parse_duration(value)
    if d <= 0:
        raise ValueError("must be more than zero (engines refuse a zero period)")
    return d


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a positive integer")
    return value


def dagger_options(loader: Loader, sec: Section, rtype: str) -> DaggerOptions:
    keyed = read_keyed_options(loader, sec)
    secret = loader.secret(sec, "signing_secret")
    if secret is not None and len(secret) < 16:
        raise loader.error(sec.key("signing_secret"), "a signing secret must be at least 16 characters")
    return DaggerOptions(
        keyed=keyed,
        import_period=sec.convert("import_period", _positive, 300.0),
        export_period=sec.convert("export_period", _positive, 300.0),
        export_timeout=sec.convert("export_timeout", _positive, 600.0),
        url_ttl=sec.convert("url_ttl", _positive, 3600.0),
        signing_secret=secret,
        max_keys=sec.convert("max_keys", _count, 20_000),
    )
