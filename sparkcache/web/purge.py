"""Purges of the cache, and the explicit deletion of local content.

A purge removes cached content only: what can be fetched again. Uploads and
pushes (``type: local``, ``oci-local``, ``pypi-local``, ``npm-local``
remotes, code-sync uploads: ``Entry.local``) exist nowhere else, so no purge
removes them, and a purge that names a remote or a path holding only such
content is refused with a 400 that says how to delete it instead:
``DELETE /admin/local?remote=R&path=P``, one key at a time, destructive.
A purge also covers productions in progress: what they fetched is not stored
(``Store.commit``'s ``since``).
"""

from __future__ import annotations

from typing import Any

from sparkcache.context import Context
from sparkcache.web.errors import HTTPError

# Local content listed by one GET /admin/local?remote=.
LIST_LIMIT = 10_000


def query_arg(request: Any, name: str) -> str | None:
    """The first ``name=`` of the query, as text; a 400 when it is not UTF-8."""
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name}= is not valid UTF-8") from None


def how_to_delete(remote: str) -> str:
    return (f"delete one with DELETE /admin/local?remote={remote}&path=<path> (destructive: it is the only copy; "
            f"GET /admin/local?remote={remote} lists them)")


def refuse_local_purge(ctx: Context, remote: str) -> None:
    """A 400 when ``remote`` is of a type that holds only local content
    (uploads, pushes), which no purge deletes."""
    config = ctx.config.remotes.get(remote)
    kind = ctx.remote_types.get(config.type) if config is not None else None
    if config is not None and kind is not None and getattr(kind, "pinned", False):
        raise HTTPError(400, f"remote {remote!r} (type {config.type}) holds uploads that exist nowhere else, which a "
                             f"purge of the cache never deletes; {how_to_delete(remote)}")


def known_remote(ctx: Context, remote: str) -> bool:
    return remote in ctx.config.remotes or remote in ctx.internal_remotes


async def purge(ctx: Context, request: Any) -> dict[str, Any]:
    """``POST /admin/purge[?remote=R[&path=P]]``: the cached content of
    everything, of one remote, or of one entry."""
    ctx.auth.require(request, "admin")
    remote = query_arg(request, "remote")
    path = query_arg(request, "path")
    store = ctx.store
    if remote is None:
        if path is not None:
            raise HTTPError(400, "path needs remote")
        return {"purged": await store.purge_all()}
    if not known_remote(ctx, remote):
        raise HTTPError(404, f"unknown remote {remote!r}")
    refuse_local_purge(ctx, remote)
    if path is None:
        return {"purged": await store.purge_remote(remote)}
    key = f"{remote}:{path.lstrip('/')}"
    entry = await store.index.get(key)
    if entry is not None and entry.local:
        raise HTTPError(400, f"{path!r} of remote {remote!r} is an upload that exists nowhere else, which a purge "
                             f"of the cache never deletes; {how_to_delete(remote)}")
    return {"purged": await store.purge_cached_key(key)}


async def list_local(ctx: Context, request: Any) -> dict[str, Any]:
    """``GET /admin/local[?remote=R[&path=PREFIX]]``: what no purge removes,
    per remote, or in one (under a path prefix)."""
    ctx.auth.require(request, "admin")
    remote = query_arg(request, "remote")
    prefix = (query_arg(request, "path") or "").lstrip("/")
    if remote is None:
        if prefix:
            raise HTTPError(400, "path needs remote")
        return {"remotes": [{"remote": r, "entries": n, "bytes": b} for r, n, b in await ctx.store.index.local_summary()]}
    entries = await ctx.store.index.list_local(remote, prefix, LIST_LIMIT + 1)
    return {
        "remote": remote,
        "entries": [{"path": e.path, "size": e.size, "digest": e.digest, "pinned": e.pinned, "fetched": e.fetched}
                    for e in entries[:LIST_LIMIT]],
        "truncated": len(entries) > LIST_LIMIT,
    }


async def delete_local(ctx: Context, request: Any) -> dict[str, Any]:
    """``DELETE /admin/local?remote=R&path=P``: delete one piece of local
    content, the only copy of it. Destructive by design, and never implied:
    the path is required."""
    ctx.auth.require(request, "admin")
    remote = query_arg(request, "remote")
    path = query_arg(request, "path")
    if remote is None or path is None:
        raise HTTPError(400, "remote= and path= are required: local content is deleted one path at a time")
    path = path.lstrip("/")
    n = await ctx.store.delete_local(remote, path)
    if not n:
        raise HTTPError(404, f"no local content at {path!r} of remote {remote!r} (cached entries are purged with "
                             "POST /admin/purge)")
    return {"deleted": n}
