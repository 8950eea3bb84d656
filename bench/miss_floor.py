#!/usr/bin/env python3
"""The machine's floor for a cold miss: the work of one, with no framework.

``python miss_floor.py PORT UPSTREAM_PORT DIR [--rcvbuf BYTES] [--read BYTES]`` serves, one connection at a
time, ``GET /path`` by fetching ``/path`` from ``127.0.0.1:UPSTREAM_PORT``:
the upstream's body is received in reads of up to 1 MiB into a ring of
reused buffers (no fresh pages per read), each written to a spool file
under DIR, sha256-hashed (in a second, long-lived thread: hashlib lets go of
the GIL on large buffers, so hashing overlaps the copying, as sparkcache's
split writer and hasher do) and sent to the client with ``sendfile`` from
the spool (as sparkcache's tails do);
at the end the hash is awaited, the spool fsynced and renamed to its digest
(then deleted: the benchmark only needs the work done). Blocking sockets, no
event loop, no HTTP library, no error handling beyond the benchmark's needs:
what "receive from upstream, write to a file, sha256, send to the client"
costs on this machine, the lower bound of any implementation of the miss
path with sparkcache's guarantees (nginx's proxy_cache skips the hash and
the fsync).

``--rcvbuf BYTES`` sets the upstream socket's receive buffer (SO_RCVBUF), as
sparkcache's siphon does for a nearby upstream: on loopback the kernel never
grows it off its 128 KiB start, and each read then gets ~93 KiB, not 1 MiB.
``--read BYTES`` reads (and hashes) in pieces of up to that many bytes instead
of 1 MiB, as sparkcache's siphon does (2 MiB). ``--splice`` (an experiment
with fewer copies, which sparkcache does not do) moves upstream's bytes into
the spool with splice(2) through a pipe, so they are copied once (into the
page cache) and never into a buffer of ours, and hashes them from a mapping
of the spool's pages. Without these (the plain mode) the floor is the
program it always was.

Used by cold_miss.py as a reference; not part of sparkcache.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import mmap
import os
import queue
import socket
import sys
import tempfile
import threading

READ = 1 << 20
QUEUE = 8  # chunks waiting for the hasher before the receiver blocks (backpressure)
# A buffer is reused only once the hasher is done with it: the queue holds at
# most QUEUE, the hasher one more.
RING = QUEUE + 2


class Hasher(threading.Thread):
    """Hashes buffers, or (with --splice) ranges (fd, offset, n) of the spool,
    through a mapping of its pages: the received bytes never were in ours."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.jobs: queue.Queue[memoryview | tuple[int, int, int] | None] = queue.Queue(QUEUE)
        self.done: queue.Queue[str] = queue.Queue()
        self.h = hashlib.sha256()

    def run(self) -> None:
        while True:
            chunk = self.jobs.get()
            if chunk is None:
                self.done.put(self.h.hexdigest())
                self.h = hashlib.sha256()
            elif isinstance(chunk, tuple):
                fd, offset, n = chunk
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                with mmap.mmap(fd, offset + n - start, prot=mmap.PROT_READ, offset=start,
                               flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)) as pages:
                    view = memoryview(pages)
                    self.h.update(view[offset - start:])
                    view.release()
            else:
                self.h.update(chunk)


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head up to the blank line, the bytes received after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the end of the head")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def send_file(client: socket.socket, fd: int, offset: int, n: int) -> None:
    while n:
        sent = os.sendfile(client.fileno(), fd, offset, n)
        offset, n = offset + sent, n - sent


def serve(client: socket.socket, upstream_port: int, spool_dir: str, hasher: Hasher,
          ring: list[bytearray], rcvbuf: int = 0, pipe: tuple[int, int] | None = None) -> None:
    try:
        head, _ = read_head(client)
    except ConnectionError:
        return  # (a port probe: connected, asked nothing)
    path = head.split(b"\r\n", 1)[0].split(b" ")[1]
    up = socket.socket()
    if rcvbuf:
        up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    up.connect(("127.0.0.1", upstream_port))
    try:
        up.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head, rest = read_head(up)
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None or not head.startswith(b"HTTP/1.1 200"):
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Cache: MISS\r\nConnection: close\r\n\r\n" % length)
        fd, spool = tempfile.mkstemp(dir=spool_dir, suffix=".part")
        try:
            got = 0
            chunk = memoryview(rest)
            turn = 0
            while True:
                if chunk:
                    n = len(chunk)
                    if os.write(fd, chunk) != n:
                        raise OSError("short write to the spool")
                    hasher.jobs.put(chunk)
                    send_file(client, fd, got, n)
                    got += n
                if got >= length:
                    break
                if pipe is not None:
                    # Upstream's pages into a pipe, the pipe into the spool: one
                    # copy (into the page cache), none into our memory.
                    n = os.splice(up.fileno(), pipe[1], min(len(ring[0]), length - got))
                    if not n:
                        raise ConnectionError(f"upstream body ended after {got} of {length} bytes")
                    left = n
                    while left:
                        left -= os.splice(pipe[0], fd, left)
                    hasher.jobs.put((fd, got, n))
                    send_file(client, fd, got, n)
                    got += n
                    chunk = memoryview(b"")
                    continue
                buf = ring[turn % RING]
                turn += 1
                n = up.recv_into(buf)
                if not n:
                    raise ConnectionError(f"upstream body ended after {got} of {length} bytes")
                chunk = memoryview(buf)[:n]
            hasher.jobs.put(None)
            digest = hasher.done.get()
            os.fsync(fd)
            final = os.path.join(spool_dir, digest)
            os.rename(spool, final)
            os.unlink(final)
        finally:
            os.close(fd)
            if os.path.exists(spool):
                os.unlink(spool)
    finally:
        up.close()


def main() -> int:
    p = argparse.ArgumentParser(description="the no-framework cold miss (see the module's docstring)")
    p.add_argument("port", type=int)
    p.add_argument("upstream_port", type=int)
    p.add_argument("spool_dir")
    p.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF of the upstream socket (0: the kernel's)")
    p.add_argument("--read", type=int, default=READ, help="bytes per read (the ring's buffer size)")
    p.add_argument("--splice", action="store_true",
                   help="splice upstream -> pipe -> spool, and hash from a mapping of the spool")
    args = p.parse_args()
    port, upstream_port, spool_dir = args.port, args.upstream_port, args.spool_dir
    os.makedirs(spool_dir, exist_ok=True)
    hasher = Hasher()
    hasher.start()
    ring = [bytearray(args.read) for _ in range(RING)]
    pipe = None
    if args.splice:
        pipe = os.pipe()
        with open("/proc/sys/fs/pipe-max-size") as f:  # (an unprivileged pipe holds at most this)
            most = int(f.read())
        size = fcntl.fcntl(pipe[1], getattr(fcntl, "F_SETPIPE_SZ", 1031), min(args.read, most))
        ring = [bytearray(size)]  # (its size is what one splice moves; no buffer is read into)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(16)
    while True:
        client, _ = ls.accept()
        try:
            serve(client, upstream_port, spool_dir, hasher, ring, args.rcvbuf, pipe)
        except (OSError, ConnectionError, IndexError, ValueError) as e:
            print(f"miss_floor: {e!r}", file=sys.stderr, flush=True)
        finally:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
