"""The running configuration: the file's, plus the remotes added through the API.

Both sources are composed into one document and validated by the same
loader as start-up (``sparkcache.protocols.load_config_data``), so a remote
given to ``PUT /admin/remotes/<name>`` meets exactly the checks (and error
messages) a ``remotes:`` entry of the file meets. A remote the file defines
is the file's: the API cannot change or delete it, and when a reloaded file
starts defining a name the API had added, the file wins (and the log says
so). The API's remotes live in ``<data_dir>/remotes.d/api.json``
(:mod:`sparkcache.store.settings`), so they survive restarts and reloads.

A new Config is handed to ``apply`` (``SparkcacheService.reconfigure``)
only once it is valid: a bad file on SIGHUP or a bad PUT leaves the running
configuration as it was. Reloads and API changes are serialised, so two
never interleave their read-validate-write steps.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from sparkcache.config import Config, ConfigError, attribute, read_config_files
from sparkcache.protocols import PROTOCOLS, load_config_data
from sparkcache.protocols.base import ProtocolSpec
from sparkcache.store.settings import SettingsError, api_remotes_path, read_api_remotes, write_api_remotes

log = Logger()

Run = Callable[..., "Deferred[Any]"]


class RemoteChangeError(Exception):
    """A remote the API cannot add, change or delete; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _names_remote(error: ConfigError, name: str) -> bool:
    return re.match(rf"^remotes\.{re.escape(name)}(?:$|[.\[])", error.path) is not None


def _short(error: ConfigError) -> str:
    """The loader's message without the file name: an API remote's errors are not the file's."""
    return f"{error.path}: {error.problem}" if error.path else error.problem


class LiveConfig:
    """Composes, validates and applies the configuration (see the module's doc)."""

    def __init__(self, path: str | None, environ: Mapping[str, str] | None, data_dir: str,
                 apply: Callable[[Config], None], run: Run | None = None,
                 protocols: Sequence[ProtocolSpec] = PROTOCOLS) -> None:
        """``run(fn, *args)`` runs blocking file I/O off the reactor (the store's
        I/O pool); ``path`` is None when the daemon was given a Config, not a file
        (tests): then :meth:`use_file_data` says what the file held."""
        self.path = path
        self.environ = environ
        self.data_dir = data_dir
        self.apply = apply
        self.run = run
        self.protocols = protocols
        self.file_data: Any = None
        # remote/repository added by a drop-in → its file (config.read_config_files)
        self.file_origins: dict[str, str] = {}
        # Every persisted API remote (also those the file shadows or that no longer validate).
        self.api: dict[str, Any] = {}
        # API remotes not in effect, and why (shadowed by the file, invalid).
        self.skipped: dict[str, str] = {}
        self.lock = DeferredLock()

    @property
    def source(self) -> str:
        return self.path or "<config>"

    # -- start-up (blocking: before the reactor runs) ----------------------------

    def start(self, config: Config) -> Config:
        """The Config to start with: the file's, plus the persisted API remotes."""
        if self.path is None:
            return config
        try:
            self.file_data, self.file_origins = read_config_files(self.path)
            self.api = read_api_remotes(self.data_dir)
        except (ConfigError, SettingsError) as e:
            log.error("sparkcache: API remotes not loaded: {why}", why=str(e))
            self.api = {}
            return config
        if not self.api:
            return config
        try:
            composed, self.skipped = self.compose(self.api)
        except ConfigError as e:  # the file changed since it was checked: start with it alone
            log.error("sparkcache: API remotes not loaded: {why}", why=str(e))
            return config
        self._log_skipped()
        log.info("sparkcache: {n} remote(s) added through the API, from {path}: {names}",
                 n=len(self.api) - len(self.skipped), path=api_remotes_path(self.data_dir),
                 names=", ".join(sorted(set(self.api) - set(self.skipped))) or "none")
        return composed

    def use_file_data(self, data: Any, source: str | None = None) -> None:
        """What the configuration file holds, for a daemon built from a Config (tests)."""
        self.file_data = copy.deepcopy(data)
        self.path = source or self.path

    # -- composing ---------------------------------------------------------------

    def file_remotes(self) -> set[str]:
        return self._remotes_of(self.file_data)

    def origin(self, name: str) -> str | None:
        if name in self.file_remotes():
            return "file"
        return "api" if name in self.api else None

    def compose(self, api: Mapping[str, Any], file_data: Any = None) -> tuple[Config, dict[str, str]]:
        """Validate the file plus ``api``'s remotes: (config, skipped). An API
        remote the file also defines, or one that fails validation, is left out
        and its reason is in ``skipped``; an error in the file's own part raises
        ConfigError."""
        file_data = self.file_data if file_data is None else file_data
        file_remotes = self._remotes_of(file_data)
        skipped: dict[str, str] = {}
        for name in api:
            if name in file_remotes:
                skipped[name] = f"{self.source} defines remote {name!r} too: the file's definition is used"
        while True:
            data = copy.deepcopy(file_data) if isinstance(file_data, dict) else {}
            remotes = data.get("remotes")
            if not isinstance(remotes, dict):
                remotes = data["remotes"] = {} if remotes is None else remotes
            if isinstance(remotes, dict):
                for name, body in api.items():
                    if name not in skipped:
                        remotes[name] = copy.deepcopy(body)
            try:
                config = load_config_data(data, self.source, self.environ, self.protocols)
            except ConfigError as e:
                culprit = next((n for n in api if n not in skipped and n not in file_remotes and _names_remote(e, n)), None)
                if culprit is None:
                    raise attribute(e, self.file_origins) from None
                skipped[culprit] = _short(e)
                continue
            return config, skipped

    @staticmethod
    def _remotes_of(data: Any) -> set[str]:
        remotes = data.get("remotes") if isinstance(data, dict) else None
        return {str(n) for n in remotes} if isinstance(remotes, dict) else set()

    def _log_skipped(self) -> None:
        for name, why in self.skipped.items():
            log.warn("sparkcache: API remote {name} not in effect: {why}", name=name, why=why)

    # -- SIGHUP ------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the file and apply it with the API remotes; False (logged, the
        running configuration kept) when it does not validate."""
        if self.path is None:
            log.warn("sparkcache: reload asked, but the daemon was not started from a file")
            return False
        await self.lock.acquire()
        try:
            try:
                data, origins = await self._run(read_config_files, self.path)
                previous, self.file_origins = self.file_origins, origins
                try:
                    config, skipped = self.compose(self.api, data)
                except ConfigError:
                    self.file_origins = previous
                    raise
            except ConfigError as e:
                log.error("sparkcache: reload refused, the running configuration stays: {why}", why=str(e))
                return False
            self.file_data, self.skipped = data, skipped
            self._log_skipped()
            self.apply(config)
            return True
        finally:
            self.lock.release()

    # -- the REST API ------------------------------------------------------------

    async def put(self, name: str, body: Any) -> bool:
        """Add or replace the API remote ``name``; True when it is new. Raises
        RemoteChangeError (409: the file's; 400: invalid, with the loader's message)."""
        await self.lock.acquire()
        try:
            self._refuse_file_remote(name, "changed")
            if not isinstance(body, dict):
                raise RemoteChangeError(400, f"remotes.{name}: expected a mapping of settings, got "
                                             f"{type(body).__name__}")
            api = {**self.api, name: body}
            try:
                config, skipped = self.compose(api)
            except ConfigError as e:
                raise RemoteChangeError(400, _short(e)) from None
            if name in skipped:
                raise RemoteChangeError(400, skipped[name])
            await self._run(write_api_remotes, self.data_dir, api)
            created = name not in self.api
            self.api, self.skipped = api, skipped
            self.apply(config)
            log.info("sparkcache: remote {name} {how} through the API", name=name, how="added" if created else "changed")
            return created
        finally:
            self.lock.release()

    async def delete(self, name: str) -> None:
        await self.lock.acquire()
        try:
            self._refuse_file_remote(name, "deleted")
            if name not in self.api:
                raise RemoteChangeError(404, f"unknown remote {name!r}")
            api = {n: b for n, b in self.api.items() if n != name}
            try:
                config, skipped = self.compose(api)
            except ConfigError as e:  # a group of the file named it as a member
                raise RemoteChangeError(409, _short(e)) from None
            await self._run(write_api_remotes, self.data_dir, api)
            self.api, self.skipped = api, skipped
            self.apply(config)
            log.info("sparkcache: remote {name} deleted through the API", name=name)
        finally:
            self.lock.release()

    def _refuse_file_remote(self, name: str, how: str) -> None:
        if self.file_data is None:
            raise RemoteChangeError(409, "the daemon was not started from a configuration file; "
                                         "remotes cannot be changed through the API")
        if name in self.file_remotes():
            raise RemoteChangeError(409, f"remote {name!r} is defined in {self.file_origins.get(f'remotes.{name}', self.source)}; it can only be {how} there "
                                         "(then reload: SIGHUP)")

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.run is None:
            return _now(fn, *args)
        return self.run(fn, *args)


async def _now(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)
