"""Fixtures shared by the OCI end-to-end tests (``test_oci_*.py``).

Each of those modules builds its own images into a module-scoped ``reg``
fixture (a :class:`types.SimpleNamespace` whose ``registry`` is a running
:class:`~tests.support.registry.Registry`, see ``running_registry``); the
fixtures here work on whichever ``reg`` the requesting module defines.
``containerd`` is a private containerd daemon (tests/support/containerd.py).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator

import pytest

from tests.support.containerd import private_containerd
from tests.support.registry import Front


@pytest.fixture
def front(reg: SimpleNamespace) -> Iterator[Front]:
    """A fresh counting, fault-injecting proxy in front of the module's registry, one per test."""
    f = Front(reg.registry.url).start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def containerd() -> Iterator[SimpleNamespace]:
    """A private containerd daemon per module (root only; skipped otherwise, with the reason)."""
    with private_containerd() as ctrd:
        yield ctrd
