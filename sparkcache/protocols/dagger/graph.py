"""The cache graph a dagger engine reports, and the BuildKit cache config built from it.

An engine (``engine/cache/cachemanager`` of dagger v0.18.x) sends its whole
key store on every export: cache keys (BuildKit solver key IDs) with their
results (worker cache refs), and the links between keys (key ``ID`` takes key
``LinkedID`` as input ``Input`` of the vertex ``Digest``, through ``Selector``).
The service answers which results it wants layers for, each named by a
*record digest* it chooses (here: sha256 of key ID and result ID), and is
later told the layer descriptors of those records.

``GET /import`` turns that into BuildKit's v1 cache config
(``application/vnd.buildkit.cacheconfig.v0``) the engine feeds to
``remotecache.ParseConfig``: one record per key, its ``digest`` being the
links' vertex digest (or, for a key without inputs, its ID, which BuildKit
derives as ``rootKey(digest, output)`` and imports as the item's digest),
``inputs[i]`` the records linked as input ``i``, and ``layers`` the results
whose layer chains are known (``layers`` entries chained by ``parent``).

The graph is merged across engines (several engines share one cache) and
bounded: past ``max_keys`` keys (or ``max_links`` links) the least recently
reported are dropped with their links and layers. Pure data: no I/O here.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Field sizes we keep: BuildKit IDs and digests are short; a description is a label.
MAX_ID = 256
MAX_DESCRIPTION = 512
MAX_LAYERS_PER_RECORD = 256
DIFF_ID = "containerd.io/uncompressed"
CREATED_AT = "buildkit/createdat"


class GraphError(ValueError):
    """A request body that is not what an engine sends (answered 400)."""


def _str(v: Any, what: str, limit: int = MAX_ID, empty: bool = False) -> str:
    if not isinstance(v, str) or (not v and not empty) or len(v) > limit:
        raise GraphError(f"{what} must be a string of at most {limit} characters")
    return v


def _digest(v: Any, what: str, empty: bool = False) -> str:
    if empty and v in (None, ""):
        return ""
    if not isinstance(v, str) or not DIGEST.match(v):
        raise GraphError(f"{what} must be a sha256:<64 hex> digest")
    return v


def _array(obj: dict[str, Any], name: str) -> Any:
    # Go encodes a nil slice as null: absent or null is empty, anything else is checked by the caller.
    v = obj.get(name)
    return [] if v is None else v


def record_digest(key_id: str, result_id: str) -> str:
    """The record digest the service gives the result ``result_id`` of key ``key_id``."""
    return "sha256:" + hashlib.sha256(f"{key_id}\n{result_id}".encode()).hexdigest()


@dataclass
class Layer:
    """One layer of a record, as the engine's OCI descriptor named it."""

    digest: str
    size: int
    media_type: str
    diff_id: str
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"d": self.digest, "s": self.size, "m": self.media_type, "u": self.diff_id, "c": self.created_at}

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> "Layer":
        return cls(v["d"], int(v["s"]), v["m"], v["u"], v.get("c", ""))

    @classmethod
    def from_descriptor(cls, v: Any) -> "Layer":
        """An OCI descriptor (``mediaType``, ``digest``, ``size``, ``annotations``)."""
        if not isinstance(v, dict):
            raise GraphError("a layer must be an OCI descriptor object")
        size = v.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise GraphError("a layer's size must be a non-negative integer")
        ann = v.get("annotations") or {}
        if not isinstance(ann, dict):
            raise GraphError("a layer's annotations must be an object")
        created = ann.get(CREATED_AT, "")
        return cls(_digest(v.get("digest"), "a layer's digest"), size,
                   _str(v.get("mediaType", ""), "a layer's mediaType", empty=True),
                   _digest(ann.get(DIFF_ID), f"a layer's {DIFF_ID} annotation", empty=True),
                   created if isinstance(created, str) and len(created) <= 64 else "")


@dataclass
class Key:
    # result ID → (createdAt, description), as the engine sent them.
    results: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Graph:
    """Keys, links and record layers, bounded (see the module's doc)."""

    max_keys: int = 20_000
    max_links: int = 40_000
    keys: "OrderedDict[str, Key]" = field(default_factory=OrderedDict)
    # (ID, LinkedID, Input, Digest, Selector) → None, in the order last reported.
    links: "OrderedDict[tuple[str, str, int, str, str], None]" = field(default_factory=OrderedDict)
    # record digest → its layers, base first.
    layers: dict[str, list[Layer]] = field(default_factory=dict)
    # record digest → (key ID, result ID), for every result of every key.
    records: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Something new since the graph was last stored (a mere re-report is nothing new).
    dirty: bool = False

    # -- updates ----------------------------------------------------------------------

    def update_records(self, body: Any) -> list[tuple[str, str]]:
        """Merge a ``POST /records`` body; the (record digest, result ID) of every
        result it names, in its order. Raises GraphError on a malformed body
        (then nothing is merged)."""
        if not isinstance(body, dict):
            raise GraphError("the body must be a JSON object")
        keys, links = _array(body, "CacheKeys"), _array(body, "Links")
        if not isinstance(keys, list) or not isinstance(links, list):
            raise GraphError("CacheKeys and Links must be arrays")
        parsed_keys: list[tuple[str, list[tuple[str, str, str]]]] = []
        for k in keys:
            if not isinstance(k, dict):
                raise GraphError("a cache key must be an object")
            results = _array(k, "Results")
            if not isinstance(results, list):
                raise GraphError("a cache key's Results must be an array")
            rs = []
            for r in results:
                if not isinstance(r, dict):
                    raise GraphError("a result must be an object")
                rs.append((_str(r.get("ID"), "a result's ID"),
                           _str(r.get("CreatedAt", ""), "a result's CreatedAt", 64, empty=True),
                           _str(r.get("Description", ""), "a result's Description", MAX_DESCRIPTION, empty=True)))
            parsed_keys.append((_str(k.get("ID"), "a cache key's ID"), rs))
        parsed_links = []
        for ln in links:
            if not isinstance(ln, dict):
                raise GraphError("a link must be an object")
            inp = ln.get("Input", 0)
            if not isinstance(inp, int) or isinstance(inp, bool) or not 0 <= inp < 1024:
                raise GraphError("a link's Input must be a small non-negative integer")
            parsed_links.append((_str(ln.get("ID"), "a link's ID"), _str(ln.get("LinkedID"), "a link's LinkedID"), inp,
                                 _digest(ln.get("Digest"), "a link's Digest"),
                                 _str(ln.get("Selector") or "", "a link's Selector", empty=True)))
        named: list[tuple[str, str]] = []
        for key_id, rs in parsed_keys:
            key = self.keys.pop(key_id, None)
            if key is None:
                key, self.dirty = Key(), True
            self.keys[key_id] = key  # most recently reported last
            for result_id, created, desc in rs:
                if key.results.get(result_id) != (created, desc):
                    key.results[result_id] = (created, desc)
                    self.dirty = True
                rd = record_digest(key_id, result_id)
                self.records[rd] = (key_id, result_id)
                named.append((rd, result_id))
        for link in parsed_links:
            if self.links.pop(link, 0) is not None:
                self.dirty = True
            self.links[link] = None
        self._bound()
        return named

    def update_layers(self, body: Any) -> int:
        """Merge a ``POST /layers`` body; how many records it gave layers to
        (records the graph no longer has are ignored)."""
        if not isinstance(body, dict):
            raise GraphError("the body must be a JSON object")
        updated = _array(body, "UpdatedRecords")
        if not isinstance(updated, list):
            raise GraphError("UpdatedRecords must be an array")
        parsed = []
        for u in updated:
            if not isinstance(u, dict):
                raise GraphError("an updated record must be an object")
            layers = _array(u, "Layers")
            if not isinstance(layers, list) or len(layers) > MAX_LAYERS_PER_RECORD:
                raise GraphError(f"a record's Layers must be an array of at most {MAX_LAYERS_PER_RECORD}")
            parsed.append((_digest(u.get("RecordDigest"), "RecordDigest"), [Layer.from_descriptor(x) for x in layers]))
        n = 0
        for rd, layers in parsed:
            if rd in self.records and layers:
                self.layers[rd] = layers
                self.dirty = True
                n += 1
        return n

    def _bound(self) -> None:
        while len(self.keys) > self.max_keys:
            key_id, key = self.keys.popitem(last=False)
            for result_id in key.results:
                rd = record_digest(key_id, result_id)
                self.records.pop(rd, None)
                self.layers.pop(rd, None)
        known = self.keys.keys()
        for link in [ln for ln in self.links if ln[0] not in known or ln[1] not in known]:
            del self.links[link]
        while len(self.links) > self.max_links:
            self.links.popitem(last=False)

    # -- reads ------------------------------------------------------------------------

    def layer_digests(self) -> set[str]:
        return {layer.digest for layers in self.layers.values() for layer in layers}

    def wanted(self, named: Iterable[tuple[str, str]], stored: Callable[[str], bool]) -> list[dict[str, str]]:
        """The ``ExportRecords`` of a records update: each named result whose
        layers are not known, or not all stored any more."""
        out, seen = [], set()
        for rd, result_id in named:
            if rd in seen:
                continue
            seen.add(rd)
            layers = self.layers.get(rd)
            if not layers or not all(stored(layer.digest) for layer in layers):
                out.append({"Digest": rd, "CacheRefID": result_id})
        return out

    def cache_config(self, stored: Callable[[str], bool]) -> dict[str, Any]:
        """BuildKit's v1 cache config of the results whose layers are all stored
        (and carry the diffID the engine needs), with the keys they depend on."""
        usable: dict[str, list[tuple[str, list[Layer]]]] = {}
        for rd, layers in self.layers.items():
            where = self.records.get(rd)
            if where is None or not all(layer.diff_id and stored(layer.digest) for layer in layers):
                continue
            key_id, result_id = where
            created = self.keys[key_id].results.get(result_id, ("", ""))[0] if key_id in self.keys else ""
            usable.setdefault(key_id, []).append((created, layers))
        if not usable:
            return {}
        inputs_of: dict[str, list[tuple[str, int, str, str]]] = {}
        for (kid, linked, inp, dgst, sel) in self.links:
            inputs_of.setdefault(kid, []).append((linked, inp, dgst, sel))
        # The keys a usable result needs: itself and, transitively, its inputs.
        needed: list[str] = []
        seen: set[str] = set()
        todo = list(usable)
        while todo:
            kid = todo.pop()
            if kid in seen or kid not in self.keys:
                continue
            seen.add(kid)
            needed.append(kid)
            todo.extend(linked for linked, _i, _d, _s in inputs_of.get(kid, ()))
        index = {kid: i for i, kid in enumerate(needed)}
        layer_index: dict[tuple[str, int], int] = {}
        cfg_layers: list[dict[str, Any]] = []
        records = []
        for kid in needed:
            links = [ln for ln in inputs_of.get(kid, ()) if ln[0] in index]
            digest = links[0][2] if links else kid
            rec: dict[str, Any] = {"digest": digest}
            if links:
                inputs: list[list[dict[str, Any]]] = [[] for _ in range(max(i for _l, i, _d, _s in links) + 1)]
                for linked, inp, _d, sel in links:
                    entry: dict[str, Any] = {"link": index[linked]}
                    if sel:
                        entry["selector"] = sel
                    inputs[inp].append(entry)
                rec["inputs"] = inputs
            results = []
            for created, layers in usable.get(kid, ()):
                parent = -1
                for layer in layers:
                    at = layer_index.get((layer.digest, parent))
                    if at is None:
                        ann: dict[str, Any] = {"mediaType": layer.media_type, "diffID": layer.diff_id,
                                               "size": layer.size}
                        if layer.created_at:
                            ann["createdAt"] = layer.created_at
                        at = layer_index[(layer.digest, parent)] = len(cfg_layers)
                        cfg_layers.append({"blob": layer.digest, "parent": parent, "annotations": ann})
                    parent = at
                result: dict[str, Any] = {"layer": parent}
                if created:
                    result["createdAt"] = created
                results.append(result)
            if results:
                rec["layers"] = results
            records.append(rec)
        return {"layers": cfg_layers, "records": records}

    # -- persistence ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "v": 1,
            "keys": [[kid, [[rid, c, d] for rid, (c, d) in k.results.items()]] for kid, k in self.keys.items()],
            "links": [list(ln) for ln in self.links],
            "layers": {rd: [x.to_json() for x in ls] for rd, ls in self.layers.items()},
        }

    def load_json(self, data: Any) -> None:
        """Replace the graph with a stored one (raises on a malformed document)."""
        if not isinstance(data, dict) or data.get("v") != 1:
            raise GraphError("not a stored dagger cache graph")
        keys: OrderedDict[str, Key] = OrderedDict()
        records = {}
        for kid, results in data["keys"]:
            keys[kid] = Key({rid: (c, d) for rid, c, d in results})
            for rid, _c, _d in results:
                records[record_digest(kid, rid)] = (kid, rid)
        links: OrderedDict[tuple[str, str, int, str, str], None] = OrderedDict(
            ((a, b, int(i), d, s), None) for a, b, i, d, s in data["links"])
        layers = {rd: [Layer.from_json(x) for x in ls] for rd, ls in data["layers"].items() if rd in records}
        self.keys, self.links, self.records, self.layers = keys, links, records, layers
        self._bound()
