"""The worked example of docs/architecture.rst: a whole protocol in one module.

``echo`` owns a remote type (with a key of its own), a top-level section, a
mounted app, a background service, a drain and a ``/setup`` snippet — and the
daemon learns of it only through the ``protocols=`` list, exactly as a real
protocol package is added by one line in ``sparkcache.protocols.PROTOCOLS``.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from klein import Klein
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import succeed

from sparkcache.config import ConfigError, Loader, Section
from sparkcache.context import Context
from sparkcache.protocols import PROTOCOLS, load_config_data
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint
from sparkcache.service import SparkcacheService
from sparkcache.timers import Periodic
from sparkcache.web.errors import JSON, HTTPError, add_error_handling, guarded
from sparkcache.web.setup import render_snippet


# -- the protocol: what a package's __init__.py (options, SPEC) and app.py hold -------------


def parse_echo_options(loader: Loader, sec: Section, rtype: str) -> dict[str, Any]:
    """The type's own keys; read through ``sec`` so unknown keys are still reported."""
    greeting = sec.get("greeting", str, "hello")
    if not greeting.strip():
        raise loader.error(sec.key("greeting"), "must not be blank")
    return {"greeting": greeting}


def parse_echo_section(loader: Loader, sec: Section) -> dict[str, Any]:
    out = {"shout": sec.get("shout", bool, False)}
    sec.done()
    return out


class EchoApp:
    app = Klein()
    # Errors in the protocol's own format, ending in a catch-all (JSON here).
    add_error_handling(app, JSON)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.remotes = {n: r for n, r in ctx.config.remotes.items() if r.type == "echo"}

    def resource(self) -> Any:
        # Undecodable or hostile paths are refused, in the same format, before Klein routes them.
        return guarded(self.app, JSON, self.ctx.config.server.max_path_length)

    @app.route("/<remote>/<word>", methods=["GET"])
    def echo(self, request: Any, remote: str, word: str) -> bytes:
        self.ctx.auth.require(request, "read")
        r = self.remotes.get(remote)
        if r is None:
            raise HTTPError(404, f"no echo remote {remote!r}")
        text = f"{r.options['greeting']} {word}"
        if self.ctx.config.section("echo")["shout"]:
            text = text.upper()
        return text.encode()


def build_echo(ctx: Context) -> Built:
    ticks: list[float] = []
    return Built(
        resource=EchoApp(ctx).resource(),
        services=[Periodic("echo-tick", 60, lambda: ticks.append(ctx.clock.seconds()), ctx.clock)],
        # A graceful stop waits for what these return (here: nothing in flight).
        drains=[lambda: [succeed("echo drained")]],
        setup={"echo": SetupEndpoint(lambda request: render_snippet(
            request, "text/plain", f"ECHO_URL={request.getHeader(b'host').decode()}/echo/\n", "/etc/echo.env"))},
    )


ECHO = ProtocolSpec(
    name="echo",
    segments=(b"echo",),
    build=build_echo,
    remote_types=(RemoteKind("echo", needs_upstream=False, options=parse_echo_options, url="/echo/{name}/"),),
    section="echo",
    parse_section=parse_echo_section,
)
WITH_ECHO = (*PROTOCOLS, ECHO)


# -- the daemon picks it up from the list alone --------------------------------------------------


def _config(tmp_path: Any, **echo: Any) -> Any:
    return load_config_data({
        "storage": {"data_dir": str(tmp_path / "data")},
        "remotes": {"hi": {"type": "echo", "greeting": "hi"}, "files": {"type": "local"}},
        "echo": echo,
    }, "cache.yaml", {}, protocols=WITH_ECHO)


def test_the_config_loader_takes_types_keys_and_sections_from_the_spec(tmp_path: Any) -> None:
    cfg = _config(tmp_path, shout=True)
    assert cfg.remotes["hi"].options == {"greeting": "hi"}
    assert cfg.section("echo") == {"shout": True}
    with pytest.raises(ConfigError, match=r"cache.yaml: remotes.hi.greeting: must not be blank"):
        load_config_data({"remotes": {"hi": {"type": "echo", "greeting": " "}}}, "cache.yaml", {}, protocols=WITH_ECHO)
    with pytest.raises(ConfigError, match=r"remotes.hi.colour: unknown key"):
        load_config_data({"remotes": {"hi": {"type": "echo", "colour": "red"}}}, "cache.yaml", {}, protocols=WITH_ECHO)
    with pytest.raises(ConfigError, match=r"echo.loud: unknown key"):
        load_config_data({"echo": {"loud": True}}, "cache.yaml", {}, protocols=WITH_ECHO)
    # Without the spec in the list, neither the type nor the section exists.
    with pytest.raises(ConfigError, match=r"remotes.hi.type: unknown remote type 'echo'"):
        load_config_data({"remotes": {"hi": {"type": "echo"}}}, "cache.yaml", {})
    with pytest.raises(ConfigError, match=r"echo: unknown key"):
        load_config_data({"echo": {}}, "cache.yaml", {})


def test_two_protocols_cannot_claim_one_remote_type() -> None:
    clash = ProtocolSpec(name="clash", segments=(b"clash",), build=lambda ctx: Built(),
                         remote_types=(RemoteKind("echo"),))
    with pytest.raises(ValueError, match="claimed by two protocols"):
        load_config_data({}, "cache.yaml", {}, protocols=(*WITH_ECHO, clash))


def test_two_protocols_cannot_mount_one_segment(tmp_path: Any) -> None:
    cfg = _config(tmp_path)
    twin = ProtocolSpec(name="twin", segments=(b"echo",), build=lambda ctx: Built())
    with pytest.raises(ValueError, match=r"/echo/ is mounted by protocols 'echo' and 'twin'"):
        SparkcacheService(cfg, protocols=(*WITH_ECHO, twin))
    health = ProtocolSpec(name="health", segments=(b"health",), build=lambda ctx: Built())
    with pytest.raises(ValueError, match=r"mounts /health/, which the daemon answers itself"):
        SparkcacheService(cfg, protocols=(*WITH_ECHO, health))


@pytest_twisted.ensureDeferred
async def test_the_service_mounts_the_app_runs_its_services_and_lists_its_snippet(tmp_path: Any) -> None:
    clock = task.Clock()
    svc = SparkcacheService(_config(tmp_path, shout=True), clock=clock, protocols=WITH_ECHO)
    assert any(s.name == "echo-tick" for s in svc.runtime)
    assert [d.result for d in svc.drains[-1]()] == ["echo drained"]  # echo is last in the list
    http = StubTreq(svc.root)

    resp = await http.get("http://cache.test/echo/hi/world")
    assert resp.code == 200 and await resp.content() == b"HI WORLD"
    resp = await http.get("http://cache.test/echo/nope/world")
    assert resp.code == 404 and (await resp.json())["error"] == "no echo remote 'nope'"

    listing = await (await http.get("http://cache.test/")).json()
    assert {r["name"]: r["url"] for r in listing["remotes"]} == {"hi": "/echo/hi/", "files": "/api/files/"}

    resp = await http.get("http://cache.test/setup/echo")
    assert resp.code == 200 and await resp.content() == b"ECHO_URL=cache.test/echo/\n"
    assert resp.headers.getRawHeaders("X-Install-Path") == ["/etc/echo.env"]
    resp = await http.post("http://cache.test/setup/echo")
    assert resp.code == 405 and resp.headers.getRawHeaders("Allow") == ["GET, HEAD"]

    # An echo remote is not a generic one: /api/ says where it is served instead.
    resp = await http.get("http://cache.test/api/hi/x")
    assert resp.code == 404 and "/echo/hi/" in (await resp.json())["error"]
    assert not svc.ready.called  # never started: nothing was bound or opened
