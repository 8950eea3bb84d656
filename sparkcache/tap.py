"""``twistd sparkcache``: command-line options and the service maker."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from sparkcache.config import ConfigError
from sparkcache.protocols import load_config


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run the sparkcache caching proxy. See README.rst for the configuration reference."
    optParameters = [
        ["config", "c", "etc/cache.yaml", "Path to the YAML configuration file."],
        ["data-dir", "d", None, "Override storage.data_dir (also: SPARKCACHE_DATA_DIR)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, spec: str) -> None:
        """Listen on a Twisted endpoint (tcp:8090, ssl:443:privateKey=..., unix:/run/s.sock,
        systemd:domain=INET:index=0); repeatable; replaces server.listen."""
        self["listen"].append(spec)

    def postOptions(self) -> None:
        environ = dict(os.environ)
        if self["data-dir"]:
            environ["SPARKCACHE_DATA_DIR"] = self["data-dir"]
        if self["listen"]:
            environ["SPARKCACHE_LISTEN"] = ",".join(self["listen"])
        try:
            self["parsed"] = load_config(self["config"], environ)
            self["environ"] = environ  # SIGHUP re-reads the file with the same overrides
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None


def makeService(options: Any) -> IService:
    from sparkcache.service import SparkcacheService

    return SparkcacheService(options["parsed"], config_path=options["config"], environ=options.get("environ"))
