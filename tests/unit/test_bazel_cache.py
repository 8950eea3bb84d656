"""The Bazel HTTP cache (``type: bazel``) on the in-memory daemon: routes,
CAS digest checks, 411, instance prefixes, auth, and the AC reference check
(an AC entry whose outputs are gone is a miss)."""

from __future__ import annotations

import base64
import errno
import hashlib
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import succeed
from twisted.web.client import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from sparkcache.protocols.bazel.proto import (Digest, NotAMessage, action_result_references, encode_action_result,
                                              encode_tree, tree_files)
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.memory import read_body

WRITER = "bazel-writer"
READER = "bazel-reader"
CONFIG = {
    "auth": {"tokens": [{"name": "w", "token": WRITER, "scopes": ["read", "write"]},
                        {"name": "r", "token": READER, "scopes": ["read"]}],
             "anonymous_read": False},
    "remotes": {"bz": {"type": "bazel", "max_entry_size": 4096, "quota": 20000}},
}
W = {"Authorization": f"Bearer {WRITER}"}
R = {"Authorization": f"Bearer {READER}"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(data: bytes) -> Digest:
    return Digest(sha(data), len(data))


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


async def put_action(h: Harness, outputs: dict[str, bytes], base: str = "/bazel/bz",
                     stdout: bytes | None = None) -> tuple[str, bytes]:
    """Upload outputs to the CAS and then their ActionResult (Bazel's order); the action key and AC body."""
    for body in [*outputs.values(), *([stdout] if stdout else [])]:
        assert (await h.put(f"{base}/cas/{sha(body)}", body, W)).status in (200, 201)
    ac = encode_action_result({p: digest(b) for p, b in outputs.items()}, digest(stdout) if stdout else None)
    key = sha(b"action:" + ac)
    assert (await h.put(f"{base}/ac/{key}", ac, W)).status == 201
    return key, ac


def test_proto_reader_reads_what_it_wrote_and_refuses_garbage() -> None:
    a, b, out, tree = digest(b"a"), digest(b"bb"), digest(b"out"), digest(b"tree")
    ac = encode_action_result({"x/a": a, "x/b": b}, stdout=out, trees={"dir": tree}, exit_code=1)
    refs = action_result_references(ac)
    assert refs.blobs == (a, b, out) and refs.trees == (tree,)
    assert tree_files(encode_tree({"f": a, "g": b, "empty": digest(b"")})) == [a, b]
    # The empty blob is never a reference (Bazel neither uploads nor downloads it).
    assert action_result_references(encode_action_result({"e": digest(b"")})).blobs == ()
    for bad in (b"\x12\x05ab", b"\x0b", b"\x12\x03\x12\x01z", b"cCrS\x00\x01"):
        with pytest.raises(NotAMessage):
            action_result_references(bad)


@pytest_twisted.ensureDeferred
async def test_cas_put_get_head_and_idempotent(h: Harness) -> None:
    body = b"an output\n"
    key = sha(body)
    assert (await h.get(f"/bazel/bz/cas/{key}", R)).status == 404
    assert (await h.put(f"/bazel/bz/cas/{key}", body, W)).status == 201
    # A second upload of the same key is idempotent.
    assert (await h.put(f"/bazel/bz/cas/{key}", body, W)).status == 200
    got = await h.get(f"/bazel/bz/cas/{key}", R)
    assert got.status == 200 and got.body == body and got.header("Content-Type") == "application/octet-stream"
    head = await h.head(f"/bazel/bz/cas/{key}", R)
    assert head.status == 200 and head.header("Content-Length") == str(len(body)) and head.body == b""
    assert h.metrics.render().count(b'bz') > 0


@pytest_twisted.ensureDeferred
async def test_cas_upload_not_hashing_to_its_key_is_refused_and_not_kept(h: Harness) -> None:
    wrong = sha(b"something else")
    resp = await h.put(f"/bazel/bz/cas/{wrong}", b"the body", W)
    assert resp.status == 400 and resp.json()["status"] == 400
    assert (await h.get(f"/bazel/bz/cas/{wrong}", R)).status == 404
    assert (await h.get(f"/bazel/bz/cas/{sha(b'the body')}", R)).status == 404


@pytest_twisted.ensureDeferred
async def test_bad_paths_and_methods_answer_json(h: Harness) -> None:
    k = sha(b"k")
    cases = {
        f"/bazel/nope/ac/{k}": 404, "/bazel/bz/ac/": 404, f"/bazel/bz/xx/{k}": 404,
        "/bazel/bz/ac/ABCDEF": 400, f"/bazel/bz/ac/{k.upper()}": 400, f"/bazel/bz/pre%20fix/ac/{k}": 400,
    }
    for path, status in cases.items():
        resp = await h.get(path, R)
        assert resp.status == status, path
        assert resp.json()["status"] == status
    resp = await h.delete(f"/bazel/bz/cas/{k}", W)
    assert resp.status == 405 and resp.header("Allow") == "GET, HEAD, PUT"


@pytest_twisted.ensureDeferred
async def test_auth_reads_need_read_and_uploads_need_write(h: Harness) -> None:
    body = b"x"
    key = sha(body)
    assert (await h.put(f"/bazel/bz/cas/{key}", body)).status == 401
    assert (await h.put(f"/bazel/bz/cas/{key}", body, R)).status == 403
    assert (await h.get(f"/bazel/bz/cas/{key}", R)).status == 404  # nothing was kept
    assert (await h.put(f"/bazel/bz/cas/{key}", body, W)).status == 201
    assert (await h.get(f"/bazel/bz/cas/{key}")).status == 401  # no anonymous reads in this config
    # Basic with the token as the password, as Bazel sends for http://user:token@host/...
    basic = {"Authorization": "Basic " + base64.b64encode(f"bazel:{READER}".encode()).decode()}
    assert (await h.get(f"/bazel/bz/cas/{key}", basic)).status == 200


@pytest_twisted.ensureDeferred
async def test_put_without_content_length_is_411(h: Harness) -> None:
    class Chunked:
        length = UNKNOWN_LENGTH

        def startProducing(self, consumer: Any) -> Any:
            consumer.write(b"abc")
            return succeed(None)

        def pauseProducing(self) -> None: ...
        def resumeProducing(self) -> None: ...
        def stopProducing(self) -> None: ...

    key = sha(b"abc")
    headers = Headers({b"Authorization": [f"Bearer {WRITER}".encode()]})
    resp = await h.client.agent.request(b"PUT", f"{h.base_url}/bazel/bz/cas/{key}".encode(), headers, Chunked())
    assert resp.code == 411
    assert b"Content-Length" in await read_body(resp)
    assert (await h.get(f"/bazel/bz/cas/{key}", R)).status == 404


@pytest_twisted.ensureDeferred
async def test_ac_hit_and_overwrite(h: Harness) -> None:
    key, ac = await put_action(h, {"out/a": b"A" * 10}, stdout=b"built\n")
    got = await h.get(f"/bazel/bz/ac/{key}", R)
    assert got.status == 200 and got.body == ac
    # A re-run action's result replaces the old one.
    ac2 = encode_action_result({"out/a": digest(b"A" * 10)}, exit_code=0)
    assert (await h.put(f"/bazel/bz/ac/{key}", ac2, W)).status == 201
    assert (await h.get(f"/bazel/bz/ac/{key}", R)).body == ac2


@pytest_twisted.ensureDeferred
async def test_ac_entry_whose_output_was_purged_is_a_miss_and_goes(h: Harness) -> None:
    out = b"output bytes"
    key, _ = await put_action(h, {"out/a": out, "out/b": b"other"})
    assert (await h.get(f"/bazel/bz/ac/{key}", R)).status == 200
    assert await h.store.purge_key(f"bz:cas/{sha(out)}") == 1
    resp = await h.get(f"/bazel/bz/ac/{key}", R)
    assert resp.status == 404 and "gone" in resp.json()["error"]
    assert (await h.head(f"/bazel/bz/ac/{key}", R)).status == 404
    # The dangling entry itself is gone: re-uploading the output alone brings no hit back.
    assert (await h.put(f"/bazel/bz/cas/{sha(out)}", out, W)).status == 201
    assert (await h.get(f"/bazel/bz/ac/{key}", R)).status == 404
    assert b"dangling" in h.metrics.render()


@pytest_twisted.ensureDeferred
async def test_ac_entry_checks_stdout_and_tree_files(h: Harness) -> None:
    # stdout blob gone → miss
    key, _ = await put_action(h, {"o": b"o1"}, stdout=b"the log")
    await h.store.purge_key(f"bz:cas/{sha(b'the log')}")
    assert (await h.get(f"/bazel/bz/ac/{key}", R)).status == 404
    # an output directory: its Tree and the Tree's files must all be there
    f1, f2 = b"file one", b"file two"
    tree = encode_tree({"f1": digest(f1), "f2": digest(f2)})
    for body in (f1, f2, tree):
        assert (await h.put(f"/bazel/bz/cas/{sha(body)}", body, W)).status == 201
    ac = encode_action_result({}, trees={"outdir": digest(tree)})
    akey = sha(b"tree action")
    assert (await h.put(f"/bazel/bz/ac/{akey}", ac, W)).status == 201
    assert (await h.get(f"/bazel/bz/ac/{akey}", R)).status == 200
    await h.store.purge_key(f"bz:cas/{sha(f2)}")
    assert (await h.get(f"/bazel/bz/ac/{akey}", R)).status == 404


@pytest_twisted.ensureDeferred
async def test_quota_eviction_keeps_an_action_with_its_outputs(h: Harness) -> None:
    # The quota is 20000 bytes; an action and its 3000-byte output are read
    # (and so touched) together, while unrelated blobs age and are evicted.
    out = b"o" * 3000
    key, _ = await put_action(h, {"out": out})
    for i in range(8):
        h.clock.advance(10)
        assert (await h.get(f"/bazel/bz/ac/{key}", R)).status == 200
        filler = bytes([i]) * 3000
        assert (await h.put(f"/bazel/bz/cas/{sha(filler)}", filler, W)).status == 201
        await h.store.evict_remote("bz", 20000)
    assert (await h.get(f"/bazel/bz/ac/{key}", R)).status == 200
    assert (await h.get(f"/bazel/bz/cas/{sha(out)}", R)).status == 200
    assert (await h.get(f"/bazel/bz/cas/{sha(bytes([0]) * 3000)}", R)).status == 404


@pytest_twisted.ensureDeferred
async def test_instance_prefix_namespaces_the_ac_and_shares_the_cas(h: Harness) -> None:
    key, ac = await put_action(h, {"o": b"prefixed output"}, base="/bazel/bz/ci/linux-x86")
    assert (await h.get(f"/bazel/bz/ci/linux-x86/ac/{key}", R)).body == ac
    assert (await h.get(f"/bazel/bz/ac/{key}", R)).status == 404
    assert (await h.get(f"/bazel/bz/other/ac/{key}", R)).status == 404
    assert (await h.get(f"/bazel/bz/cas/{sha(b'prefixed output')}", R)).status == 200
    assert (await h.get(f"/bazel/bz/other/cas/{sha(b'prefixed output')}", R)).status == 200


@pytest_twisted.ensureDeferred
async def test_too_large_is_413_and_a_full_store_is_507_then_a_miss(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    big = b"b" * 5000
    assert (await h.put(f"/bazel/bz/cas/{sha(big)}", big, W)).status == 413
    assert b'form="upload",remote="bz",result="rejected"} 1.0' in h.metrics.render()
    assert (await h.get(f"/bazel/bz/cas/{sha(big)}", R)).status == 404

    async def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h.cache, "adopt", full)
    body = b"does not fit"
    resp = await h.put(f"/bazel/bz/cas/{sha(body)}", body, W)
    assert resp.status == 507 and resp.json()["status"] == 507
    assert (await h.get(f"/bazel/bz/cas/{sha(body)}", R)).status == 404


@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_an_action_result_is_served_as_is(h: Harness) -> None:
    body = b"cCrS\x00\x01 not a protobuf"
    key = sha(b"k")
    assert (await h.put(f"/bazel/bz/ac/{key}", body, W)).status == 201
    assert (await h.get(f"/bazel/bz/ac/{key}", R)).body == body


@pytest_twisted.ensureDeferred
async def test_setup_bazel_prints_a_bazelrc(h: Harness) -> None:
    resp = await h.get("/setup/bazel?prefix=ci/linux", R)
    assert resp.status == 200
    text = resp.body.decode()
    assert "build --remote_cache=http://cache.test/bazel/bz/ci/linux\n" in text
    assert "--remote_upload_local_results" in text and "Authorization=Bearer" in text
    assert WRITER not in text and READER not in text
    assert (await h.get("/setup/bazel?remote=nope", R)).status == 404
    assert (await h.get("/setup/bazel?prefix=a/../b", R)).status == 400
