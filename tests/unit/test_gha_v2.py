"""The gha protocol's v2 (Twirp) side on the in-memory daemon: every call in
JSON and protobuf, Azure-style uploads (one BlockBlob PUT, or blocks and a
block list), restore keys as prefixes, immutability, signed URLs, limits,
auth and a store that cannot take an entry."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import pytest_twisted

from tests.support.gha_calls import path_of, restore_v2, save_v2, twirp
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401

WRITER, READER = "w-token", "r-token"
V = "0123abcd" * 8
CONFIG = {
    "auth": {"anonymous_read": False, "tokens": [{"name": "w", "token": WRITER, "scopes": ["write"]},
                                                  {"name": "r", "token": READER, "scopes": ["read"]}]},
    "remotes": {"ci": {"type": "gha", "max_entry_size": 1000}},
}
ENCODINGS = ["json", "protobuf"]


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest_twisted.ensureDeferred
async def test_save_then_restore_exactly_and_by_prefix(h: Harness, encoding: str) -> None:
    assert await restore_v2(h, "deps-a", V, WRITER, encoding=encoding) == (None, None)
    done = await save_v2(h, "deps-a", V, b"archive A", WRITER, encoding)
    assert done["ok"] and int(done["entry_id"]) > 0
    h.clock.advance(10)
    await save_v2(h, "deps-b", V, b"archive B", WRITER, encoding)
    assert await restore_v2(h, "deps-a", V, READER, encoding=encoding) == ("deps-a", b"archive A")
    # Not the key, then the restore keys: exact first, else the newest entry they begin.
    assert await restore_v2(h, "deps-z", V, READER, ["nope", "deps-"], encoding) == ("deps-b", b"archive B")
    assert await restore_v2(h, "deps-z", V, READER, ["deps-a", "deps-"], encoding) == ("deps-a", b"archive A")
    # The key itself is never a prefix; another version is another cache.
    assert await restore_v2(h, "deps-", V, READER, encoding=encoding) == (None, None)
    assert await restore_v2(h, "deps-a", "other", READER, ["deps-"], encoding) == (None, None)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest_twisted.ensureDeferred
async def test_entries_are_immutable(h: Harness, encoding: str) -> None:
    await save_v2(h, "k", V, b"first", WRITER, encoding)
    status, again = await twirp(h, "CreateCacheEntry", {"key": "k", "version": V}, WRITER, encoding)
    assert status == 200 and not again.get("ok") and "exists" in again.get("message", "")
    assert (await restore_v2(h, "k", V, READER, encoding=encoding))[1] == b"first"
    # Two jobs racing for one key: the second is told to back off.
    _, first = await twirp(h, "CreateCacheEntry", {"key": "k2", "version": V}, WRITER, encoding)
    _, second = await twirp(h, "CreateCacheEntry", {"key": "k2", "version": V}, WRITER, encoding)
    assert first["ok"] and not second.get("ok")


@pytest_twisted.ensureDeferred
async def test_block_uploads_are_assembled_in_list_order(h: Harness) -> None:
    _, created = await twirp(h, "CreateCacheEntry", {"key": "big", "version": V}, WRITER)
    url = path_of(created["signed_upload_url"])
    # Blocks arrive in any order (and a retried one replaces its first try).
    assert (await h.put(url + "&comp=block&blockid=YjI%3D", b"second-")).status == 201
    assert (await h.put(url + "&comp=block&blockid=YjE%3D", b"garbage")).status == 201
    assert (await h.put(url + "&comp=block&blockid=YjE%3D", b"first-")).status == 201
    unknown = b"<?xml version='1.0' encoding='utf-8'?><BlockList><Latest>eDk=</Latest></BlockList>"
    assert (await h.put(url + "&comp=blocklist", unknown)).status == 400
    listing = b"<?xml version='1.0' encoding='utf-8'?><BlockList><Latest>YjE=</Latest><Latest>YjI=</Latest></BlockList>"
    assert (await h.put(url + "&comp=blocklist", listing)).status == 201
    # Nothing is visible before the finalize.
    assert await restore_v2(h, "big", V, READER) == (None, None)
    _, done = await twirp(h, "FinalizeCacheEntryUpload", {"key": "big", "version": V, "size_bytes": 13}, WRITER)
    assert done["ok"], done
    assert await restore_v2(h, "big", V, READER) == ("big", b"first-second-")
    assert not h.store._spools  # every part was released


@pytest_twisted.ensureDeferred
async def test_a_finalize_with_the_wrong_size_or_no_body_keeps_nothing(h: Harness) -> None:
    _, created = await twirp(h, "CreateCacheEntry", {"key": "k", "version": V}, WRITER)
    await h.put(path_of(created["signed_upload_url"]), b"12345", {"x-ms-blob-type": "BlockBlob"})
    _, done = await twirp(h, "FinalizeCacheEntryUpload", {"key": "k", "version": V, "size_bytes": "6"}, WRITER)
    assert not done.get("ok") and "5 bytes" in done["message"]
    assert await restore_v2(h, "k", V, READER) == (None, None)
    _, created = await twirp(h, "CreateCacheEntry", {"key": "k", "version": V}, WRITER)
    _, done = await twirp(h, "FinalizeCacheEntryUpload", {"key": "k", "version": V, "size_bytes": 0}, WRITER)
    assert not done.get("ok")
    # Once finalized or dropped, its upload URL is dead.
    assert (await h.put(path_of(created["signed_upload_url"]), b"late")).status == 404


@pytest_twisted.ensureDeferred
async def test_signed_urls_refuse_tampering_and_expire(h: Harness) -> None:
    await save_v2(h, "k", V, b"body", WRITER)
    _, got = await twirp(h, "GetCacheEntryDownloadURL", {"key": "k", "version": V}, READER)
    url = path_of(got["signed_download_url"])
    assert (await h.get(url)).status == 200
    path, _, query = url.partition("?")
    forged = path[:-2] + ("AA" if not path.endswith("AA") else "BB") + "?" + query
    assert (await h.get(forged)).status == 403
    assert (await h.get(url.replace("sig=", "sig=x"))).status == 403
    exp = int(query.split("exp=")[1].split("&")[0])
    assert (await h.get(url.replace(f"exp={exp}", f"exp={exp + 3600}"))).status == 403
    assert (await h.get(path)).status == 403
    h.clock.advance(3601)  # url_ttl: 1h
    expired = await h.get(url)
    assert expired.status == 403 and "expired" in expired.json()["message"]

    _, created = await twirp(h, "CreateCacheEntry", {"key": "k2", "version": V}, WRITER)
    up = path_of(created["signed_upload_url"])
    other = up.split("/upload/")[0] + "/upload/" + "0" * 32 + "?" + up.split("?")[1]
    assert (await h.put(other, b"x")).status == 403
    h.clock.advance(6 * 3600 + 1)  # upload_ttl: 6h
    assert (await h.put(up, b"x")).status == 403


@pytest_twisted.ensureDeferred
async def test_too_large_is_refused_before_the_body(h: Harness) -> None:
    _, created = await twirp(h, "CreateCacheEntry", {"key": "k", "version": V}, WRITER)
    url = path_of(created["signed_upload_url"])
    assert (await h.put(url, b"x" * 1001, {"x-ms-blob-type": "BlockBlob"})).status == 413
    _, created = await twirp(h, "CreateCacheEntry", {"key": "k3", "version": V}, WRITER)
    url = path_of(created["signed_upload_url"])
    assert (await h.put(url + "&comp=block&blockid=MQ%3D%3D", b"x" * 600)).status == 201
    # The blocks of one upload together are held to the same limit.
    assert (await h.put(url + "&comp=block&blockid=Mg%3D%3D", b"x" * 600)).status == 413
    assert await restore_v2(h, "k3", V, READER) == (None, None)


@pytest_twisted.ensureDeferred
async def test_auth_and_twirp_errors(h: Harness) -> None:
    status, err = await twirp(h, "CreateCacheEntry", {"key": "k", "version": V}, None)
    assert status == 401 and err["code"] == "unauthenticated"
    status, err = await twirp(h, "CreateCacheEntry", {"key": "k", "version": V}, READER)
    assert status == 403 and err["code"] == "permission_denied"
    status, err = await twirp(h, "GetCacheEntryDownloadURL", {"key": "k", "version": V}, "wrong")
    assert status == 401
    status, err = await twirp(h, "GetCacheEntryDownloadURL", {"key": "a,b", "version": V}, READER)
    assert status == 400 and err["code"] == "malformed"
    resp = await h.post("/twirp/github.actions.results.api.v1.CacheService/CreateCacheEntry", b"{not json",
                        {"Authorization": f"Bearer {WRITER}", "Content-Type": "application/json"})
    assert resp.status == 400 and resp.json()["code"] == "malformed"
    resp = await h.post("/twirp/github.actions.results.api.v1.CacheService/CreateCacheEntry", b"\x12\x05ab",
                        {"Authorization": f"Bearer {WRITER}", "Content-Type": "application/protobuf"})
    assert resp.status == 400 and "truncated" in resp.json()["msg"]
    resp = await h.post("/twirp/github.actions.results.api.v1.CacheService/DeleteCacheEntry", b"{}",
                        {"Authorization": f"Bearer {WRITER}"})
    assert resp.status == 404 and resp.json()["code"] == "not_found"
    assert (await h.get("/twirp/github.actions.results.api.v1.CacheService/CreateCacheEntry")).status == 405


@pytest_twisted.ensureDeferred
async def test_root_twirp_goes_to_the_default_remote(harness_factory: MakeHarness) -> None:
    config: dict[str, Any] = {**CONFIG, "remotes": {"a": {"type": "gha"}, "b": {"type": "gha", "default": True}}}
    h = await harness_factory(config)
    await save_v2(h, "k", V, b"in b", WRITER)
    assert await restore_v2(h, "k", V, READER, prefix="/gha/b") == ("k", b"in b")
    assert await restore_v2(h, "k", V, READER, prefix="/gha/a") == (None, None)
    h2 = await harness_factory({**CONFIG, "remotes": {"a": {"type": "gha"}, "b": {"type": "gha"}}})
    status, err = await twirp(h2, "GetCacheEntryDownloadURL", {"key": "k", "version": V}, READER)
    assert status == 404 and "default" in err["msg"]


@pytest_twisted.ensureDeferred
async def test_a_store_that_cannot_take_the_entry_fails_the_save_cleanly(h: Harness,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async def full(spool: Any, entry: Any) -> Any:
        h.store.discard(spool)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h.store, "commit", full)
    _, created = await twirp(h, "CreateCacheEntry", {"key": "k", "version": V}, WRITER)
    assert (await h.put(path_of(created["signed_upload_url"]), b"body")).status == 201
    _, done = await twirp(h, "FinalizeCacheEntryUpload", {"key": "k", "version": V, "size_bytes": "4"}, WRITER)
    assert not done.get("ok") and "not stored" in done["message"]
    assert await restore_v2(h, "k", V, READER, ["k"]) == (None, None)
    assert not h.store._spools
