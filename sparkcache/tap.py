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
        # What a worker process needs to load exactly this config (server.workers > 1).
        self["overrides"] = {k: v for k, v in environ.items() if k.startswith("SPARKCACHE_")}
        try:
            self["parsed"] = load_config(self["config"], environ)
            self["environ"] = environ  # SIGHUP re-reads the file with the same overrides
        except ConfigError as e:
            raise ConfigExit(e) from None


class ConfigExit(SystemExit):
    """Exit 1 with one line on stderr: ``configuration error: <file>: <key path>: <problem>``.

    twistd answers a ``usage.UsageError`` by printing its whole usage text (on
    stdout, before the message), which buries the one line about the file and
    reads as if the command line were wrong. A ``SystemExit`` with a string
    passes through twistd untouched; the interpreter prints the string to
    stderr and exits with status 1."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__(f"configuration error: {error}")
        self.error = error


def makeService(options: Any) -> IService:
    config = options["parsed"]
    if config.server.workers > 1:
        from sparkcache.workers.supervisor import Supervisor, check_store

        return Supervisor(config, options["config"], options["overrides"], check_store=lambda: check_store(config))
    from sparkcache.service import SparkcacheService

    return SparkcacheService(config, config_path=options["config"], environ=options.get("environ"))
