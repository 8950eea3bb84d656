"""Shared fixtures: a controllable upstream, real daemons, failure logs, a watchdog.

End-to-end tests (``tests/e2e``) are plain synchronous tests: the daemon runs as
a ``twistd`` subprocess on its own free port with its own data dir, so they run
in parallel under pytest-xdist. When such a test fails, the logs of every
daemon it started and the requests its upstreams saw are attached to the
failure report.
"""

from __future__ import annotations

import compileall
import faulthandler
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support.daemon import Daemon
from tests.support.upstream import Upstream

E2E_DIR = Path(__file__).resolve().parent / "e2e"
# Every client call has its own timeout; this is the backstop for a test that
# still hangs. First the test's daemons and upstreams are killed (blocked
# calls then fail and the test reports normally); if even that does not
# unblock it, the worker dumps its stacks and exits.
E2E_TEST_TIMEOUT = float(os.environ.get("SPARKCACHE_E2E_TIMEOUT", "150"))

_DAEMONS = pytest.StashKey[list]()
_UPSTREAMS = pytest.StashKey[list]()


# Modules run both ways, with one process and with two worker processes
# (issue 14: streaming, singleflight, kill -9, purge, OCI and git): each of
# their tests that starts daemons through ``daemon_factory`` is collected
# twice, ``[w1]`` and ``[w2]``, and xdist runs both in parallel. A module may
# name the tests it runs both ways (the others have nothing to do with
# processes: redirects, a range of a stored entry, a protocol's answers to
# one request at a time: HEAD, Accept, 4xx bodies, tags/list); None: all of
# them. A [w2] run costs about twice its [w1].
BOTH_WAYS: dict[str, tuple[str, ...] | None] = {
    "test_generic_streaming": ("test_64_concurrent_clients_one_upstream_fetch", "test_slow_reader_",
                               "test_truncated_upstream_body_", "test_range_on_in_flight_miss"),
    "test_generic_lifecycle": None,
    "test_purge_local": None,
    # Singleflight, an aborted corrupt body, a Range on a fetch in flight.
    "test_oci_blobs": ("test_eight_concurrent_pulls_", "test_digest_mismatch_", "test_range_on_a_cold_blob"),
    # A real client's pulls, and hits served by the other process.
    "test_oci_pull": ("test_skopeo_", "test_ns_routing_"),
    "test_oci_freshness": None,
    "test_git_mirrors": None,
    "test_git_serve_parallel": None,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module not in BOTH_WAYS or "daemon_factory" not in metafunc.fixturenames:
        return
    only = BOTH_WAYS[module]
    if only is None or metafunc.function.__name__.startswith(only):
        metafunc.parametrize("daemon_workers", [1, 2], indirect=True, ids=["w1", "w2"])


@pytest.fixture(autouse=True)
def daemon_workers(request: pytest.FixtureRequest) -> Iterator[int | None]:
    """``server.workers`` of this test's daemons (tests/support/daemon.py), when
    the test runs both ways; None: SPARKCACHE_TEST_WORKERS, else 1."""
    n = getattr(request, "param", None)
    if n is None:
        yield None
        return
    old = os.environ.get("SPARKCACHE_TEST_WORKERS")
    os.environ["SPARKCACHE_TEST_WORKERS"] = str(n)
    try:
        yield n
    finally:
        if old is None:
            del os.environ["SPARKCACHE_TEST_WORKERS"]
        else:
            os.environ["SPARKCACHE_TEST_WORKERS"] = old


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # once, in xdist's controller (or a plain run)
        compile_package()


def compile_package() -> None:
    """Byte-compile the daemon's code once for every process the tests start.

    With PYTHONDONTWRITEBYTECODE=1 in the environment (some CI sandboxes set
    it) no interpreter writes a .pyc, and each ``twistd`` daemon, each worker
    process and each ``python -c`` helper compiled all of sparkcache/ from
    source again: ~0.25 s of CPU every time, on the suite's two cores. Written
    here (compileall writes whatever that variable says), each of them reads
    them; without the variable the first daemon would have written the same files.
    """
    root = Path(__file__).resolve().parents[1]
    compileall.compile_dir(str(root / "sparkcache"), quiet=1)
    compileall.compile_dir(str(root / "twisted" / "plugins"), quiet=1, maxlevels=0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def upstream_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Upstream]]:
    made: list[Upstream] = request.node.stash.setdefault(_UPSTREAMS, [])

    def make(root: str | os.PathLike[str] | None = None) -> Upstream:
        up = Upstream(root).start()
        made.append(up)
        return up

    yield make
    for up in made:
        up.stop()


@pytest.fixture
def upstream(upstream_factory: Callable[..., Upstream]) -> Upstream:
    """A running controllable upstream on 127.0.0.1 (see support/upstream.py)."""
    return upstream_factory()


@pytest.fixture
def daemon_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``make(remotes, *, auth=, server=, storage=, upstream=, env=, start=True) -> Daemon``."""
    made: list[Daemon] = request.node.stash.setdefault(_DAEMONS, [])

    def make(remotes: dict[str, dict[str, Any]] | None = None, *, start: bool = True, **kwargs: Any) -> Daemon:
        d = Daemon(tmp_path / f"daemon{len(made)}", remotes, **kwargs)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    # Killed, not stopped: a graceful stop here checked nothing (its errors were
    # ignored) and cost each daemon its shutdown and interpreter exit, ~15 % of
    # its CPU, on the test's clock. A test that checks a stop stops its daemon itself;
    # a killed supervisor's workers see their stdin close and stop on their own.
    for d in made:
        d.kill()


def watch(request: pytest.FixtureRequest, daemon: Daemon, upstream: Upstream | None = None) -> None:
    """Treat a daemon (and upstream) a module-scoped fixture shares as this
    test's own: their logs go with its failure report, and a hung test kills them."""
    request.node.stash.setdefault(_DAEMONS, []).append(daemon)
    if upstream is not None:
        request.node.stash.setdefault(_UPSTREAMS, []).append(upstream)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    for i, d in enumerate(item.stash.get(_DAEMONS, [])):
        rep.sections.append((f"daemon{i} log ({rep.when}, {d.dir})", d.log_tail(300)))
    for i, up in enumerate(item.stash.get(_UPSTREAMS, [])):
        rep.sections.append((f"upstream{i} requests ({rep.when}, port {up.port})", up.describe()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if pytest.mark.e2e.name not in item.keywords:
        yield
        return

    def soft() -> None:
        sys.stderr.write(f"\n{item.nodeid}: still running after {E2E_TEST_TIMEOUT}s; killing its daemons and upstreams\n")
        for d in item.stash.get(_DAEMONS, []):
            d.kill()
        for up in item.stash.get(_UPSTREAMS, []):
            up.stop()

    timer = threading.Timer(E2E_TEST_TIMEOUT, soft)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(E2E_TEST_TIMEOUT + 60, exit=True)
    try:
        yield
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
