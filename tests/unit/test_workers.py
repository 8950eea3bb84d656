"""The worker-process supervisor and its config, without processes: a fake
spawn and a task.Clock (tests/e2e/test_workers.py runs the real thing)."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor as real_reactor
from twisted.internet.defer import succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from sparkcache.config import ConfigError
from sparkcache.protocols import load_config_data
from sparkcache.tap import Options, makeService
from sparkcache.workers.sockets import AdoptedEndpoint, format_fds, format_specs, parse_fds, parse_specs
from sparkcache.workers.supervisor import RESTART_MAX, RESTART_MIN, STABLE_AFTER, Supervisor, WorkerProtocol


def _config(workers: Any, listen: list[str] | None = None) -> Any:
    server: dict[str, Any] = {"workers": workers}
    if listen is not None:
        server["listen"] = listen
    return load_config_data({"server": server}, source="cache.yaml", environ={})


# -- config --------------------------------------------------------------------


def test_workers_default_is_one_per_core_and_1_is_one_process() -> None:
    cores = len(os.sched_getaffinity(0))
    assert load_config_data({}, source="cache.yaml", environ={}).server.workers == cores
    assert _config("auto").server.workers == cores
    assert _config(1).server.workers == 1
    assert _config(3).server.workers == 3
    assert _config(2).redacted()["server"]["workers"] == 2


@pytest.mark.parametrize("bad", [0, -2, "many", True, 1.5, None])
def test_workers_must_be_a_positive_count(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"cache\.yaml: server\.workers: expected a positive number"):
        _config(bad)


def test_an_ssl_listener_is_shared_by_workers() -> None:
    assert _config(2, ["tcp:8090", "ssl:8443:privateKey=k.pem"]).server.workers == 2
    assert _config(1, ["ssl:8443:privateKey=k.pem"]).server.workers == 1


def test_a_listener_that_wraps_the_factory_cannot_be_shared_by_workers(monkeypatch: Any) -> None:
    # A plugin endpoint (here txtorcon's onion:) builds its own port: no socket to hand on.
    with pytest.raises(ConfigError, match=r"server\.workers: listener 'onion:443.*cannot be shared"):
        _config(2, ["tcp:8090", "onion:443"])
    assert _config(1, ["onion:443"]).server.workers == 1
    # auto (the default) falls back to one process, and says why.
    monkeypatch.setattr("sparkcache.config.cores", lambda: 4)
    seen: list[str] = []
    globalLogPublisher.addObserver(observer := lambda e: seen.append(formatEvent(e)))
    try:
        assert _config("auto", ["tcp:8090", "onion:443"]).server.workers == 1
        assert load_config_data({"server": {"listen": ["onion:443"]}}, source="cache.yaml",
                                environ={}).server.workers == 1
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any("server.workers: auto gives 1 process, not 4: listener 'onion:443" in m for m in seen), seen
    assert _config("auto", ["tcp:8090", "unix:/run/s.sock", "ssl:8443:privateKey=k.pem"]).server.workers == 4


def test_tap_builds_the_supervisor_only_with_more_than_one_worker(tmp_path: Path, monkeypatch: Any) -> None:
    from sparkcache.service import SparkcacheService

    cfg = tmp_path / "cache.yaml"
    for n, kind in ((1, SparkcacheService), (2, Supervisor)):
        cfg.write_text(f"server: {{workers: {n}}}\nstorage: {{data_dir: {tmp_path / 'data'}}}\n")
        opts = Options()
        opts.parseOptions(["-c", str(cfg), "--data-dir", str(tmp_path / "d2")])
        svc = makeService(opts)
        assert type(svc) is kind
    assert isinstance(svc, Supervisor)
    assert svc.environ["SPARKCACHE_DATA_DIR"] == str(tmp_path / "d2")  # the workers get the overrides


def test_fds_round_trip() -> None:
    assert parse_fds(format_fds([(3, "AF_INET"), (4, "AF_UNIX")])) == [(3, "AF_INET"), (4, "AF_UNIX")]
    with pytest.raises(ValueError):
        parse_fds("3:AF_BLUETOOTH")
    specs = ["tcp:8090", "ssl:8443:privateKey=/a,b.pem"]
    assert parse_specs(format_specs(specs)) == specs
    with pytest.raises(ValueError):
        parse_specs('{"a": 1}')


# -- supervisor ----------------------------------------------------------------


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, sig: int) -> None:
        self.signals.append(sig)


class Spawner:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.next_pid = 1000

    def __call__(self, proto: WorkerProtocol, exe: str, args: list[str], env: dict[str, str], path: str,
                 childFDs: dict[int, Any]) -> FakeTransport:
        self.next_pid += 1
        t = FakeTransport(self.next_pid)
        proto.makeConnection(t)  # type: ignore[arg-type]
        self.calls.append({"proto": proto, "args": args, "env": env, "fds": childFDs, "transport": t})
        return t


def _die(proto: WorkerProtocol, sig: int | None = signal.SIGKILL) -> None:
    reason = ProcessTerminated(signal=sig) if sig is not None else ProcessDone(0)
    proto.processEnded(Failure(reason))


@pytest.fixture
def supervised(tmp_path: Path) -> Any:
    config = load_config_data({"server": {"workers": 2, "listen": ["tcp:0:interface=127.0.0.1"]},
                               "storage": {"data_dir": str(tmp_path / "data")}}, source="cache.yaml",
                              environ={})
    clock, spawn = Clock(), Spawner()
    sup = Supervisor(config, str(tmp_path / "cache.yaml"), {"SPARKCACHE_DATA_DIR": str(tmp_path)}, reactor=real_reactor,
                     clock=clock, spawn=spawn, in_thread=lambda fn, *a: succeed(fn(*a)))
    sup.startService()
    assert sup.ready.called
    yield sup, clock, spawn
    if sup.running:
        sup.stopService()
    for listener in sup.listeners:
        listener.port.stopListening()


def test_spawns_the_workers_with_the_socket_and_one_primary(supervised: Any) -> None:
    sup, _, spawn = supervised
    assert len(spawn.calls) == 2
    [listener] = sup.listeners
    for i, call in enumerate(spawn.calls):
        assert call["args"][1:] == ["-m", "sparkcache.workers.worker"]
        assert call["fds"][3] == listener.fd and call["fds"][0] == "w"
        env = call["env"]
        assert env["SPARKCACHE_WORKER"] == str(i)
        assert env["SPARKCACHE_WORKER_PRIMARY"] == ("1" if i == 0 else "0")
        assert parse_fds(env["SPARKCACHE_WORKER_FDS"]) == [(3, "AF_INET")]
        assert parse_specs(env["SPARKCACHE_WORKER_LISTEN"]) == ["tcp:0:interface=127.0.0.1"]
        assert env["SPARKCACHE_DATA_DIR"] == sup.environ["SPARKCACHE_DATA_DIR"]
        assert env["PROMETHEUS_MULTIPROC_DIR"] == os.path.join(sup.config.storage.data_dir, "metrics")
    # The parent listens (the port is bound) but never accepts.
    host, port = listener.port.getHost().host, listener.port.getHost().port
    assert port > 0 and host == "127.0.0.1"
    assert listener.port not in real_reactor.getReaders()


def test_a_dead_worker_is_restarted_with_backoff(supervised: Any) -> None:
    sup, clock, spawn = supervised
    first = spawn.calls[1]["proto"]
    delays = []
    for _ in range(8):
        proto = sup.workers[1]
        _die(proto)
        assert 1 not in sup.workers
        delays.append(sup.pending[1].getTime() - clock.seconds())
        clock.advance(delays[-1])
        assert sup.workers[1] is not proto
    assert delays[:3] == [RESTART_MIN, RESTART_MIN * 2, RESTART_MIN * 4]
    assert max(delays) == RESTART_MAX
    assert sup.workers[1].index == 1 and first.index == 1
    assert spawn.calls[-1]["env"]["SPARKCACHE_WORKER_PRIMARY"] == "0"
    # One that ran a while before dying starts over from the shortest delay.
    clock.advance(STABLE_AFTER)
    _die(sup.workers[1], None)
    assert sup.pending[1].getTime() - clock.seconds() == RESTART_MIN
    # The primary's replacement is the primary again.
    _die(sup.workers[0])
    clock.advance(RESTART_MIN)
    assert spawn.calls[-1]["env"]["SPARKCACHE_WORKER_PRIMARY"] == "1"


def test_stop_forwards_sigterm_waits_then_kills_the_rest(supervised: Any) -> None:
    sup, clock, spawn = supervised
    _die(sup.workers[1])  # a restart pending: a stop cancels it
    d = sup.stopService()
    assert not sup.pending
    t0 = sup.workers[0].transport
    assert t0.signals == [signal.SIGTERM]
    assert not d.called
    clock.advance(sup.config.server.shutdown_timeout + 5)
    assert t0.signals == [signal.SIGTERM, signal.SIGKILL]
    _die(sup.workers[0])
    assert d.called and not sup.listeners
    assert len(spawn.calls) == 2  # nothing restarted while stopping


def test_the_parent_catches_sighup_before_its_store_check(tmp_path: Path) -> None:
    """twistd leaves SIGHUP's default action: a reload during a long store check must not end the daemon."""
    from twisted.internet.defer import Deferred

    config = load_config_data({"server": {"workers": 2, "listen": ["tcp:0:interface=127.0.0.1"]},
                               "storage": {"data_dir": str(tmp_path / "data")}}, source="cache.yaml", environ={})
    checking: Deferred[None] = Deferred()
    sup = Supervisor(config, str(tmp_path / "cache.yaml"), {}, reactor=real_reactor, clock=Clock(), spawn=Spawner(),
                     check_store=lambda: checking, in_thread=lambda fn, *a: succeed(fn(*a)))
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        sup.startService()
        assert not sup.ready.called  # still checking the store
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)
    finally:
        signal.signal(signal.SIGHUP, previous)
        for listener in sup.listeners:
            listener.port.stopListening()


def test_sighup_reaches_every_worker_that_catches_it(supervised: Any, monkeypatch: Any) -> None:
    sup, _, spawn = supervised
    monkeypatch.setattr("sparkcache.workers.supervisor.handles", lambda pid, sig: True)
    sup.forward(signal.SIGHUP)
    assert [c["transport"].signals for c in spawn.calls] == [[signal.SIGHUP], [signal.SIGHUP]]
    # One still starting (its default action would end it) is skipped: it reads the file as it starts.
    starting = spawn.calls[1]["transport"].pid
    monkeypatch.setattr("sparkcache.workers.supervisor.handles", lambda pid, sig: pid != starting)
    sup.forward(signal.SIGHUP)
    assert [c["transport"].signals for c in spawn.calls] == [[signal.SIGHUP] * 2, [signal.SIGHUP]]


def test_handles_reads_the_signal_masks_of_a_process() -> None:
    import subprocess

    from sparkcache.workers.supervisor import handles

    plain = subprocess.Popen(["sleep", "30"])
    ignoring = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, "
                                 "signal.SIG_IGN); print('ok', flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        assert ignoring.stdout is not None and ignoring.stdout.readline() == b"ok\n"
        assert not handles(plain.pid, signal.SIGHUP)
        assert handles(ignoring.pid, signal.SIGHUP)
    finally:
        for proc in (plain, ignoring):
            proc.kill()
            proc.wait()


def test_worker_output_lines_go_to_the_parent_log(supervised: Any) -> None:
    from twisted.logger import globalLogPublisher

    sup, _, _ = supervised
    seen: list[str] = []
    observer = lambda e: "line" in e and seen.append(e["line"])  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        proto = sup.workers[0]
        proto.childDataReceived(1, b"hello wo")
        proto.childDataReceived(1, b"rld\nsecond")
        assert seen == ["hello world"]
        _die(proto)
        assert seen == ["hello world", "second"]
    finally:
        globalLogPublisher.removeObserver(observer)


def test_adopted_unix_socket_leaves_the_path_to_the_parent(tmp_path: Path) -> None:
    from twisted.internet.protocol import Factory

    path = str(tmp_path / "s.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(5)
    s.setblocking(False)
    try:
        d = AdoptedEndpoint(real_reactor, s.fileno(), "AF_UNIX").listen(Factory())
        port = d.result
        port.stopReading()
        port.connectionLost(Failure(Exception("test")))  # what stopListening ends in, without the delay
        assert os.path.exists(path)
    finally:
        s.close()


def test_store_wide_timers_run_in_the_primary_only(tmp_path: Path) -> None:
    from sparkcache.service import SparkcacheService

    config = load_config_data({"storage": {"data_dir": str(tmp_path)}, "seed": {"enabled": True},
                               "git": {"allowed_hosts": ["git.example"]}}, source="cache.yaml", environ={})

    def timers(svc: SparkcacheService) -> set[str]:
        names = set()
        stack = list(svc.runtime)
        while stack:
            s = stack.pop()
            names.add(s.name)
            stack.extend(getattr(s, "services", []))
        return names

    primary = timers(SparkcacheService(config, Clock(), endpoints=[]))
    other = timers(SparkcacheService(config, Clock(), endpoints=[], primary=False))
    assert {"eviction", "expiry", "access-flush", "git check scheduler", "git maintenance"} <= primary
    assert "seed-artifact-expiry" in primary
    assert "access-flush" in other
    assert not {"eviction", "expiry", "git check scheduler", "git maintenance", "seed-artifact-expiry"} & other


def test_a_dead_workers_spool_is_emptied_before_its_restart(supervised: Any) -> None:
    sup, clock, spawn = supervised
    mine, other = Path(sup.spool_dir) / "w1", Path(sup.spool_dir) / "w0"
    assert mine.is_dir() and other.is_dir()  # emptied (made) at start
    (mine / "dl-unfinished").write_bytes(b"half a body")
    (other / "dl-live").write_bytes(b"a live download of worker 0")
    _die(sup.workers[1])
    assert (mine / "dl-unfinished").exists()  # not before the restart is due
    clock.advance(RESTART_MIN)
    assert not (mine / "dl-unfinished").exists() and len(spawn.calls) == 3
    assert (other / "dl-live").exists()


def _self_signed_pem(tmp_path: Path) -> Path:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    pem = tmp_path / "server.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
                    + cert.public_bytes(serialization.Encoding.PEM))
    return pem


def test_a_worker_wraps_an_adopted_ssl_socket_in_tls(tmp_path: Path) -> None:
    from twisted.internet.protocol import Factory
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from sparkcache.workers.worker import adopted_endpoints

    pem = _self_signed_pem(tmp_path)
    env = {"SPARKCACHE_CONFIG": "cache.yaml", "SPARKCACHE_WORKER_FDS": "3:AF_INET,4:AF_INET",
           "SPARKCACHE_WORKER_LISTEN": format_specs(["tcp:8090", f"ssl:8443:privateKey={pem}"])}
    plain, tls = adopted_endpoints(env, real_reactor)
    assert plain.tls is None and tls.tls is not None
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(5)
    s.setblocking(False)
    try:
        port = AdoptedEndpoint(real_reactor, s.fileno(), "AF_INET", tls=tls.tls).listen(Factory()).result
        try:
            assert isinstance(port.factory, TLSMemoryBIOFactory)
        finally:
            port.stopReading()
            port.connectionLost(Failure(Exception("test")))
    finally:
        s.close()
    # The certificate went away since the parent loaded it: the worker stops with a config error.
    pem.unlink()
    with pytest.raises(ConfigError, match=r"cache\.yaml: server\.listen: 'ssl:8443"):
        adopted_endpoints(env, real_reactor)
