"""Deadlines worker processes share (sparkcache/store/hints.py)."""

from __future__ import annotations

from pathlib import Path

from sparkcache.store import hints


def test_a_deadline_written_by_one_is_read_by_another_until_cleared(tmp_path: Path) -> None:
    data = str(tmp_path)
    assert hints.read_until(data, "oci-down:hub") == 0.0
    hints.write_until(data, "oci-down:hub", 1234.5)
    assert hints.read_until(data, "oci-down:hub") == 1234.5
    assert hints.read_until(data, "oci-down:other") == 0.0
    hints.write_until(data, "oci-down:hub", 2000.25)  # replaced whole
    assert hints.read_until(data, "oci-down:hub") == 2000.25
    hints.clear(data, "oci-down:hub")
    hints.clear(data, "oci-down:hub")  # nothing there: fine
    assert hints.read_until(data, "oci-down:hub") == 0.0
    assert not [p for p in (tmp_path / "locks" / "hints").iterdir() if p.name.endswith(".tmp")]
