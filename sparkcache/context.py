"""What every protocol app is handed: the shared services of one daemon."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparkcache.auth import Authorizer
from sparkcache.config import Config
from sparkcache.fetch import Cache, UpstreamClient
from sparkcache.metrics import Metrics
from sparkcache.store import Store


@dataclass
class Context:
    config: Config
    store: Store
    cache: Cache
    upstream: UpstreamClient
    metrics: Metrics
    auth: Authorizer
    clock: Any
    sendfile: Any = None  # SendfilePool, when large hits may use os.sendfile
    git: Any = None  # sparkcache.git.interfaces.IMirrors provider, set by protocols.git.install
