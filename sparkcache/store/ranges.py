"""Which lookup may hand out an entry whose body is not in a local tier yet.

With ``storage.backend: s3`` an entry is handed out only once its body is in
the local tier (store/s3/tiered.py), except for a Range request: an app that
answers with ``respond``/``serve_hit`` looks its entry up inside
``serving_range(request, key)``, and the first lookup of that key may then
answer at once; ``serve_hit`` streams the range from the bucket
(store/s3/ranged.py). Here, not in the s3 package: apps import this whatever
the backend, and it costs one context variable, no import of the S3 client.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass
class _Wanted:
    key: str
    taken: bool = False


_WANTED: ContextVar[_Wanted | None] = ContextVar("sparkcache_bucket_range", default=None)


@contextlib.contextmanager
def serving_range(request: Any, key: str) -> Iterator[None]:
    """Around the lookup of ``key`` by an app that answers with ``respond``:
    a GET with a Range of a body not in the tier may be served from the bucket."""
    if request.method != b"GET" or not request.getHeader(b"range"):
        yield
        return
    token = _WANTED.set(_Wanted(key))
    try:
        yield
    finally:
        _WANTED.reset(token)


def range_wanted(key: str) -> bool:
    """Whether this lookup of ``key`` is the one ``serving_range`` announced
    (the first only: a later one, a production's, fills the tier as usual)."""
    wanted = _WANTED.get()
    if wanted is None or wanted.taken or wanted.key != key:
        return False
    wanted.taken = True
    return True
