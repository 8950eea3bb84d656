"""``storage.backend: s3``: bodies in an S3-compatible bucket, a local disk tier in front.

- ``settings``: the ``storage.s3`` keys and the credentials (environment or a file, never the config);
- ``client``: a signed S3 client on the reactor (botocore signs, the Twisted Agent sends);
- ``bodies``: streamed request/response bodies with bounded memory;
- ``content``: S3ContentStore, the IBackedContentStore the Store uses;
- ``tier``: the local disk tier and its LRU, one per host (the ledger ``tier.sqlite``, fill locks);
- ``tiered``: the index that fills the tier before it hands out an entry;
- ``published``: immutable index entries shared through the bucket with other hosts;
- ``lease``: the cross-host lease, one upstream fetch of a key for all the hosts.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from sparkcache.store.s3.client import S3Client, S3Error, S3Unavailable
from sparkcache.store.s3.content import S3ContentStore
from sparkcache.store.s3.settings import S3Credentials, S3Settings

__all__ = ["S3Client", "S3ContentStore", "S3Credentials", "S3Error", "S3Settings", "S3Unavailable", "content_store"]


def content_store(storage: Any, reactor: Any, io_pool: ThreadPool, clock: Any = None, shared: bool = False,
                  evicts: bool = True) -> S3ContentStore:
    """The content store for ``storage`` (a StorageConfig with backend s3); ``shared``
    and ``evicts`` for a worker process (S3ContentStore)."""
    settings: S3Settings = storage.s3

    def in_io(fn: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, io_pool, fn, *args)

    client = S3Client(settings, reactor, in_io, clock=clock)
    tier_max = storage.tier_max_size if storage.tier_max_size is not None else storage.max_size
    return S3ContentStore(client, os.path.join(os.path.abspath(storage.data_dir), "tier"), tier_max,
                          clock or reactor, in_io, shared=shared, evicts=evicts)
