"""Group remotes (``type: pypi-group``, ``npm-group``...): several remotes served as one.

A group lists ``members`` in priority order. A name (a PyPI project, an npm
package) that exists in an earlier member hides that name in every later
member: the versions a later member has of it are never merged in. That is
the guard against dependency confusion (Artifactory calls it priority
resolution): once an internal package is published to a ``*-local`` member
listed first, a public package of the same name, whatever its version
numbers, can no longer reach a build through the group.

Only "this member does not have the name" (a 404, cached or not) moves on to
the next member. Any other failure of an earlier member (its upstream down
with nothing stale to serve) ends the search with that failure: moving on
would let a later member's package of the same name through exactly when
the earlier one cannot be asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection, Mapping, Sequence, TypeVar

from sparkcache.config import Loader, RemoteConfig, Section
from sparkcache.protocols.base import RemoteKind

M = TypeVar("M")
R = TypeVar("R")


@dataclass(frozen=True)
class GroupOptions:
    """The members of a group, in priority order."""

    members: tuple[str, ...]

    def redacted(self) -> dict[str, Any]:
        return {"members": list(self.members)}


def _parse_members(loader: Loader, sec: Section, rtype: str) -> GroupOptions:
    if not sec.has("members"):
        raise loader.error(sec.key("members"), f"missing: a type: {rtype} remote lists its members, in priority order")
    members = sec.str_list("members")
    if not members:
        raise loader.error(sec.key("members"), "an empty list; name at least one member remote")
    seen: set[str] = set()
    for i, m in enumerate(members):
        if m in seen:
            raise loader.error(f"{sec.key('members')}[{i}]", f"{m!r} is listed twice")
        seen.add(m)
    return GroupOptions(tuple(members))


def group_kind(name: str, member_types: Collection[str], url: str) -> RemoteKind:
    """The remote type of a group whose members are remotes of ``member_types``."""

    def check(loader: Loader, remote: RemoteConfig, remotes: Mapping[str, RemoteConfig]) -> None:
        base = f"remotes.{remote.name}"
        if remote.upstreams:
            raise loader.error(f"{base}.upstream", f"a type: {name} remote has no upstream of its own; "
                                                   "its members have theirs")
        for i, m in enumerate(remote.options.members):
            where = f"{base}.members[{i}]"
            member = remotes.get(m)
            if member is None:
                raise loader.error(where, f"no remote named {m!r}")
            if member.type not in member_types:
                raise loader.error(where, f"remote {m!r} is a type: {member.type} remote; a type: {name} "
                                          f"remote's members are of type {' or '.join(sorted(member_types))}")

    # ``upstream`` is let through to ``check``, which says where the upstreams are.
    return RemoteKind(name, needs_upstream=False, options=_parse_members, check=check, url=url,
                      shared_keys=frozenset({"upstream"}))


def is_group(kind: RemoteKind) -> bool:
    """Whether ``kind`` is a group type (made by :func:`group_kind`)."""
    return kind.options is _parse_members


async def first_having(members: Sequence[M], probe: Callable[[M], Awaitable[R | None]]) -> tuple[M, R] | None:
    """The first member, in order, for which ``probe`` finds the name, with what
    it found; None when no member has it. ``probe`` returns None only for "not
    here" and raises (or returns its failure) for anything else, which ends the
    search (see the module's doc)."""
    for member in members:
        found = await probe(member)
        if found is not None:
            return member, found
    return None
