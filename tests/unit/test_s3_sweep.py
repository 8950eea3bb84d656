"""The bucket's sweeper against moto: the lease's election and takeover (and
the smallest host id winning on a server that ignores conditional writes),
least recently used first by the hosts' access hints, pinned bodies kept,
the index documents of a swept body removed, and a host whose body was swept
finding a miss."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread

from sparkcache.store.s3.client import MAX_XML, S3Client
from sparkcache.store.s3.content import S3ContentStore
from sparkcache.store.s3.published import SharedIndex
from sparkcache.store.s3.settings import S3Credentials, S3Settings
from sparkcache.store.s3.sweep import AccessHints, LeaseObject, Sweeper
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, boto_client, list_keys, make_bucket, moto_endpoint

NOW = 4.0e9  # later than any LastModified moto gives: every object counts as old


def settings(endpoint: str, bucket: str) -> S3Settings:
    return S3Settings(endpoint=endpoint, bucket=bucket, prefix="t/", credentials=S3Credentials(ACCESS_KEY, SECRET_KEY),
                      attempts=2, backoff=0.01, timeout=10)


class IgnoresConditions(S3Client):
    """A server that ignores If-None-Match (as if every conditional PUT succeeded)."""

    async def put_bytes(self, key: str, data: bytes, if_none_match: bool = False,
                        content_type: str = "application/octet-stream") -> bool:
        return await super().put_bytes(key, data, False, content_type)


@pytest.fixture
def s3():
    endpoint = moto_endpoint()
    bucket = make_bucket(endpoint)
    clients = []

    def client(cls=S3Client) -> S3Client:
        c = cls(settings(endpoint, bucket), reactor, deferToThread)
        clients.append(c)
        return c

    yield client, endpoint, bucket
    for c in clients:
        pytest_twisted.blockon(Deferred.fromCoroutine(c.close()))


def clock_at(t: float = NOW) -> task.Clock:
    c = task.Clock()
    c.advance(t)
    return c


async def drive(clock: task.Clock, step: float, *coros) -> list:
    """Run lease rounds whose settle waits are on ``clock``: advance it once
    every unfinished round is waiting (their I/O runs on the real reactor)."""
    ds = [Deferred.fromCoroutine(c) for c in coros]
    while not all(d.called for d in ds):
        pending = sum(not d.called for d in ds)
        if len(clock.getDelayedCalls()) >= pending:
            clock.advance(step)
        else:
            await task.deferLater(reactor, 0.005, lambda: None)
    return [d.result for d in ds]


async def put_body(client: S3Client, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    await client.put_bytes(f"t/cas/{digest}", data)
    return digest


async def put_index(client: S3Client, key: str, digest: str) -> str:
    name = f"t/index/{hashlib.sha256(key.encode()).hexdigest()}"
    await client.put_bytes(name, json.dumps({"format": 1, "key": key, "digest": digest}).encode())
    return name


@pytest_twisted.ensureDeferred
async def test_one_host_holds_the_lease_until_it_expires(s3):
    client, _, _ = s3
    clock = clock_at()
    a = LeaseObject(client(), "t/sweeper", "host-a", 100.0, clock, settle=0)
    b = LeaseObject(client(), "t/sweeper", "host-b", 100.0, clock, settle=0)
    assert await a.hold() is True
    assert await b.hold() is False
    clock.advance(60)
    assert await a.hold() is True  # renewed: good for 100 s from now
    clock.advance(60)
    assert await b.hold() is False
    clock.advance(41)  # a stopped renewing: expired
    assert await b.hold() is True
    assert await a.hold() is False
    await b.release()
    assert await a.hold() is True


@pytest_twisted.ensureDeferred
async def test_concurrent_first_takers_on_a_conditional_server(s3):
    client, _, _ = s3
    clock = clock_at()
    hosts = [LeaseObject(client(), "t/sweeper", f"host-{n}", 100.0, clock, settle=1.0) for n in "cba"]
    won = await drive(clock, 1.0, *(h.hold() for h in hosts))
    assert sorted(won) == [False, False, True]


class ReadsFirst:
    """Holds back every write until ``n`` reads were answered: hosts that all
    found no lease before any of them wrote one (their I/O is real, so
    otherwise one may read the other's fresh lease and rightly back off)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads = 0
        self.waiting: list[Deferred[None]] = []

    def read(self) -> None:
        self.reads += 1
        if self.reads == self.n:
            waiting, self.waiting = self.waiting, []
            for d in waiting:
                d.callback(None)

    def before_write(self) -> Deferred[None]:
        if self.reads >= self.n:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        return d


def ignoring_conditions_after(gate: ReadsFirst) -> type:
    class Gated(IgnoresConditions):
        async def get_bytes(self, key: str, limit: int = MAX_XML) -> bytes | None:
            got = await super().get_bytes(key, limit)
            gate.read()
            return got

        async def put_bytes(self, key: str, data: bytes, if_none_match: bool = False,
                            content_type: str = "application/octet-stream") -> bool:
            await gate.before_write()
            return await super().put_bytes(key, data, if_none_match, content_type)

    return Gated


@pytest_twisted.ensureDeferred
async def test_the_smallest_host_id_wins_where_conditions_are_ignored(s3):
    client, _, _ = s3
    clock = clock_at()
    # Both create "at once" (both found no lease before either wrote): whichever
    # write lands last, a (the smaller id) takes it.
    gated = ignoring_conditions_after(ReadsFirst(2))
    b = LeaseObject(client(gated), "t/sweeper", "host-b", 100.0, clock, settle=1.0)
    a = LeaseObject(client(gated), "t/sweeper", "host-a", 100.0, clock, settle=1.0)
    won = await drive(clock, 1.0, a.hold(), b.hold())
    assert won == [True, False]
    clock.advance(10)
    assert await drive(clock, 1.0, b.hold()) == [False]


@pytest_twisted.ensureDeferred
async def test_least_recently_used_first_pinned_kept_index_documents_removed(s3):
    client, endpoint, bucket = s3
    c = client()
    clock = clock_at()
    old, older, oldest, pinned = [await put_body(c, bytes([n]) * 1000) for n in range(4)]
    fresh = await put_body(c, b"f" * 1000)
    await c.put_bytes(f"t/pinned/{pinned}", b"")
    names = {d: await put_index(c, f"key-{d[:8]}", d) for d in (old, older, oldest, pinned)}
    # Two hosts' hints: the most recent use of a body counts, whoever used it.
    ha = AccessHints(c, "t/", "host-a", clock)
    hb = AccessHints(c, "t/", "host-b", clock)
    clock.advance(-3000)
    ha.note(oldest)
    clock.advance(1000)
    ha.note(older)
    hb.note(old)
    clock.advance(1000)
    hb.note(older)  # older's last use: 1000 s ago (later than old's, 2000 s ago)
    clock.advance(999)
    ha.note(fresh)  # within the grace: not swept even though it is above the limit
    clock.advance(1)
    await ha.flush()
    await hb.flush()
    # (This clock is decades past the bucket's dates: no hints document may count as a silent host's.)
    sweeper = Sweeper(c, "t/", "host-a", max_size=3000, clock=clock, lease_duration=300, grace=60, settle=0,
                      hints_age=float("inf"))
    report = await sweeper.tick()
    assert report is not None and report.total == 5000 and report.pinned_kept == 1
    # 5000 → 3000: the two least recently used, in that order; pinned and fresh stay.
    assert report.chosen == [oldest, old] and sorted(report.deleted) == sorted([oldest, old])
    assert report.freed == 2000
    keys = list_keys(endpoint, bucket, "t/")
    assert f"t/cas/{oldest}" not in keys and f"t/cas/{old}" not in keys
    assert {f"t/cas/{older}", f"t/cas/{pinned}", f"t/cas/{fresh}"} <= set(keys)
    assert names[oldest] not in keys and names[old] not in keys
    assert names[older] in keys and names[pinned] in keys
    assert report.index_deleted == 2
    again = await sweeper.tick()  # at the limit now: nothing more goes
    assert again is not None and again.total == 3000 and again.deleted == []
    sweeper.max_size = 1000  # only older may still go: pinned never, fresh not yet
    again = await sweeper.tick()
    assert again is not None and again.deleted == [older] and again.total == 3000


@pytest_twisted.ensureDeferred
async def test_only_the_lease_holder_sweeps(s3):
    client, endpoint, bucket = s3
    c = client()
    clock = clock_at()
    for n in range(3):
        await put_body(c, bytes([n]) * 100)
    a = Sweeper(c, "t/", "host-a", max_size=100, clock=clock, lease_duration=300, grace=0, settle=0)
    b = Sweeper(client(), "t/", "host-b", max_size=100, clock=clock, lease_duration=300, grace=0, settle=0)
    assert await b.tick() is not None  # b first: b holds it
    assert await a.tick() is None
    assert len([k for k in list_keys(endpoint, bucket, "t/cas/")]) == 1


@pytest_twisted.ensureDeferred
async def test_a_host_whose_body_was_swept_finds_a_miss(s3, tmp_path):
    client, endpoint, bucket = s3
    c = client()
    clock = clock_at()
    store = S3ContentStore(c, str(tmp_path / "tier"), 10 * 2**20, clock, deferToThread)
    hints = AccessHints(c, "t/", "host-a", clock)
    store.hints = hints
    data = os.urandom(5000)
    digest = hashlib.sha256(data).hexdigest()
    spool = tmp_path / "spool"
    spool.write_bytes(data)
    await store.upload(str(spool), digest, len(data))
    await deferToThread(store.commit, str(spool), digest)
    assert digest in hints.used  # a commit counts as a use
    assert await store.ensure(digest, len(data)) is True
    await deferToThread(store.remove, digest)  # evicted from the tier: only the bucket has it
    index = SharedIndex(c, "t/", clock)
    await put_index(c, "the-key", digest)
    clock.advance(1000)
    report = await Sweeper(c, "t/", "host-a", max_size=0, clock=clock, lease_duration=300, grace=60,
                           settle=0).tick()
    assert report is not None and report.deleted == [digest] and report.index_deleted == 1
    assert await store.ensure(digest, len(data)) is False  # a miss, not an error
    assert await index.lookup("the-key") is None


@pytest_twisted.ensureDeferred
async def test_pinned_marker_written_at_publish(s3):
    from sparkcache.store.index import Entry

    client, endpoint, bucket = s3
    c = client()
    index = SharedIndex(c, "t/", clock_at())
    digest = "ab" * 32
    await index.publish(Entry(key="upload", remote="r", path="p", status=200, digest=digest, size=1,
                              content_type=None, headers={}, fetched=1.0, expires=None, etag=None,
                              last_modified=None, last_access=1.0, pinned=True))
    keys = list_keys(endpoint, bucket, "t/")
    assert f"t/pinned/{digest}" in keys
    assert not any(k.startswith("t/index/") for k in keys)  # an upload is not shared


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 200])
def test_host_id_is_checked(bad, tmp_path):
    from sparkcache.config import ConfigError
    from sparkcache.protocols import load_config_data

    data = {"storage": {"data_dir": str(tmp_path), "backend": "s3",
                        "s3": {"endpoint": "http://127.0.0.1:1", "bucket": "bkt", "host_id": bad}}}
    with pytest.raises(ConfigError) as e:
        load_config_data(data, environ={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert "host_id" in str(e.value)


# -- leftovers: multipart uploads in progress, temporary objects, leases ------------------------

MOTO_INITIATED = 1289422113.0  # moto dates every multipart upload 2010-11-10T20:48:33Z


@pytest_twisted.ensureDeferred
async def test_leftovers_older_than_a_day_go_and_nothing_else(s3):
    client, endpoint, bucket = s3
    c = client()
    boto = boto_client(endpoint)
    body = await put_body(c, b"kept" * 100)
    await c.put_bytes(f"t/pinned/{body}", b"")
    await put_index(c, "a-key", body)
    ours = [boto.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"]
            for k in ("t/tmp/host-a/0123", f"t/cas/{'ab' * 32}", f"t/pinned/{'cd' * 32}")]
    # Outside the prefix ("t2/" starts like "t"): never ours.
    theirs = {k: boto.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"] for k in ("t2/x", "other/y")}
    await c.put_bytes("t/tmp/host-a/4567", b"staged")
    await c.put_bytes(f"t/leases/{'ef' * 32}", b"{}")
    await c.put_bytes("t2/tmp/z", b"not ours")

    def uploads() -> set[str]:
        return {u["UploadId"] for u in boto.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}

    # An hour after those uploads began (and before the objects were written): all kept.
    clock = clock_at(MOTO_INITIATED + 3600)
    sweeper = Sweeper(c, "t/", "host-a", max_size=2**40, clock=clock, lease_duration=300, settle=0)
    report = await sweeper.tick()
    assert report is not None and report.uploads_aborted == 0 and report.leftovers_deleted == 0
    assert uploads() == set(ours) | set(theirs.values())
    # Much later: ours are aborted, the staged object and the lease deleted; the rest stays.
    clock.advance(NOW - clock.seconds())
    report = await sweeper.tick()
    assert report is not None and report.uploads_aborted == 3 and report.leftovers_deleted == 2
    assert uploads() == set(theirs.values())
    keys = set(list_keys(endpoint, bucket))
    assert "t/tmp/host-a/4567" not in keys and f"t/leases/{'ef' * 32}" not in keys
    assert {f"t/cas/{body}", f"t/pinned/{body}", "t2/tmp/z", "t/sweeper"} <= keys
    assert any(k.startswith("t/index/") for k in keys)


class CannedUploads(S3Client):
    """ListMultipartUploads answered from canned pages (the queries kept), then
    with ``error`` (status, code: by default 501 NotImplemented)."""

    def __init__(self, *a, pages=None, error=(501, "NotImplemented"), **kw) -> None:
        super().__init__(*a, **kw)
        self.pages = list(pages or [])
        self.error = error
        self.queries: list[str] = []
        self.aborted: list[tuple[str, str]] = []

    async def request(self, method, key, query="", *a, **kw):
        if method == "GET" and query.startswith("uploads="):
            self.queries.append(query)
            if not self.pages:
                from sparkcache.store.s3.client import S3Error

                raise S3Error("GET ?uploads", *self.error, "the server's message")
            return None, self.pages.pop(0).encode()
        return await super().request(method, key, query, *a, **kw)

    async def abort_multipart(self, key: str, uid: str) -> bool:
        self.aborted.append((key, uid))
        return True


def _page(uploads: list[tuple[str, str, str]], next_key: str | None = None, next_uid: str | None = None) -> str:
    items = "".join(f"<Upload><Key>{k}</Key><UploadId>{u}</UploadId><Initiator><ID>x</ID></Initiator>"
                    f"<Initiated>{t}</Initiated></Upload>" for k, u, t in uploads)
    more = (f"<IsTruncated>true</IsTruncated><NextKeyMarker>{next_key}</NextKeyMarker>"
            f"<NextUploadIdMarker>{next_uid}</NextUploadIdMarker>") if next_key else "<IsTruncated>false</IsTruncated>"
    return f'<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{more}{items}' \
           "</ListMultipartUploadsResult>"


@pytest_twisted.ensureDeferred
async def test_upload_listing_is_paged_with_both_markers(s3):
    _, endpoint, bucket = s3
    old, new = "2020-01-01T00:00:00.000Z", "2030-01-01T00:00:00.000Z"
    pages = [_page([("t/tmp/a", "u/1+", old), ("t/cas/b", "u2", new)], "t/cas/b", "u2"),
             _page([("t/cas/b", "u3", old), ("elsewhere/c", "u4", old)])]
    c = CannedUploads(settings(endpoint, bucket), reactor, deferToThread, pages=pages)
    try:
        sweeper = Sweeper(c, "t/", "host-a", max_size=2**40, clock=clock_at(1.7e9), lease_duration=300, settle=0)
        report = await sweeper.tick()
    finally:
        await c.close()
    assert report is not None and report.uploads_aborted == 2
    assert c.queries == ["uploads=&prefix=t%2F", "uploads=&prefix=t%2F&key-marker=t%2Fcas%2Fb&upload-id-marker=u2"]
    # Old ones under the prefix only (a server that ignored the prefix lists others' too); ids quoted.
    assert c.aborted == [("t/tmp/a", "u%2F1%2B"), ("t/cas/b", "u3")]


@pytest.mark.parametrize("error", [(501, "NotImplemented"), (400, "InvalidRequest"), (405, "MethodNotAllowed"),
                                   (403, "AccessDenied"), (400, "NotImplemented")])
@pytest_twisted.ensureDeferred
async def test_a_server_without_upload_listing_is_told_once_and_the_rest_goes_on(s3, error):
    _, endpoint, bucket = s3
    c = CannedUploads(settings(endpoint, bucket), reactor, deferToThread, error=error)
    try:
        await c.put_bytes("t/tmp/host-a/0", b"staged")
        sweeper = Sweeper(c, "t/", "host-a", max_size=2**40, clock=clock_at(), lease_duration=300, settle=0)
        first = await sweeper.tick()
        second = await sweeper.tick()
    finally:
        await c.close()
    assert first is not None and first.leftovers_deleted == 1  # the temporary object went all the same
    assert second is not None
    assert len(c.queries) == 1 and sweeper.lists_uploads is False  # not asked again every round
    assert "t/tmp/host-a/0" not in list_keys(endpoint, bucket)


@pytest_twisted.ensureDeferred
async def test_a_passing_failure_to_list_uploads_keeps_nothing_else_from_going(s3):
    _, endpoint, bucket = s3
    c = CannedUploads(settings(endpoint, bucket), reactor, deferToThread, error=(503, "SlowDown"))
    try:
        await c.put_bytes("t/tmp/host-a/0", b"staged")
        sweeper = Sweeper(c, "t/", "host-a", max_size=2**40, clock=clock_at(), lease_duration=300, settle=0)
        first = await sweeper.tick()
        await c.put_bytes("t/tmp/host-a/1", b"staged")
        second = await sweeper.tick()
    finally:
        await c.close()
    assert first is not None and first.leftovers_deleted == 1
    assert second is not None and second.leftovers_deleted == 1
    assert len(c.queries) == 2 and sweeper.lists_uploads is True  # asked again the next round
    assert not [k for k in list_keys(endpoint, bucket) if k.startswith("t/tmp/")]


@pytest_twisted.ensureDeferred
async def test_access_hints_of_a_host_silent_for_a_month_go_ours_stay(s3):
    client, endpoint, bucket = s3
    c = client()
    for host in ("host-a", "host-old"):
        await c.put_bytes(f"t/access/{host}", json.dumps({"format": 1, "used": {}}).encode())
    hints = AccessHints(c, "t/", "host-a", clock_at())
    written = time.time()
    # A week after they were written: both kept.
    sweeper = Sweeper(c, "t/", "host-a", max_size=2**40, clock=clock_at(written + 7 * 86400), lease_duration=300,
                      settle=0, hints=hints)
    report = await sweeper.tick()
    assert report is not None and report.hints_deleted == 0
    # Past the month: the other host's go; this host's own stays, however old.
    sweeper.clock.advance(30 * 86400)
    report = await sweeper.tick()
    assert report is not None and report.hints_deleted == 1
    keys = set(list_keys(endpoint, bucket))
    assert "t/access/host-old" not in keys and "t/access/host-a" in keys
