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

With worker processes (``server.workers > 1``, a ``Spread`` given): a
change is read, validated and written under the file's lock
(``update_api_remotes``), from the file as it is then, so two workers
changing remotes at once never lose one; the worker then asks the
supervisor (``SIGUSR2`` to its parent, forwarded to every worker) to have
the others re-read api.json (:meth:`LiveConfig.refresh`), and answers once
each live worker says it runs the new generation (or after
``SPREAD_TIMEOUT``, logged).
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
from sparkcache.store.settings import (AppliedGenerations, SettingsError, api_remotes_path, read_api_state,
                                       update_api_remotes)

log = Logger()

# How long the worker that answered a change waits for the others to apply it.
SPREAD_TIMEOUT = 5.0
SPREAD_POLL = 0.01

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


class Spread:
    """How a change reaches the other worker processes (docs/workers.rst)."""

    def __init__(self, applied: AppliedGenerations, clock: Any, notify: Callable[[], None] | None = None) -> None:
        """``notify`` tells the others to re-read api.json (default: SIGUSR2 to the supervisor)."""
        self.applied = applied
        self.clock = clock
        self.notify = notify or _signal_parent

    async def wait(self, generation: int) -> None:
        """Until every other live worker runs ``generation`` (at most SPREAD_TIMEOUT)."""
        from twisted.internet.task import deferLater

        self.notify()
        deadline = self.clock.seconds() + SPREAD_TIMEOUT
        while True:
            late = self.applied.behind(generation)
            if not late:
                return
            if self.clock.seconds() >= deadline:
                log.warn("sparkcache: worker(s) {late} did not apply the remotes change within {t}s; they will at "
                         "their next signal or restart", late=", ".join(map(str, late)), t=SPREAD_TIMEOUT)
                return
            await deferLater(self.clock, SPREAD_POLL, lambda: None)


def _signal_parent() -> None:
    import os
    import signal

    os.kill(os.getppid(), signal.SIGUSR2)


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
        self.generation = 0  # of api.json, as last read or written here
        # With worker processes: how a change reaches the others (None: one process).
        self.spread: Spread | None = None

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
            self.api, self.generation = read_api_state(self.data_dir)
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
        self._refuse_file_remote(name, "changed")
        if not isinstance(body, dict):
            raise RemoteChangeError(400, f"remotes.{name}: expected a mapping of settings, got "
                                         f"{type(body).__name__}")

        def change(api: dict[str, Any]) -> dict[str, Any]:
            outcome["created"] = name not in api
            api = {**api, name: body}
            try:
                config, skipped = self.compose(api)
            except ConfigError as e:
                raise RemoteChangeError(400, _short(e)) from None
            if name in skipped:
                raise RemoteChangeError(400, skipped[name])
            outcome["config"], outcome["skipped"] = config, skipped
            return api

        outcome: dict[str, Any] = {}
        await self._change(name, "changed", change, outcome)
        created = bool(outcome["created"])
        log.info("sparkcache: remote {name} {how} through the API", name=name, how="added" if created else "changed")
        await self._spread_wait()
        return created

    async def delete(self, name: str) -> None:
        self._refuse_file_remote(name, "deleted")

        def change(api: dict[str, Any]) -> dict[str, Any]:
            if name not in api:
                raise RemoteChangeError(404, f"unknown remote {name!r}")
            api = {n: b for n, b in api.items() if n != name}
            try:
                outcome["config"], outcome["skipped"] = self.compose(api)
            except ConfigError as e:  # a group of the file named it as a member
                raise RemoteChangeError(409, _short(e)) from None
            return api

        outcome: dict[str, Any] = {}
        await self._change(name, "deleted", change, outcome)
        log.info("sparkcache: remote {name} deleted through the API", name=name)
        await self._spread_wait()

    async def _change(self, name: str, how: str, change: Callable[[dict[str, Any]], dict[str, Any]],
                      outcome: dict[str, Any]) -> None:
        """Read (with workers: from the file, under its lock), change, validate,
        write and apply; ``change`` runs in the I/O pool and fills ``outcome``."""
        await self.lock.acquire()
        try:
            self._refuse_file_remote(name, how)  # again: a reload may have run meanwhile
            base = None if self.spread is not None else self.api
            api, generation = await self._run(update_api_remotes, self.data_dir, change, base)
            self.api, self.skipped, self.generation = api, outcome["skipped"], generation
            self.apply(outcome["config"])
            if self.spread is not None:
                self.spread.applied.mark(generation)
        finally:
            self.lock.release()

    async def _spread_wait(self) -> None:
        if self.spread is not None:
            await self.spread.wait(self.generation)

    async def refresh(self) -> bool:
        """Another worker changed the API remotes: apply api.json as it is now.
        True when something was applied."""
        if self.file_data is None:
            return False
        await self.lock.acquire()
        try:
            try:
                api, generation = await self._run(read_api_state, self.data_dir)
            except SettingsError as e:
                log.error("sparkcache: API remotes not reloaded: {why}", why=str(e))
                return False
            if generation == self.generation:
                applied = False
            else:
                try:
                    config, skipped = self.compose(api)
                except ConfigError as e:  # the file here is not what the writer validated with
                    log.error("sparkcache: API remotes not reloaded: {why}", why=str(e))
                    return False
                self.api, self.skipped, self.generation = api, skipped, generation
                self._log_skipped()
                self.apply(config)
                log.info("sparkcache: API remotes changed by another worker: {names}",
                         names=", ".join(sorted(set(api) - set(skipped))) or "none")
                applied = True
            if self.spread is not None:
                self.spread.applied.mark(self.generation)
            return applied
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
