"""The keys of a ``type: bazel`` remote: the keyed-blob ones (``max_entry_size``,
``quota``, ``ttl``) and ``check_references`` (default true: an AC entry whose
outputs are gone is a miss; false only for a client that stores something
other than ActionResults under ``ac/`` and wants them served unchecked)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparkcache.config import Loader, RemoteConfig, Section
from sparkcache.protocols._keyed import KeyedOptions, read_keyed_options


@dataclass(frozen=True)
class BazelOptions:
    keyed: KeyedOptions = field(default_factory=KeyedOptions)
    check_references: bool = True

    def redacted(self) -> dict[str, Any]:
        return {**self.keyed.redacted(), "check_references": self.check_references}


def parse_bazel_options(loader: Loader, sec: Section, rtype: str) -> BazelOptions:
    keyed = read_keyed_options(loader, sec)
    return BazelOptions(keyed, bool(sec.get("check_references", bool, True)))


def options_of(remote: RemoteConfig) -> BazelOptions:
    return remote.options if isinstance(remote.options, BazelOptions) else BazelOptions()
