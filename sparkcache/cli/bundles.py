"""``sparkcache export`` and ``sparkcache import``: air-gap bundles (docs/airgap.rst).

Both stream: an export is written to ``FILE.part`` chunk by chunk as the
daemon sends it and renamed to FILE only when the archive arrived whole; an
import is sent from the file as it is read. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, BinaryIO, TextIO

from sparkcache.cli import output
from sparkcache.cli.client import EXIT_ERROR, CLIError, Client

CHUNK = 1 << 20
# Verifying and committing a large bundle takes a while after its last byte is
# sent: the answer is waited for at least this long.
IMPORT_ANSWER_TIMEOUT = 3600.0


class Progress:
    """``exported 1.2 GiB`` on stderr, at most once a second, and at the end."""

    def __init__(self, verb: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self.verb, self.total, self.done = verb, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self._last = 0.0
        self._tty = self.stream.isatty()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            self._show(False)

    def end(self) -> None:
        self._show(True)

    def _show(self, last: bool) -> None:
        of = f" of {output.size(self.total)}" if self.total else ""
        line = f"{self.verb} {output.size(self.done)}{of}"
        if self._tty:
            self.stream.write("\r" + line + ("\n" if last else ""))
        elif last:
            self.stream.write(line + "\n")
        self.stream.flush()


def export(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    query: dict[str, Any] = {"remote": args.remote or None, "repo": args.repo or None, "since": args.since,
                             "git": "1" if args.git else None}
    part = args.output + ".part"
    progress = Progress("exported")
    try:
        with client.open("GET", "/admin/export", query, timeout=max(args.timeout, 600.0)) as resp, \
                open(part, "wb") as f:
            entries = resp.headers.get("X-Bundle-Entries")
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                progress.add(len(chunk))
            if getattr(resp, "length", None):  # a Content-Length body ended early: http.client says nothing
                raise EOFError(f"{resp.length} bytes short")
            f.flush()
            os.fsync(f.fileno())
    except CLIError:
        _remove(part)
        raise
    except Exception as e:  # cut off midway (IncompleteRead, a reset): never a FILE that looks whole
        _remove(part)
        raise CLIError(f"the export broke off after {output.size(progress.done)}: {e or type(e).__name__}") from None
    progress.end()
    os.replace(part, args.output)
    doc = {"file": args.output, "bytes": progress.done, "entries": int(entries) if entries else None}
    if args.json:
        output.dump_json(doc, out)
    else:
        out.write(f"wrote {args.output}: {output.size(progress.done)}, {doc['entries']} entries\n")
    return 0


def import_(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    for item in args.map or ():
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise CLIError(f"--map takes OLD=NEW, not {item!r}", exit_code=2)
    try:
        f = open(args.file, "rb")
    except OSError as e:
        raise CLIError(f"cannot read {args.file}: {e.strerror}", exit_code=2) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        progress = Progress("sent", size)
        body = _Reading(f, progress)
        headers = {"Content-Type": "application/x-tar", "Content-Length": str(size), "Accept": "application/json"}
        with client.open("POST", "/admin/import", {"map": args.map or None}, body=body, headers=headers,
                         timeout=max(args.timeout, IMPORT_ANSWER_TIMEOUT)) as resp:
            progress.end()
            raw = resp.read()
    try:
        doc = json.loads(raw)
    except ValueError:
        raise CLIError("the daemon's answer to the import is not JSON") from None
    if args.json:
        output.dump_json(doc, out)
    else:
        out.write(summary(doc))
    failed = [g for g in doc.get("git") or [] if g.get("status") == "failed"]
    return EXIT_ERROR if failed else 0


def summary(doc: dict[str, Any]) -> str:
    lines = [f"imported {doc.get('imported', 0)} entries ({doc.get('present', 0)} already present, "
             f"{doc.get('kept_newer', 0)} kept as newer here, {doc.get('skipped_entries', 0)} skipped)"]
    for name, why in sorted((doc.get("skipped_remotes") or {}).items()):
        lines.append(f"skipped remote {name}: {why}")
    for m in doc.get("missing_in_bundle") or []:
        lines.append(f"not in the bundle: {m.get('digest')}: {m.get('reason')}")
    for key in doc.get("lost") or []:
        lines.append(f"lost meanwhile: {key}")
    for g in doc.get("git") or []:
        detail = f"{g.get('refs')} refs into {g.get('mirror')}" if g.get("status") == "imported" else g.get("reason")
        lines.append(f"git {g.get('name')} ({g.get('url')}): {g.get('status')}: {detail}")
    return "\n".join(lines) + "\n"


class _Reading:
    """The bundle file as http.client reads it (in blocks), counting progress."""

    def __init__(self, f: BinaryIO, progress: Progress) -> None:
        self.f, self.progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(CHUNK if n is None or n < 0 else min(n, CHUNK))
        self.progress.add(len(data))
        return data


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
