"""A simple-index upstream on 127.0.0.1 for the PyPI end-to-end tests.

Serves a PEP 503 tree of :class:`~tests.support.pypi_packages.Dist` s made in
the test: ``/simple/`` and ``/simple/<project>/`` (HTML, or PEP 691 JSON to
clients asking for it when ``json=True``), files under ``/packages/`` with
their ``.metadata``. Links are absolute, root-relative or relative to the
page (``links=``). ``tamper(filename)`` serves other bytes than the page's
sha256 says; ``stop()``/``start()`` keep the port. Every request is recorded.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.pypi_packages import Dist, html_page, json_page

JSON_TYPE = "application/vnd.pypi.simple.v1+json"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        accept = self.headers.get("Accept", "")
        with owner.lock:
            owner.requests.append((self.path, accept))
        status, ctype, body = owner.answer(self.path.split("?", 1)[0], accept)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: "IndexUpstream", port: int) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)


class IndexUpstream:
    def __init__(self, json: bool = True, links: str = "absolute") -> None:
        self.json, self.links = json, links
        self.projects: dict[str, list[Dist]] = {}
        self.tampered: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.port = 0
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def index_url(self) -> str:
        return f"{self.url}/simple"

    def add(self, project: str, *dists: Dist) -> "IndexUpstream":
        with self.lock:
            self.projects.setdefault(project, []).extend(dists)
        return self

    def tamper(self, filename: str, on: bool = True) -> None:
        with self.lock:
            (self.tampered.add if on else self.tampered.discard)(filename)

    def count(self, path: str) -> int:
        """GET requests for exactly ``path`` (its query ignored)."""
        with self.lock:
            return sum(1 for p, _ in self.requests if p.split("?", 1)[0] == path)

    def start(self) -> "IndexUpstream":
        self._server = _Server(self, self.port)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _href(self, d: Dist) -> str:
        if self.links == "absolute":
            return f"{self.url}/packages/{d.filename}"
        if self.links == "root":
            return f"/packages/{d.filename}"
        return f"../../packages/{d.filename}"

    def answer(self, path: str, accept: str) -> tuple[int, str, bytes]:
        with self.lock:
            projects = {k: list(v) for k, v in self.projects.items()}
            tampered = set(self.tampered)
        if path == "/simple/":
            body = "".join(f'<a href="{p}/">{p}</a>\n' for p in sorted(projects))
            return 200, "text/html", f"<!DOCTYPE html><html><body>\n{body}</body></html>\n".encode()
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "simple" and path.endswith("/") and parts[1] in projects:
            dists = projects[parts[1]]
            if self.json and JSON_TYPE in accept:
                return 200, JSON_TYPE, json_page(parts[1], dists, self._href)
            return 200, "text/html", html_page(parts[1], dists, self._href)
        if len(parts) == 2 and parts[0] == "packages":
            for dists in projects.values():
                for d in dists:
                    if parts[1] == d.filename:
                        data = d.data if d.filename not in tampered else d.data[:-8] + b"tampered"
                        return 200, "application/octet-stream", data
                    if d.metadata is not None and parts[1] == d.filename + ".metadata":
                        return 200, "application/octet-stream", d.metadata
        return 404, "text/plain", b"not found\n"
