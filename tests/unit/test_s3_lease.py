"""The cross-host lease (store/s3/lease.py) against moto (in a thread), through
the fault proxy: one holder at a time with ``If-None-Match: *``, renewal, an
expired lease taken over by one host only (``If-Match``), a holder that lost
its lease deletes nothing, waiting for another host's entry, a server that
ignores the conditions (every host holds it), and the bucket unreachable
(an inert lease: the host goes on alone). The leases' expiries and polls run
on a task.Clock; the S3 requests on the reactor."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread

from sparkcache.store.s3.client import S3Client
from sparkcache.fetch.peer import refusal, sign
from sparkcache.store.s3.lease import Lease, LeaseInfo, Leases, key_hash
from sparkcache.store.s3.settings import S3Credentials, S3Settings
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, FaultProxy, boto_client, make_bucket, moto_endpoint
from tests.support.waiting import eventually

TTL = 30.0


def settings(endpoint: str, bucket: str, **kw: Any) -> S3Settings:
    return S3Settings(endpoint=endpoint, bucket=bucket, prefix="t/", credentials=S3Credentials(ACCESS_KEY, SECRET_KEY),
                      backoff=0.01, timeout=10, attempts=2, **kw)


@pytest.fixture
def bucket():
    endpoint = moto_endpoint()
    bucket = make_bucket(endpoint)
    proxy = FaultProxy(endpoint)
    clients: list[S3Client] = []
    clock = Clock()
    clock.advance(1_000_000)

    def host(via_proxy: bool = True, **kw: Any) -> Leases:
        client = S3Client(settings(proxy.endpoint if via_proxy else endpoint, bucket, **kw), reactor, deferToThread)
        clients.append(client)
        leases = Leases(client, "t/", clock, TTL)
        leases.events = []  # what Metrics.lease would be told
        leases.count = leases.events.append
        return leases

    yield host, clock, proxy, endpoint, bucket
    for c in clients:
        pytest_twisted.blockon(Deferred.fromCoroutine(c.close()))
    proxy.stop()


async def settle(d: Deferred[Any], clock: Clock, step: float = 0.5, limit: int = 3000) -> Any:
    """Advance the leases' clock until ``d`` fires (its S3 requests run on the reactor:
    at least ``limit`` reactor turns of 10 ms, 30 s, for a loaded machine)."""
    for _ in range(limit):
        if d.called:
            return await d
        clock.advance(step)
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("never fired")


def die(held: Lease) -> None:
    """The holder's process dies: no renewal, no release."""
    held._released = True
    if held._timer is not None:
        held._timer.cancel()


async def turn() -> None:
    await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_one_holder_at_a_time(bucket):
    host, clock, proxy, endpoint, name = bucket
    a, b = host(), host()
    held = await a.acquire("k")
    assert isinstance(held, Lease) and not held.inert
    assert await b.acquire("k") is None
    info = await b.read("k")
    assert info is not None and info.owner == a.me and info.expires == clock.seconds() + TTL
    doc = json.loads(boto_client(endpoint).get_object(Bucket=name, Key=a.name("k"))["Body"].read())
    assert doc["key"] == "k" and a.name("k").startswith("t/leases/")
    await held.release()
    assert await b.read("k") is None
    again = await b.acquire("k")
    assert isinstance(again, Lease)
    await again.release()


@pytest_twisted.ensureDeferred
async def test_renewed_while_held_then_taken_over_once_expired(bucket):
    host, clock, proxy, endpoint, name = bucket
    a, b, c = host(), host(), host()
    held = await a.acquire("k")
    assert held is not None
    first = (await b.read("k")).expires
    clock.advance(TTL / 3)  # the renewal runs
    for _ in range(600):  # its S3 request, up to 30 s on a loaded machine
        info = await b.read("k")
        if info.expires > first:
            break
        await turn()
    assert info.expires == first + TTL / 3
    # The holder dies (its renewals stop): the lease expires and one host takes it over.
    die(held)
    clock.advance(TTL + 1)
    info = await b.read("k")
    assert info.expires <= clock.seconds()
    won = await b.take_over("k", info)
    assert isinstance(won, Lease)
    assert await c.take_over("k", info) is None  # its ETag is no longer the lease's
    assert (await c.read("k")).owner == b.me
    await won.release()


@pytest_twisted.ensureDeferred
async def test_a_lease_lost_to_a_takeover_is_left_alone(bucket):
    host, clock, proxy, endpoint, name = bucket
    a, b = host(), host()
    held = await a.acquire("k")
    held._timer.cancel()  # a stalls: its renewal comes too late
    clock.advance(TTL + 1)
    info = await b.read("k")
    won = await b.take_over("k", info)
    assert won is not None
    await held._renew_now()
    assert held.lost  # its renewal, conditional on its old ETag, failed
    assert a.events == ["taken", "lost"] and b.events == ["taken_over"]
    assert not held._timer.active()  # and is not tried again
    await held.release()  # deletes nothing: the lease is b's
    assert (await a.read("k")).owner == b.me
    await won.release()


@pytest_twisted.ensureDeferred
async def test_waiter_gets_the_entry_or_the_lease(bucket):
    host, clock, proxy, endpoint, name = bucket
    a, b = host(), host()
    held = await a.acquire("k")
    entry: list[str] = []

    async def found() -> str | None:
        return entry[0] if entry else None

    waiting = ensureDeferred(b.wait("k", found))
    for _ in range(5):
        clock.advance(1)
        await turn()
    assert not waiting.called
    entry.append("the entry")  # a published it, then lets go
    await held.release()
    assert await settle(waiting, clock) == "the entry"
    assert b.waited == 1
    # The holder gives up without an entry: the waiter takes the lease.
    entry.clear()
    held = await a.acquire("k")
    waiting = ensureDeferred(b.wait("k", found))
    for _ in range(3):
        clock.advance(1)
        await turn()
    await held.release()
    got = await settle(waiting, clock)
    assert isinstance(got, Lease) and (await a.read("k")).owner == b.me
    await got.release()
    assert a.events == ["taken", "taken"] and b.events == ["waited", "waited", "taken"]


@pytest_twisted.ensureDeferred
async def test_waiter_takes_over_from_a_dead_holder(bucket):
    host, clock, proxy, endpoint, name = bucket
    a, b = host(), host()
    held = await a.acquire("k")
    die(held)

    async def nothing() -> None:
        return None

    got = await settle(ensureDeferred(b.wait("k", nothing)), clock)
    assert isinstance(got, Lease) and not got.inert
    assert clock.seconds() >= 1_000_000 + TTL
    await got.release()
    assert b.events == ["waited", "taken_over"]


@pytest_twisted.ensureDeferred
async def test_server_matching_unquoted_etags_only(bucket):
    """Ceph RGW 16 never matches a quoted ``If-Match``: renewal and takeover
    retry with the ETag unquoted, then send it unquoted first."""
    host, clock, proxy, endpoint, name = bucket
    proxy.arm("PUT", "/t/leases/", "quoted-if-match", times=100)
    a, b, c = host(), host(), host()
    held = await a.acquire("k")
    await held._renew_now()
    assert not held.lost and a.bare_etags
    puts = proxy.count("PUT")
    await held._renew_now()
    assert not held.lost and proxy.count("PUT") == puts + 1  # unquoted straight away
    die(held)
    clock.advance(TTL + 1)
    info = await b.read("k")
    won = await b.take_over("k", info)
    assert isinstance(won, Lease)
    assert await c.take_over("k", info) is None  # neither form matches the new ETag
    assert (await c.read("k")).owner == b.me
    await won.release()


@pytest_twisted.ensureDeferred
async def test_server_ignoring_conditions_every_host_holds_it(bucket):
    host, clock, proxy, endpoint, name = bucket
    proxy.arm("PUT", "/t/leases/", "unconditional", times=100)
    a, b = host(), host()
    one, two = await a.acquire("k"), await b.acquire("k")
    assert isinstance(one, Lease) and isinstance(two, Lease)
    await one.release()
    await two.release()


@pytest_twisted.ensureDeferred
async def test_bucket_unreachable_gives_an_inert_lease(bucket):
    host, clock, proxy, endpoint, name = bucket
    a = host()
    proxy.stop()
    got = await a.acquire("k")
    assert isinstance(got, Lease) and got.inert
    await got.release()
    assert a.events == ["inert"]


@pytest_twisted.ensureDeferred
async def test_the_lease_names_the_holders_peer_address_and_the_waiter_hears_it(bucket):
    host, clock, proxy, endpoint, name = bucket
    a, b = host(peer_url="http://10.0.0.5:8080", peer_key=b"k" * 32), host(peer_key=b"k" * 32)
    held = await a.acquire("k")
    assert a.held == {key_hash("k"): held}
    told: list[LeaseInfo] = []

    async def holder(info: LeaseInfo) -> None:
        told.append(info)

    async def nothing() -> None:
        return None

    waiting = ensureDeferred(b.wait("k", nothing, holder))
    await eventually(lambda: bool(told), timeout=30)  # b's first look at the lease (S3 requests)
    assert [(i.owner, i.peer) for i in told] == [(a.me, "http://10.0.0.5:8080")]
    await held.release()
    assert a.held == {}
    got = await settle(waiting, clock)
    assert isinstance(got, Lease) and len(told) == 1  # told once, not at every poll
    assert (await a.read("k")).peer is None  # b has no peer_url: its lease names none
    await got.release()


def test_peer_tokens():
    key, path, now = b"k" * 32, b"/_peer/flight/" + b"ab" * 32, 1_000_000.0
    token = sign(key, b"GET", path, now)
    assert refusal(key, b"GET", path, token, now + 100) is None
    assert refusal(key, b"GET", path, None, now) == "no peer token"
    assert refusal(b"", b"GET", path, token, now) is not None
    assert "malformed" in refusal(key, b"GET", path, b"nonsense", now)
    assert "out of date" in refusal(key, b"GET", path, token, now + 1000)
    for other in ((b"x" * 32, b"GET", path), (key, b"HEAD", path), (key, b"GET", path + b"0")):
        assert refusal(*other, token, now) == "bad peer token"
