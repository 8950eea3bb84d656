"""Unit tests' Stores keep no spool files made ahead (``Store.spool``): each
miss's spool is made for it, so a test that finds the spool empty after a
failed fetch knows nothing was left behind. A test of the spare files asks
for them with ``@pytest.mark.spare_spools``."""

from __future__ import annotations

import pytest

import sparkcache.store


@pytest.fixture(autouse=True)
def _no_spare_spools(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("spare_spools") is None:
        monkeypatch.setattr(sparkcache.store, "SPARE_SPOOLS", 0)
