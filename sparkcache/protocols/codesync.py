"""Placeholder: filled in by the codesync work."""

from __future__ import annotations

from typing import Any


def install(svc: Any) -> None:
    """Mount this protocol's routes on svc.root and add its services to svc.extra_services."""
