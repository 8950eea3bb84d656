"""Waiting on the running reactor in pytest-twisted tests (the e2e helpers in
``client.py`` block a thread instead)."""

from __future__ import annotations

from typing import Callable

from twisted.internet import reactor, task


async def eventually(cond: Callable[[], bool], timeout: float = 20.0, interval: float = 0.01) -> None:
    """Poll ``cond`` between reactor turns until it holds; AssertionError after ``timeout`` seconds."""
    for _ in range(int(timeout / interval)):
        if cond():
            return
        await task.deferLater(reactor, interval, lambda: None)
    raise AssertionError("condition never became true")
