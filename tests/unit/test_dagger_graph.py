"""The dagger cache graph (sparkcache.protocols.dagger.graph) on its own:
merging reports, bounds, what is wanted, the BuildKit config's shape with
shared layers and several inputs, and the stored form."""

from __future__ import annotations

import json

import pytest

from sparkcache.protocols.dagger.graph import Graph, GraphError, record_digest
from tests.support.dagger_client import Blob, root_key, sha256


def key(kid: str, *results: str) -> dict[str, object]:
    return {"ID": kid, "Results": [{"ID": r, "CreatedAt": "2025-01-01T00:00:00Z"} for r in results]}


def test_a_merge_with_two_inputs_and_a_shared_base_layer() -> None:
    g = Graph()
    a, b = root_key(sha256(b"a")), root_key(sha256(b"b"))
    op = sha256(b"merge")
    named = g.update_records({"CacheKeys": [key(a, "ra"), key(b, "rb"), key("m", "rm")], "Links": [
        {"ID": "m", "LinkedID": a, "Input": 0, "Digest": op, "Selector": ""},
        {"ID": "m", "LinkedID": b, "Input": 1, "Digest": op, "Selector": "sha256:" + "1" * 64}]})
    assert named == [(record_digest(a, "ra"), "ra"), (record_digest(b, "rb"), "rb"), (record_digest("m", "rm"), "rm")]
    base, top = Blob(b"base"), Blob(b"top")
    assert g.update_layers({"UpdatedRecords": [
        {"RecordDigest": record_digest(a, "ra"), "Layers": [base.descriptor()]},
        {"RecordDigest": record_digest("m", "rm"), "Layers": [base.descriptor(), top.descriptor()]}]}) == 2
    cfg = g.cache_config(lambda d: True)
    # The base layer is listed once and shared by both chains.
    assert [(x["blob"], x["parent"]) for x in cfg["layers"]] == [(base.digest, -1), (top.digest, 0)]
    recs = {r["digest"]: r for r in cfg["records"]}
    index = {r["digest"]: i for i, r in enumerate(cfg["records"])}
    assert recs[op]["inputs"] == [[{"link": index[a]}], [{"link": index[b], "selector": "sha256:" + "1" * 64}]]
    assert [x["layer"] for x in recs[op]["layers"]] == [1] and [x["layer"] for x in recs[a]["layers"]] == [0]
    assert "layers" not in recs[b]  # no layers for rb: an input only
    assert g.wanted(named, lambda d: True) == [{"Digest": record_digest(b, "rb"), "CacheRefID": "rb"}]
    assert len(g.wanted(named, lambda d: d != top.digest)) == 2


def test_bounds_forget_the_least_recently_reported_with_their_links_and_layers() -> None:
    g = Graph(max_keys=2, max_links=1)
    g.update_records({"CacheKeys": [key("k1", "r1"), key("k2", "r2")],
                      "Links": [{"ID": "k2", "LinkedID": "k1", "Input": 0, "Digest": sha256(b"op")}]})
    g.update_layers({"UpdatedRecords": [{"RecordDigest": record_digest("k1", "r1"), "Layers": [Blob(b"x").descriptor()]}]})
    g.update_records({"CacheKeys": [key("k3", "r3")]})
    assert list(g.keys) == ["k2", "k3"] and not g.links and not g.layers
    assert record_digest("k1", "r1") not in g.records


def test_dirty_only_on_news_and_the_stored_form_round_trips() -> None:
    g = Graph()
    body = {"CacheKeys": [key("k0"), key("k1", "r1")], "Links": [{"ID": "k1", "LinkedID": "k0", "Input": 0,
                                                          "Digest": sha256(b"op")}]}
    g.update_records(body)
    assert g.dirty
    g.dirty = False
    g.update_records(json.loads(json.dumps(body)))
    assert not g.dirty
    g.update_layers({"UpdatedRecords": [{"RecordDigest": record_digest("k1", "r1"), "Layers": [Blob(b"x").descriptor()]}]})
    h = Graph()
    h.load_json(json.loads(json.dumps(g.to_json())))
    assert h.to_json() == g.to_json() and h.records == g.records
    with pytest.raises(GraphError):
        h.load_json({"v": 2})


@pytest.mark.parametrize("body", [
    [], {"CacheKeys": {}}, {"CacheKeys": [{"ID": ""}]}, {"CacheKeys": [{"ID": "x" * 300}]},
    {"CacheKeys": [{"ID": "k", "Results": [{"ID": "r", "Description": 5}]}]},
    {"Links": [{"ID": "a", "LinkedID": "b", "Input": True, "Digest": sha256(b"")}]},
])
def test_malformed_reports_change_nothing(body: object) -> None:
    g = Graph()
    g.update_records({"CacheKeys": [key("k", "r")]})
    before = g.to_json()
    with pytest.raises(GraphError):
        g.update_records(body)
    assert g.to_json() == before
