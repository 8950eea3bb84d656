"""``server.workers: N``: a supervisor parent and N worker processes sharing
the listening sockets and the store (docs/workers.rst)."""
