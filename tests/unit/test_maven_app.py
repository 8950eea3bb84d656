"""The Maven remote in memory: verification against upstream sidecars, sidecars
computed from the stored bytes, freshness by path, several upstreams with a 404
falling through and cached briefly, HEAD, and bad input."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted
from twisted.web._newclient import ResponseFailed

from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

G = "org/example/lib"
JAR = f"{G}/1.0/lib-1.0.jar"
FIRST, SECOND = f"{UPSTREAM}/first", f"{UPSTREAM}/second"


def sha1(b: bytes) -> str:
    return hashlib.sha1(b).hexdigest()


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory({"remotes": {
        "central": {"type": "maven", "upstream": [FIRST, SECOND]},
        "files": {"type": "generic", "upstream": UPSTREAM},
    }}))


def publish(h: Harness, path: str, body: bytes, where: str = "/first", sidecar: bool = True) -> None:
    h.upstream.add(f"{where}/{path}", body, content_type="application/java-archive")
    if sidecar:
        h.upstream.add(f"{where}/{path}.sha1", sha1(body).encode(), content_type="text/plain")


async def get(h: Harness, path: str, method: str = "GET") -> Any:
    resp = await h.request(method, f"/maven/central/{path}")
    await h.settle()
    return resp


def form(h: Harness, name: str, result: str) -> float:
    value = h.metrics.registry.get_sample_value(
        "sparkcache_registry_requests_total", {"remote": "central", "form": name, "result": result})
    return value or 0.0


@pytest_twisted.ensureDeferred
async def test_a_release_is_verified_and_its_sidecars_match_the_stored_bytes(h: Harness) -> None:
    body = b"PK\x03\x04 a jar" * 5000
    publish(h, JAR, body)
    h.upstream.add(f"/first/{JAR}.md5", b"0" * 32)  # wrong upstream: never served for these bytes
    resp = await get(h, JAR)
    assert resp.status == 200 and resp.body == body and resp.header("X-Cache") == "MISS"
    # Upstream's X-Checksum headers would describe bytes unverified: not replayed.
    assert resp.header("X-Checksum-Sha1") is None
    assert h.upstream.count(f"/first/{JAR}.sha1") == 1 and h.upstream.count(f"/first/{JAR}") == 1
    resp = await get(h, JAR)
    assert resp.status == 200 and resp.header("X-Cache") == "HIT"
    for ext, fn in (("sha1", hashlib.sha1), ("md5", hashlib.md5), ("sha256", hashlib.sha256),
                    ("sha512", hashlib.sha512)):
        resp = await get(h, f"{JAR}.{ext}")
        assert resp.status == 200 and resp.body.decode() == fn(body).hexdigest(), ext
        head = await get(h, f"{JAR}.{ext}", "HEAD")
        assert head.status == 200 and head.body == b"" and head.header("Content-Length") == str(len(resp.body))
    assert h.upstream.count(f"/first/{JAR}.md5") == 0 and h.upstream.count(f"/first/{JAR}.sha1") == 1
    assert form(h, "artifact", "miss") == 1 and form(h, "artifact", "hit") == 1
    assert form(h, "checksum", "hit") == 8


@pytest_twisted.ensureDeferred
async def test_a_tampered_artifact_is_refused_and_nothing_is_stored(h: Harness) -> None:
    good, bad = b"good jar bytes" * 1000, b"evil jar bytes" * 1000
    publish(h, JAR, good)
    h.upstream.add(f"/first/{JAR}", bad, content_type="application/java-archive")
    try:
        resp = await get(h, JAR)
    except ResponseFailed:
        pass  # cut off before its last byte
    else:
        assert resp.status == 502 and resp.body != bad
    assert await h.store.index.get(f"central:{JAR}") is None
    # Its sidecar is not computed from anything: upstream's, which the bad bytes did not match.
    resp = await get(h, f"{JAR}.sha1")
    assert resp.body.decode() == sha1(good)
    h.upstream.add(f"/first/{JAR}", good)
    resp = await get(h, JAR)
    assert resp.status == 200 and resp.body == good
    assert (await h.store.index.get(f"central:{JAR}")).digest == hashlib.sha256(good).hexdigest()


@pytest_twisted.ensureDeferred
async def test_sha256_sidecar_verifies_when_there_is_no_sha1(h: Harness) -> None:
    good = b"only sha256 here" * 100
    h.upstream.add(f"/first/{JAR}", b"tampered" * 100)
    h.upstream.add(f"/first/{JAR}.sha256", hashlib.sha256(good).hexdigest().encode())
    try:
        resp = await get(h, JAR)
    except ResponseFailed:
        pass
    else:
        assert resp.status == 502
    assert await h.store.index.get(f"central:{JAR}") is None
    assert h.upstream.count(f"/first/{JAR}.sha1") == 1 and h.upstream.count(f"/second/{JAR}.sha1") == 1


@pytest_twisted.ensureDeferred
async def test_without_sidecars_an_artifact_is_stored_unverified(h: Harness) -> None:
    publish(h, JAR, b"no sums", sidecar=False)
    resp = await get(h, JAR)
    assert resp.status == 200 and resp.body == b"no sums"
    resp = await get(h, f"{JAR}.sha1")
    assert resp.status == 200 and resp.body.decode() == sha1(b"no sums")


@pytest_twisted.ensureDeferred
async def test_several_upstreams_a_404_falls_through_and_is_cached_briefly(h: Harness) -> None:
    only2 = f"{G}/2.0/lib-2.0.pom"
    publish(h, only2, b"<project/>", where="/second")
    resp = await get(h, only2)
    assert resp.status == 200 and resp.body == b"<project/>"
    assert h.upstream.count(f"/first/{only2}") == 1 and h.upstream.count(f"/second/{only2}") == 1

    missing = f"{G}/9.9/lib-9.9.pom"
    for _ in range(3):
        resp = await get(h, missing)
        assert resp.status == 404 and resp.json()["status"] == 404
    # Asked once per upstream (the file, then its sidecars), then answered from the negative cache.
    asked = h.upstream.total()
    assert h.upstream.count(f"/first/{missing}") == 1 and h.upstream.count(f"/second/{missing}") == 1
    h.clock.advance(h.config.remotes["central"].cache.negative_ttl + 1)
    publish(h, missing, b"<project>late</project>", where="/second")
    resp = await get(h, missing)
    assert resp.status == 200 and resp.body == b"<project>late</project>" and h.upstream.total() > asked


@pytest_twisted.ensureDeferred
async def test_metadata_is_mutable_and_revalidated_and_served_stale(h: Harness) -> None:
    meta = f"{G}/maven-metadata.xml"
    h.upstream.add(f"/first/{meta}", b"<metadata>1.0</metadata>", content_type="text/xml")
    h.upstream.add(f"/first/{meta}.sha1", b"f" * 40)  # out of step with the body: never used
    assert (await get(h, meta)).body == b"<metadata>1.0</metadata>"
    assert (await get(h, f"{meta}.sha1")).body.decode() == sha1(b"<metadata>1.0</metadata>")
    h.upstream.add(f"/first/{meta}", b"<metadata>1.1</metadata>", content_type="text/xml")
    h.clock.advance(300)
    assert (await get(h, meta)).body == b"<metadata>1.0</metadata>"
    h.clock.advance(301)
    resp = await get(h, meta)
    assert resp.body == b"<metadata>1.1</metadata>"
    assert (await get(h, f"{meta}.sha1")).body.decode() == sha1(b"<metadata>1.1</metadata>")
    assert h.upstream.count(f"/first/{meta}.sha1") == 0
    # Unchanged upstream: a conditional request, 304.
    h.clock.advance(601)
    resp = await get(h, meta)
    assert resp.header("X-Cache") == "REVALIDATED"
    h.upstream.behave(f"/first/{meta}", status=503)
    h.upstream.behave(f"/second/{meta}", status=503)
    h.clock.advance(601)
    resp = await get(h, meta)
    assert resp.status == 200 and resp.header("X-Cache") == "STALE" and resp.body == b"<metadata>1.1</metadata>"
    assert form(h, "metadata", "stale") == 1


@pytest_twisted.ensureDeferred
async def test_snapshots_plain_ones_change_timestamped_ones_do_not(h: Harness) -> None:
    plain = f"{G}/1.0-SNAPSHOT/lib-1.0-SNAPSHOT.jar"
    stamped = f"{G}/1.0-SNAPSHOT/lib-1.0-20240101.120000-1.jar"
    publish(h, plain, b"build 1")
    publish(h, stamped, b"stamped")
    assert (await get(h, plain)).body == b"build 1"
    assert (await get(h, stamped)).body == b"stamped"
    assert h.upstream.count(f"/first/{plain}.sha1") == 0  # mutable: not verified, sums computed
    publish(h, plain, b"build 2")
    h.clock.advance(601)
    assert (await get(h, plain)).body == b"build 2"
    assert (await get(h, f"{plain}.sha1")).body.decode() == sha1(b"build 2")
    h.clock.advance(10 * 86400)
    assert (await get(h, stamped)).header("X-Cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_head_works_everywhere(h: Harness) -> None:
    module = f"{G}/1.0/lib-1.0.module"
    publish(h, module, b'{"formatVersion": "1.1"}')
    resp = await get(h, module, "HEAD")
    assert resp.status == 200 and resp.body == b""
    resp = await get(h, module, "HEAD")
    assert resp.status == 200 and resp.header("Content-Length") == "24" and resp.header("X-Cache") == "HIT"
    assert (await get(h, module)).body == b'{"formatVersion": "1.1"}'
    assert (await get(h, f"{G}/1.0/nothing.pom", "HEAD")).status == 404


@pytest_twisted.ensureDeferred
async def test_an_html_page_is_never_stored_as_an_artifact(h: Harness) -> None:
    h.upstream.add(f"/first/{JAR}", b"<html>log in</html>", content_type="text/html; charset=utf-8")
    h.upstream.add(f"/second/{JAR}", b"<html>log in</html>", content_type="text/html")
    resp = await get(h, JAR)
    assert resp.status == 502 and resp.json()["error"].startswith("upstream sent text/html")
    assert await h.store.index.get(f"central:{JAR}") is None
    h.upstream.add(f"/first/{G}/", b"<html><a href='1.0/'>1.0/</a></html>", content_type="text/html")
    resp = await get(h, f"{G}/")
    assert resp.status == 200 and b"1.0/" in resp.body  # a directory listing is HTML


@pytest.mark.parametrize("path, status", [
    ("/maven/central/org/%2e%2e/%2e%2e/etc/passwd", 400),
    ("/maven/central/org/../x.jar", 400),
    ("/maven/central/org/x%0a.jar", 400),
    ("/maven/central/org/x%00.jar", 400),
    ("/maven/central/org%2fx/y.jar", 400),
    ("/maven/central/org/%20x/y.jar", 400),
    ("/maven/central/", 404),
    ("/maven/nope/a/b.jar", 404),
    ("/maven/files/a/b.jar", 404),
])
@pytest_twisted.ensureDeferred
async def test_bad_input_is_a_json_4xx_and_nothing_is_asked_or_stored(h: Harness, path: str, status: int) -> None:
    resp = await h.get(path)
    assert resp.status == status and resp.header("Content-Type") == "application/json", resp.describe()
    assert resp.json()["status"] == status
    assert h.upstream.total() == 0
    assert await h.store.list("central") == []


@pytest_twisted.ensureDeferred
async def test_only_reads_are_allowed(h: Harness) -> None:
    resp = await h.put(f"/maven/central/{JAR}", b"x")
    assert resp.status == 405 and resp.header("Allow") == "GET, HEAD" and resp.json()["status"] == 405
    assert h.upstream.total() == 0


@pytest_twisted.ensureDeferred
async def test_setup_snippets(h: Harness) -> None:
    resp = await h.get("/setup/maven")
    assert resp.status == 200 and resp.header("X-Install-Path") == "~/.m2/settings.xml"
    text = resp.body.decode()
    assert "<url>http://cache.test/maven/central/</url>" in text and "<mirrorOf>*</mirrorOf>" in text
    resp = await h.get("/setup/maven?mirrorOf=central")
    assert "<mirrorOf>central</mirrorOf>" in resp.body.decode()
    assert (await h.get("/setup/maven?mirrorOf=%3Cx%3E")).status == 400
    assert (await h.get("/setup/maven?remote=files")).status == 404
    resp = await h.get("/setup/gradle")
    text = resp.body.decode()
    assert resp.status == 200 and "def sparkcacheUrl = 'http://cache.test/maven/central/'" in text
    assert "allowInsecureProtocol" in text


@pytest_twisted.ensureDeferred
async def test_a_sidecar_asked_for_while_its_file_streams_answers_for_those_bytes(h: Harness) -> None:
    plain = f"{G}/1.0-SNAPSHOT/lib-1.0-SNAPSHOT.jar"
    publish(h, plain, b"build 1" * 1000)
    h.upstream.add(f"/first/{plain}.sha1", b"0" * 40)  # stale upstream sidecar: never served
    h.upstream.behave(f"/first/{plain}", pause_at=100)
    file = h.get(f"/maven/central/{plain}")
    await h.upstream.until_paused(f"/first/{plain}")
    sidecar = h.get(f"/maven/central/{plain}.sha1")
    h.upstream.resume(f"/first/{plain}")
    assert (await file).body == b"build 1" * 1000
    assert (await sidecar).body.decode() == sha1(b"build 1" * 1000)
    assert h.upstream.count(f"/first/{plain}") == 1 and h.upstream.count(f"/first/{plain}.sha1") == 0


@pytest_twisted.ensureDeferred
async def test_an_expired_release_is_served_stale_when_upstream_is_down(harness_factory: MakeHarness) -> None:
    h = await harness_factory({"remotes": {"central": {"type": "maven", "upstream": FIRST,
                                                       "cache": {"immutable_ttl": 3600}}}})
    publish(h, JAR, b"a release")
    assert (await get(h, JAR)).body == b"a release"
    h.clock.advance(3601)
    for p in (f"/first/{JAR}", f"/first/{JAR}.sha1", f"/first/{JAR}.sha256"):
        h.upstream.behave(p, status=503)
    resp = await get(h, JAR)
    assert resp.status == 200 and resp.header("X-Cache") == "STALE" and resp.body == b"a release"


@pytest_twisted.ensureDeferred
async def test_an_html_page_for_a_sidecar_does_not_block_its_file(h: Harness) -> None:
    publish(h, JAR, b"the jar", sidecar=False)
    for where in ("/first", "/second"):
        h.upstream.add(f"{where}/{JAR}.sha1", b"<html>oops</html>", content_type="text/html")
    resp = await get(h, JAR)
    assert resp.status == 200 and resp.body == b"the jar"
    assert (await get(h, f"{JAR}.sha1")).body.decode() == sha1(b"the jar")


@pytest_twisted.ensureDeferred
async def test_mutable_patterns_make_a_release_path_change_in_place(harness_factory: MakeHarness) -> None:
    h = await harness_factory({"remotes": {"central": {"type": "maven", "upstream": FIRST,
                                                       "mutable_patterns": ["/nightly/"]}}})
    path = "org/example/nightly/1.0/nightly-1.0.jar"
    publish(h, path, b"night 1")
    assert (await get(h, path)).body == b"night 1"
    assert h.upstream.count(f"/first/{path}.sha1") == 0  # not checked against a sidecar that may change too
    publish(h, path, b"night 2")
    h.clock.advance(601)
    assert (await get(h, path)).body == b"night 2"
    assert (await get(h, f"{path}.sha1")).body.decode() == sha1(b"night 2")
