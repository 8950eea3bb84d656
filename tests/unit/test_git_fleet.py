"""Git mirrors at fleet scale: adaptive intervals, the per-host rate cap, stale
clones, cheap HTTP ref checks and webhook signatures, driven by task.Clock (and a
real git http-backend for the ref checks)."""

from __future__ import annotations

import hashlib
import hmac
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, succeed

from sparkcache.config import ConfigError
from sparkcache.git.loop import Scheduler
from sparkcache.git.mirrors import Mirrors
from sparkcache.git.pktline import FLUSH, pkt_line
from sparkcache.git.rates import ACTIVE, RateCap, interval_for
from sparkcache.git.refcheck import Advertisement, CheckError, RefChecker, parse_ls_refs, parse_v0
from sparkcache.protocols import load_config_data
from sparkcache.protocols.git import webhook
from tests.support.git_upstream import GitUpstream
from tests.support.tools import require_tool

A = "a" * 40
B = "b" * 40


def fleet(tmp_path: Path, repos: dict[str, str], clock: task.Clock, **git: Any) -> Mirrors:
    cfg = load_config_data({"git": {"repos": repos, "jitter": 0, **git}}, "c", {}).git
    return Mirrors(cfg, str(tmp_path / "data"), reactor, clock=clock)


class Checks:
    """Stands in for Mirrors.check: records (time, host, name) and answers ``unchanged``."""

    def __init__(self, ms: Mirrors, clock: task.Clock) -> None:
        self.ms, self.clock = ms, clock
        self.calls: list[tuple[float, str, str]] = []

    def __call__(self, mirror: Any, scheduled: bool = False) -> Deferred[str]:
        from sparkcache.git.rates import forge_host

        self.calls.append((self.clock.seconds(), forge_host(mirror.url), mirror.name))
        self.ms.state(mirror).last_fetch = self.clock.seconds()
        return succeed("unchanged")


# -- intervals ---------------------------------------------------------------------------


def test_intervals_follow_access_and_change() -> None:
    cfg = load_config_data({"git": {"fetch_interval": "30s", "max_interval": "2h"}}, "c", {}).git
    now = 10 * 86400.0
    assert interval_for(cfg, now, None, None) == 7200  # never served nor changed: the idle maximum
    assert interval_for(cfg, now, now - 60, None) == 30  # served a minute ago
    assert interval_for(cfg, now, None, now - 600) == 30  # changed recently
    two_hours = interval_for(cfg, now, now - 2 * ACTIVE, None)
    day = interval_for(cfg, now, now - 86400, None)
    assert 30 < two_hours < day <= 7200  # grows with idleness
    assert interval_for(cfg, now, now - 30 * 86400, None) == 7200  # a month: capped
    assert interval_for(cfg, now, now - 30 * 86400, now - 5) == 30  # ...until its refs change


def test_scheduler_adapts_each_mirrors_interval(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1000)
    ms = fleet(tmp_path, {"hot": "https://forge.example/o/hot.git", "cold": "https://forge.example/o/cold.git"},
               clock, fetch_interval="30s", max_interval="1h")
    checks = Checks(ms, clock)
    ms.check = checks  # type: ignore[method-assign]
    sched = Scheduler(ms, clock, rng=random.Random(1))
    sched.startService()
    hot = ms.lookup("hot")
    for _ in range(40):  # 20 minutes; "hot" is cloned all along
        ms.acquire(hot)
        ms.release(hot)
        clock.advance(30)
    by_name = Counter(name for _, _, name in checks.calls)
    assert by_name["hot"] >= 30  # about every 30 s (with jitter)
    assert by_name["cold"] == 1  # its first check, then nothing for an hour
    assert sched.entries[hot.path].interval == 30
    assert sched.entries[ms.lookup("cold").path].interval == 3600
    # "hot" goes idle: after an hour without clients its interval grows
    clock.pump([60] * 150)
    assert sched.entries[hot.path].interval > 30
    # a client clones "cold": its next check is at most fetch_interval away, not an hour
    cold = ms.lookup("cold")
    before = by_name["cold"] = sum(1 for _, _, n in checks.calls if n == "cold")
    ms.acquire(cold)
    ms.release(cold)
    clock.pump([1] * 35)  # 33 s at most, plus a slot of the host's cap
    assert sum(1 for _, _, n in checks.calls if n == "cold") == before + 1
    assert sched.entries[cold.path].interval == 30
    sched.stopService()


# -- the rate cap --------------------------------------------------------------------------


def test_rate_cap_reserves_slots_and_counts_demand() -> None:
    clock = task.Clock()
    cap = RateCap(10, clock)
    waits = [cap.reserve() for _ in range(5)]
    assert waits == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    cap.take()  # a client's check goes now, and the loop's next slot moves back
    assert cap.reserve() == pytest.approx(0.6)
    for _ in range(100):  # a burst of clones: the loop waits a second at most
        cap.take()
    assert cap.reserve() == pytest.approx(1.0)


def test_per_host_cap_holds_with_10000_mirrors(tmp_path: Path) -> None:
    clock = task.Clock()
    repos = {f"r{i:05d}": f"https://{'big' if i % 10 else 'small'}.example/org/r{i}.git" for i in range(10_000)}
    ms = fleet(tmp_path, repos, clock, fetch_interval="30s", max_upstream_rate=20)
    checks = Checks(ms, clock)
    ms.check = checks  # type: ignore[method-assign]
    sched = Scheduler(ms, clock, rng=random.Random(3))
    for m in ms.mirrors():  # all served a moment ago: each wants a check every 30 s
        ms.state(m).last_served = 0.0
    sched.startService()
    for _ in range(600):
        clock.advance(1.0)
        # one timer for the whole fleet, never one per mirror
        assert len(clock.getDelayedCalls()) <= 1
    per_second = Counter((int(t), host) for t, host, _ in checks.calls)
    # GCRA with a burst of one: at most rate * W + 1 checks in any window of W seconds
    assert max(per_second.values()) <= 21
    for host in ("big.example", "small.example"):
        for start in range(0, 600, 7):
            assert sum(per_second[(s, host)] for s in range(start, start + 10)) <= 201
    big = [n for (s, h), n in per_second.items() if h == "big.example" and s >= 10]
    # The cap is what bounds it (9,000 mirrors want 300 checks a second): it is used, not undershot.
    assert sum(big) / 590 >= 19
    small = Counter(name for _, h, name in checks.calls if h == "small.example")
    # 1,000 mirrors at 20/s for 600 s: about 12 checks each, every one in turn (none starved)
    assert len(small) == 1000 and 10 <= min(small.values()) and max(small.values()) <= 14
    assert sched.wakeups <= 600 * 21
    hosts = {h["host"]: h for h in ms.hosts()}
    assert hosts["big.example"]["mirrors"] == 9000 and hosts["big.example"]["max_upstream_rate"] == 20
    sched.stopService()


# -- a clone of a stale mirror checks once ---------------------------------------------------


class HeldChecker:
    def __init__(self) -> None:
        self.pending: list[Deferred[Advertisement]] = []

    def check(self, url: str, creds: Any) -> Deferred[Advertisement]:
        d: Deferred[Advertisement] = Deferred()
        self.pending.append(d)
        return d


def test_a_stale_clone_checks_once_joining_the_check_in_flight(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(100)
    ms = fleet(tmp_path, {"app": "https://forge.example/o/app.git"}, clock, fetch_interval="30s")
    held = HeldChecker()
    ms.checker = held  # type: ignore[assignment]
    m = ms.lookup("app")
    st = ms.state(m)
    st.refs, st.head, st.last_fetch = {"refs/heads/main": A}, "refs/heads/main", 100.0
    assert ms.freshen(m).called and held.pending == []  # checked just now: served as it is
    clock.advance(31)
    first, second = ms.freshen(m), ms.freshen(m)
    assert len(held.pending) == 1 and not first.called and not second.called  # one check, joined
    held.pending[0].callback(Advertisement({"refs/heads/main": A}, "refs/heads/main"))
    assert first.called and second.called
    assert st.last_fetch == 131 and st.last_served == 131
    assert ms.freshen(m).called and len(held.pending) == 1
    # a failing check is recorded and the clone still served
    clock.advance(31)
    d = ms.freshen(m)
    held.pending[1].errback(CheckError("HTTP 503 from https://forge.example/o/app.git/info/refs"))
    assert d.called and "503" in (st.last_error or "")
    assert ms.rates.cap("forge.example").total == 2


# -- ref advertisements ----------------------------------------------------------------------


def test_parse_v0_and_ls_refs() -> None:
    v0 = (pkt_line(b"# service=git-upload-pack\n") + FLUSH
          + pkt_line(f"{A} HEAD\0multi_ack symref=HEAD:refs/heads/trunk agent=git/2\n".encode())
          + pkt_line(f"{A} refs/heads/trunk\n".encode()) + pkt_line(f"{B} refs/tags/v1\n".encode())
          + pkt_line(f"{A} refs/tags/v1^{{}}\n".encode()) + FLUSH)
    from sparkcache.git.pktline import iter_pkt_lines

    adv = parse_v0(list(iter_pkt_lines(v0)))
    assert adv == Advertisement({"refs/heads/trunk": A, "refs/tags/v1": B}, "refs/heads/trunk")
    v2 = (pkt_line(f"{A} HEAD symref-target:refs/heads/main\n".encode())
          + pkt_line(f"{A} refs/heads/main\n".encode()) + pkt_line(f"{B} refs/pull/1/head\n".encode()) + FLUSH)
    assert parse_ls_refs(v2) == Advertisement({"refs/heads/main": A, "refs/pull/1/head": B}, "refs/heads/main")
    # no symref: HEAD's branch is guessed as git clone does
    assert parse_ls_refs(pkt_line(f"{B} HEAD\n".encode()) + pkt_line(f"{B} refs/heads/dev\n".encode())
                         + FLUSH).head == "refs/heads/dev"
    with pytest.raises(CheckError, match="truncated"):
        parse_ls_refs(pkt_line(f"{A} refs/heads/main\n".encode()))
    with pytest.raises(CheckError):
        parse_v0(list(iter_pkt_lines(b"<html>")) if False else [b"<html>"])


@pytest_twisted.ensureDeferred
async def test_ref_checks_use_ls_refs_on_one_connection(tmp_path: Path) -> None:
    require_tool("git")
    up = GitUpstream(tmp_path / "up").start()
    try:
        up.create("one")
        up.create("two", branch="trunk")
        checker = RefChecker(reactor)
        one = await checker.check(up.url("one"), None)
        assert one.refs == up.refs("one") and one.head == "refs/heads/main"
        two = await checker.check(up.url("two"), None)
        assert two.refs == up.refs("two") and two.head == "refs/heads/trunk"
        seen = [(r.method, r.service, r.git_protocol) for r in up.seen()]
        # the first check learns that the forge speaks v2; the next is one ls-refs POST
        assert seen == [("GET", "git-upload-pack", "version=2"), ("POST", "git-upload-pack", "version=2"),
                        ("POST", "git-upload-pack", "version=2")]
        assert len(checker.hosts) == 1
        with pytest.raises(CheckError, match="HTTP 404"):
            await checker.check(up.url("nope"), None)
        await checker.close()
    finally:
        up.stop()


# -- webhooks ----------------------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_webhook_signatures_per_forge() -> None:
    body = b'{"ref": "refs/heads/main"}'
    good = sign("s3cret", body)
    assert webhook.verify("github", "s3cret", f"sha256={good}", body)
    assert not webhook.verify("github", "s3cret", good, body)  # the prefix is part of the format
    assert not webhook.verify("github", "s3cret", f"sha256={sign('other', body)}", body)
    assert not webhook.verify("github", "s3cret", None, body)
    for forge in ("gitea", "forgejo"):
        assert webhook.verify(forge, "s3cret", good, body)
        assert not webhook.verify(forge, "s3cret", good, body + b" ")
    assert webhook.verify("gitlab", "s3cret", "s3cret", body)
    assert not webhook.verify("gitlab", "s3cret", "s3cre", body)


def test_webhook_payload_urls_and_updates() -> None:
    gh = {"ref": "refs/heads/main", "after": A,
          "repository": {"clone_url": "https://forge.example/o/app.git", "ssh_url": "git@forge.example:o/app.git"}}
    assert webhook.clone_urls(gh) == ["https://forge.example/o/app.git", "git@forge.example:o/app.git"]
    assert webhook.updates(gh) == {"refs/heads/main": A}
    gl = {"ref": "refs/heads/x", "after": "0" * 40, "project": {"git_http_url": "https://gl.example/g/p.git"}}
    assert webhook.clone_urls(gl) == ["https://gl.example/g/p.git"] and webhook.updates(gl) == {}
    assert webhook.clone_urls([1, 2]) == [] and webhook.updates("x") == {}


def test_webhook_config_names_the_key() -> None:
    cfg = load_config_data({"git": {"webhooks": {"github": {"secret_env": "HOOK"}, "gitlab": {"secret": "t"}}}},
                           "c", {"HOOK": "from-env"}).git
    assert cfg.webhooks == {"github": "from-env", "gitlab": "t"}
    assert "from-env" not in repr(cfg) and "from-env" not in str(cfg.redacted())
    for bad, where in (({"bitbucket": {"secret": "x"}}, "git.webhooks.bitbucket"),
                       ({"github": {}}, "git.webhooks.github"),
                       ({"github": {"secret": "x", "token": "y"}}, "git.webhooks.github.token")):
        with pytest.raises(ConfigError) as e:
            load_config_data({"git": {"webhooks": bad}}, "c", {})
        assert where in str(e.value)
    for git, where in (({"max_interval": "10s", "fetch_interval": "30s"}, "git.max_interval"),
                       ({"max_upstream_rate": 0}, "git.max_upstream_rate")):
        with pytest.raises(ConfigError) as e:
            load_config_data({"git": git}, "c", {})
        assert where in str(e.value)


def test_a_push_joins_a_fetch_in_flight_and_fetches_again_when_it_predates_the_push(tmp_path: Path) -> None:
    clock = task.Clock()
    ms = fleet(tmp_path, {"app": "https://forge.example/o/app.git"}, clock)
    m = ms.lookup("app")
    started: list[Deferred[dict[str, str]]] = []

    def held_refresh(mirror: Any, clone: bool) -> Deferred[dict[str, str]]:
        d: Deferred[dict[str, str]] = Deferred()
        started.append(d)
        return d

    ms._refresh = held_refresh  # type: ignore[method-assign]
    running = ms.refresh(m, False)
    done: list[Any] = []
    ms.pushed(m, {"refs/heads/main": B}).addCallback(done.append)
    assert len(started) == 1  # joined, not a second fetch beside it
    started[0].callback({"refs/heads/main": A})  # it started before the push
    assert running.called and done == [] and len(started) == 2
    started[1].callback({"refs/heads/main": B})
    assert len(done) == 1 and ms.state(m).last_change == clock.seconds()
    # no fetch in flight: one fetch, even when it somehow did not bring the id
    ms.pushed(m, {"refs/heads/main": "c" * 40}).addCallback(done.append)
    started[2].callback({"refs/heads/main": B})
    assert len(done) == 2 and len(started) == 3


class SlowForge:
    """A checker whose answers the test releases; at most MAX_BACKLOG may queue."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, Deferred[Advertisement]]] = []

    def waiting(self) -> list[tuple[str, Deferred[Advertisement]]]:
        return [(u, d) for u, d in self.pending if not d.called]

    def check(self, url: str, creds: Any) -> Deferred[Advertisement]:
        d: Deferred[Advertisement] = Deferred()
        self.pending.append((url, d))
        return d

    def busy(self, url: str) -> bool:
        from sparkcache.git.refcheck import MAX_BACKLOG

        return len(self.waiting()) >= MAX_BACKLOG


def test_a_slow_forge_parks_the_loop_and_a_clone_does_not_queue_behind_it(tmp_path: Path) -> None:
    clock = task.Clock()
    repos = {f"r{i:03d}": f"https://slow.example/o/r{i}.git" for i in range(100)}
    ms = fleet(tmp_path, repos, clock, fetch_interval="30s", max_upstream_rate=20)
    forge = SlowForge()
    ms.checker = forge  # type: ignore[assignment]
    same = Advertisement({"refs/heads/main": A}, "refs/heads/main")
    for m in ms.mirrors():
        st = ms.state(m)
        st.refs, st.head, st.last_served, st.last_fetch = {"refs/heads/main": A}, "refs/heads/main", 0.0, 0.0
    sched = Scheduler(ms, clock, rng=random.Random(5))
    sched.startService()
    clock.advance(31)  # every mirror is due; the forge has not answered anything
    clock.pump([0.1] * 60)  # ...and has had its slot of the host's cap
    assert len(forge.waiting()) == 2 and sum(len(q) for q in sched.waiting.values()) == 98
    # a clone of a stale mirror checks at once, behind two checks at most
    stale = sched.waiting["slow.example"][-1].mirror  # the loop's last in line for it
    d = ms.freshen(stale)
    assert len(forge.waiting()) == 3 and forge.waiting()[-1][0] == stale.url
    # each answer lets one parked check go: the connection never has more than its backlog
    answered = 0
    while forge.waiting():
        forge.waiting()[0][1].callback(same)
        answered += 1
        assert len(forge.waiting()) <= 3
    assert answered >= 100 and d.called and not sched.waiting
    sched.stopService()
