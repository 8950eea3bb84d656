"""The dagger engine cache service against a real daemon, driven by a client
making exactly the requests a dagger engine up to v0.18.14 makes, in its
order (tests/support/dagger_client.py cites the dagger source it replays:
dagger/dagger v0.18.14, commit 5175b4adf3cc762e6f019dc4746e774d15a6cefb,
engine/cache/cachemanager/). No dagger binary exists on this machine (an
engine also needs a privileged container runtime), so no real engine runs here.
"""

from __future__ import annotations

import pytest

from tests.support.dagger_client import Blob, Engine, EngineError, two_step_graph

WRITER, READER = "dagger-writer-token", "dagger-reader-token"
AUTH = {"tokens": [{"name": "w", "token": WRITER, "scopes": ["read", "write"]},
                   {"name": "r", "token": READER, "scopes": ["read"]}]}


def test_export_import_and_cache_mounts_across_engines_and_a_restart(daemon_factory):
    d = daemon_factory({"engines": {"type": "dagger", "import_period": "2m", "url_ttl": "10m"}}, auth=AUTH)
    first = Engine(d.url("/dagger/engines"), WRITER, "engine-a")

    # Engine start: config, a first (empty) import, cache-mount sync in.
    cfg = first.get_config()
    assert cfg == {"ImportPeriod": 120 * 10**9, "ExportPeriod": 300 * 10**9, "ExportTimeout": 600 * 10**9}
    assert first.import_cache() == {}
    assert first.sync_cache_mounts_in() == {}

    # Export: the service wants both records; three distinct layers... two, the base shared.
    keys, links, refs = two_step_graph("a")
    wanted = first.export(keys, links, refs)
    assert sorted(r["CacheRefID"] for r in wanted) == ["ref-a-1", "ref-a-2"]
    assert first.log == [
        "GET /config", "GET /import", "GET /cacheMountConfig",
        "POST /records",
        "GET /layerUploadURL", "PUT <layer URL>",
        "GET /layerUploadURL", "PUT <layer URL>",
        "POST /layers",
    ]
    # A second export of the same state wants nothing: the layers are stored.
    assert first.export(keys, links, refs) == []

    # Shutdown: the cache mount goes up (exactly 200), a second time it is skipped.
    tarball = b"\x28\xb5\x2f\xfd" + b"go build cache " * 300
    assert first.sync_cache_mount_out("go-build", tarball) is True
    assert first.sync_cache_mount_out("go-build", tarball) is False

    d.restart()

    # A fresh engine (read-only token) imports what the first one exported.
    second = Engine(d.url("/dagger/engines"), READER, "engine-b")
    second.get_config()
    config = second.import_cache()
    base, top = refs["ref-a-2"]
    assert [layer["blob"] for layer in config["layers"]] == [base.digest, top.digest]
    assert config["layers"][0]["parent"] == -1 and config["layers"][1]["parent"] == 0
    assert config["layers"][1]["annotations"]["diffID"] == top.descriptor()["annotations"][
        "containerd.io/uncompressed"]
    by_digest = {rec["digest"]: rec for rec in config["records"]}
    root = by_digest[keys[0]["ID"]]
    assert root["layers"] == [{"layer": 0, "createdAt": "2025-01-02T03:04:05Z"}]
    execd = by_digest[links[0]["Digest"]]
    assert execd["inputs"] == [[{"link": config["records"].index(root)}]]
    assert execd["layers"][0]["layer"] == 1

    # Loading a layer: a download URL, then ranged reads re-opened at an offset.
    for blob in (base, top):
        assert second.read_layer(blob.digest, len(blob.data)) == blob.data
    assert second.sync_cache_mounts_in() == {"go-build": tarball}
    # The read-only engine cannot export.
    with pytest.raises(EngineError) as e:
        second.export(*two_step_graph("b"))
    assert e.value.status == 403
    # Without a token nothing is written (reads are anonymous here, the daemon's default).
    with pytest.raises(EngineError) as e:
        Engine(d.url("/dagger/engines")).export(*two_step_graph("c"))
    assert e.value.status == 401


def test_a_full_store_fails_the_export_cleanly_and_import_reports_nothing(daemon_factory):
    # Entries of at most 600 bytes: every layer of the graph is larger, as in a
    # store too full for the outputs. The engine's export fails at the push (and
    # never reaches /layers); its builds go on with the local cache.
    d = daemon_factory({"small": {"type": "dagger", "max_entry_size": 600}}, auth=AUTH)
    engine = Engine(d.url("/dagger/small"), WRITER)
    engine.get_config()
    keys, links, refs = two_step_graph("full")
    with pytest.raises(EngineError) as e:
        engine.export(keys, links, refs)
    assert e.value.status == 413
    assert engine.log[-2:] == ["GET /layerUploadURL", "PUT <layer URL>"]
    assert engine.import_cache() == {}
    # The records are still wanted on the next export: nothing was kept.
    wanted = engine.call("POST", "/records", {"CacheKeys": keys, "Links": links})["ExportRecords"]
    assert len(wanted) == 2
    # A small layer still goes through.
    small = Blob(b"tiny layer")
    assert engine.push_layer(small) is True and engine.push_layer(small) is False
    with pytest.raises(EngineError) as e:
        engine.sync_cache_mount_out("big", b"x" * 601)
    assert e.value.status == 413
