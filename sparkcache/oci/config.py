"""Settings specific to ``type: oci`` and ``type: oci-local`` remotes."""

from __future__ import annotations

from typing import Any


def parse_oci_options(loader: Any, sec: Any, rtype: str) -> Any:
    """Read the OCI-only keys of a remote section (``sec`` is a config._Section).

    Raise ``loader.error(sec.key(name), problem)`` for bad values; every key
    read must go through ``sec`` so that unknown keys are still rejected.
    """
    return None
