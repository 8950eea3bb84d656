"""Sources fed by local work: a child process, a worker thread, a client's body
(read from a file object, or already complete in a spool file).

Each hands the engine (:mod:`sparkcache.fetch.cache`) a Body whose bytes go
into a spool Flight exactly as an upstream download's do, so all of them share
its singleflight, its tail readers and its one commit path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Any, Awaitable, Callable, Union

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer

from sparkcache.fetch.cache import Body, Cache, Failed, Hit, Source, Target
from sparkcache.fetch.flight import BodyError, Flight, Intake, ThreadWriter
from sparkcache.fetch.produce import shield, watch_ends
from sparkcache.store import Entry, SpoolFile

OnCommit = Callable[[Entry], Awaitable[Any]]
COPY_CHUNK = 1 << 20


@dataclass
class Subprocess(Source):
    """A child process's stdout (git upload-pack computing a pack).

    ``spawn(consumer)`` starts the child with its stdout going to ``consumer``
    (the child registers on it as a push producer, so a lagging disk pauses
    its pipes) and returns a Deferred of its exit status. The body is kept
    only if the child exited 0, never went silent for ``idle_timeout``
    seconds, and its output ends with ``ends_with``.
    """

    spawn: Callable[[IConsumer], Deferred[int]]
    headers: dict[str, str]
    what: str  # names the child in errors: "upload-pack"
    idle_timeout: float
    ends_with: bytes = b""
    on_commit: OnCommit | None = None

    async def open(self, cache: Cache, target: Target, stale: Entry | None) -> Union[Body, Hit, Failed]:
        async def fill(flight: Flight) -> None:
            intake = Intake(flight, cache.clock, self.idle_timeout, self.what + " produced nothing for {timeout:g}s")
            try:
                code = await self.spawn(intake)
            except CancelledError:
                intake.stop("stopped")  # end the child: what it sends from now on is not kept
                raise
            finally:
                intake.close()
            if intake.error is not None:
                raise BodyError(intake.error)
            if code != 0:
                raise BodyError(f"{self.what} exited with status {code}")
            if not intake.tail.endswith(self.ends_with):
                raise BodyError(f"{self.what} output did not end with {self.ends_with!r}")

        return Body(self.headers, fill, on_commit=self.on_commit)


@dataclass
class ThreadBuild(Source):
    """A body written by ``write(out)`` in a worker thread, ``out`` being a
    file-like ThreadWriter over the spool; readers tail it while it is built.

    ``run(job)`` runs the blocking callable ``job`` where the caller wants it
    (its own pool, a build slot, with the mirror marked in use) and returns a
    Deferred of its end; without ``run``, the store's I/O pool runs it.
    """

    write: Callable[[ThreadWriter], Any]
    headers: dict[str, str]
    run: Callable[[Callable[[], Any]], Deferred[Any]] | None = None
    on_commit: OnCommit | None = None

    async def open(self, cache: Cache, target: Target, stale: Entry | None) -> Union[Body, Hit, Failed]:
        store = cache.store
        run = self.run or (lambda job: store.in_io(job))

        async def fill(flight: Flight) -> None:
            out = ThreadWriter(flight, store.reactor)

            def job() -> None:
                self.write(out)
                # Delivered before the thread's result (callFromThread keeps
                # order), so the flight has counted every byte when it ends.
                out.flush()

            d = run(job)
            try:
                await shield(d)
            except CancelledError:
                out.cancel()
                # The spool is discarded next: not while the thread may still write to it.
                await watch_ends([d])[0]
                raise

        return Body(self.headers, fill, on_commit=self.on_commit)


@dataclass
class Spooled(Source):
    """A body already complete in ``spool`` (an upload the site wrote there as
    it arrived): the production adopts the spool itself, so the committed body
    is that very file, never a copy. The spool is consumed: committed, or
    discarded when the body is not kept."""

    spool: SpoolFile
    headers: dict[str, str]
    on_commit: OnCommit | None = None

    async def open(self, cache: Cache, target: Target, stale: Entry | None) -> Union[Body, Hit, Failed]:
        size = self.spool.size

        async def fill(flight: Flight) -> None:
            flight.advance(size)

        return Body(self.headers, fill, total=size, on_commit=self.on_commit, spool=self.spool)


class BodyTooLarge(BodyError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit


class Upload(ThreadBuild):
    """A client's body, from a file object (twisted.web's ``request.content``),
    copied into the spool in the I/O pool; past ``limit`` bytes it fails with
    BodyTooLarge. The Target's expected digest (an OCI push names one) decides
    whether it is kept."""

    def __init__(self, content: IO[bytes], limit: int, headers: dict[str, str] | None = None,
                 on_commit: OnCommit | None = None) -> None:
        super().__init__(lambda out: copy_body(content, out, limit), headers or {}, on_commit=on_commit)


def copy_body(content: IO[bytes], out: Any, limit: int) -> int:
    """Blocking: copy ``content`` from its start into ``out`` in chunks."""
    content.seek(0)
    n = 0
    while True:
        chunk = content.read(COPY_CHUNK)
        if not chunk:
            return n
        n += len(chunk)
        if n > limit:
            raise BodyTooLarge(limit)
        out.write(chunk)
