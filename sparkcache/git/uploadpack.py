"""Run ``git upload-pack --stateless-rpc`` and stream its output with backpressure.

libgit2 has no server side, so packs come from git itself. The process
protocol follows twisted.web.twcgi's CGIProcessProtocol: it registers as a
push producer on the consumer (a twisted.web Request, or the pack cache's
spool writer), so a slow client pauses the child's pipes instead of letting
its output pile up in memory; a consumer that stops (client gone) kills the
child.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

MAX_STDERR = 16 * 1024
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

# Always applied (a caller's extra_config overrides): partial clone needs
# allowFilter, and fetching a just-pushed commit by id (`git fetch origin
# <sha>`) needs allowReachableSHA1InWant; both are safe on a mirror whose
# every object is public to its readers anyway.
SERVE_CONFIG: dict[str, str] = {
    "uploadpack.allowFilter": "true",
    "uploadpack.allowReachableSHA1InWant": "true",
    "uploadpack.allowTipSHA1InWant": "true",
}


def git_binary() -> str:
    return os.environ.get("SPARKCACHE_GIT", "git")


def child_env(git_protocol: str | None) -> dict[str, str]:
    """The child's whole environment: nothing inherited but PATH and HOME, so no
    credential or proxy variable of the daemon ever reaches git."""
    env = {
        "PATH": os.environ.get("PATH") or DEFAULT_PATH,
        "HOME": os.environ.get("HOME") or "/nonexistent",
        "LANG": "C",
        "GIT_TERMINAL_PROMPT": "0",
        # System-wide git config is the admin's business for their own git;
        # serving must not depend on it (nor be slowed by credential helpers).
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    if git_protocol:
        env["GIT_PROTOCOL"] = git_protocol
    return env


def upload_pack_argv(repo_path: str, advertise: bool, extra_config: dict[str, str] | None = None) -> list[str]:
    config = {**SERVE_CONFIG, **(extra_config or {})}
    argv = [git_binary()]
    for k, v in config.items():
        argv += ["-c", f"{k}={v}"]
    argv += ["upload-pack", "--stateless-rpc"]
    if advertise:
        argv.append("--advertise-refs")
    argv.append(repo_path)
    return argv


@implementer(IPushProducer)
class UploadPackProtocol(ProcessProtocol):
    """One upload-pack child; ``done`` fires with its exit status (negative: killed by that signal)."""

    def __init__(self, stdin: bytes, consumer: IConsumer, repo_path: str, stderr: bytearray | None = None) -> None:
        self.stdin = stdin
        self.consumer = consumer
        self.repo_path = repo_path
        self.done: Deferred[int] = Deferred()
        self.stderr = stderr if stderr is not None else bytearray()
        self.stopped = False
        self.registered = False
        self.written = 0

    # -- process side -----------------------------------------------------------

    def connectionMade(self) -> None:
        self.consumer.registerProducer(self, True)
        self.registered = True
        if self.stdin:
            self.transport.write(self.stdin)  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        if self.stopped:
            return
        self.written += len(data)
        self.consumer.write(data)

    def errReceived(self, data: bytes) -> None:
        room = MAX_STDERR - len(self.stderr)
        if room > 0:
            self.stderr += data[:room]

    def processEnded(self, reason: Failure) -> None:
        self._unregister()
        value = reason.value
        code: int
        if isinstance(value, ProcessDone):
            code = 0
        elif isinstance(value, ProcessTerminated):
            code = value.exitCode if value.exitCode is not None else -(value.signal or 1)
        else:
            code = -1
        if code != 0 and not self.stopped:
            log.warn("git upload-pack in {repo} exited {code}: {err}", repo=self.repo_path, code=code,
                     err=self.stderr_text())
        self.done.callback(code)

    def stderr_text(self) -> str:
        return bytes(self.stderr).decode("utf-8", "replace").strip()

    # -- producer side (called by the consumer) ------------------------------------

    def pauseProducing(self) -> None:
        if self.transport is not None and not self.stopped:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.transport is not None and not self.stopped:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        """The consumer is gone: nothing more will be read, so end the child now."""
        if self.stopped:
            return
        self.stopped = True
        # A consumer that stopped us must not be told to unregister again.
        self.registered = False
        transport: Any = self.transport
        if transport is None:
            return
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        # Resume first: closing a paused reader would leave its fd unwatched.
        transport.resumeProducing()
        transport.loseConnection()

    def _unregister(self) -> None:
        if self.registered:
            self.registered = False
            try:
                self.consumer.unregisterProducer()
            except Exception:  # a consumer torn down meanwhile has nothing to unregister
                pass


def spawn_upload_pack(reactor: Any, repo_path: str, *, advertise: bool, stdin: bytes, git_protocol: str | None,
                      consumer: IConsumer, extra_config: dict[str, str] | None = None,
                      stderr: bytearray | None = None) -> "Deferred[int]":
    """Spawn ``git upload-pack --stateless-rpc [--advertise-refs] <repo_path>``, feed it ``stdin``,
    stream its stdout into ``consumer``; fires with the exit status once the child is gone and
    the producer is unregistered (the consumer may then be finished). The child's stderr (at
    most MAX_STDERR bytes) is appended to ``stderr`` when given."""
    proto = UploadPackProtocol(stdin, consumer, repo_path, stderr)
    argv = upload_pack_argv(repo_path, advertise, extra_config)
    reactor.spawnProcess(proto, argv[0] if os.path.isabs(argv[0]) else _which(argv[0]), argv,
                         env=child_env(git_protocol), path=repo_path)
    return proto.done


def _which(name: str) -> str:
    for d in (os.environ.get("PATH") or DEFAULT_PATH).split(os.pathsep):
        candidate = os.path.join(d, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return name
