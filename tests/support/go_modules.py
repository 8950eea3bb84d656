"""Go modules and GOPROXY trees made in tests.

A module version is its files; :func:`proxy_files` gives what a module proxy
serves for it (``.info``, ``.mod``, ``.zip`` under their escaped paths) and
:func:`proxy_tree` a whole proxy (every version's files plus ``@v/list`` and
``@latest``), as ``{tail: bytes}`` for an in-memory upstream or for
:func:`write_tree`, which lays it out as a ``file://`` GOPROXY directory that
``go`` itself reads (and any static HTTP server serves).

The small graph :data:`SAMPLE` (an app needs greet, greet needs a module with
an upper-case path, so ``!`` escaping is on the way) is what the end-to-end
tests build with the real ``go``; :func:`scaled` makes it wider for benchmarks.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from sparkcache.protocols.go.paths import escape

TIME = "2024-01-02T03:04:05Z"


@dataclass
class ModuleVersion:
    module: str
    version: str
    # Files under the module root, go.mod included unless the module has none.
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def gomod(self) -> bytes:
        return self.files.get("go.mod", f"module {self.module}\n".encode())


def module_zip(mv: ModuleVersion, prefix: str | None = None) -> bytes:
    """The module zip ``go`` expects: every entry under ``module@version/``."""
    out = io.BytesIO()
    root = prefix if prefix is not None else f"{mv.module}@{mv.version}/"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(mv.files.items()):
            info = zipfile.ZipInfo(root + name, date_time=(2024, 1, 2, 3, 4, 4))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return out.getvalue()


def proxy_files(mv: ModuleVersion) -> dict[str, bytes]:
    base = f"{escape(mv.module)}/@v/{escape(mv.version)}"
    return {
        f"{base}.info": json.dumps({"Version": mv.version, "Time": TIME}).encode(),
        f"{base}.mod": mv.gomod,
        f"{base}.zip": module_zip(mv),
    }


def proxy_tree(versions: list[ModuleVersion]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    by_module: dict[str, list[str]] = {}
    for mv in versions:
        out.update(proxy_files(mv))
        by_module.setdefault(mv.module, []).append(mv.version)
    for module, vs in by_module.items():
        out[f"{escape(module)}/@v/list"] = "".join(v + "\n" for v in vs).encode()
        out[f"{escape(module)}/@latest"] = json.dumps({"Version": vs[-1], "Time": TIME}).encode()
    return out


def write_tree(root: Path, tree: dict[str, bytes]) -> None:
    for tail, data in tree.items():
        p = root / tail
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _lib(module: str, version: str, package: str, body: str, requires: dict[str, str] | None = None) -> ModuleVersion:
    req = "".join(f"require {m} {v}\n" for m, v in (requires or {}).items())
    return ModuleVersion(module, version, {
        "go.mod": f"module {module}\n\ngo 1.19\n\n{req}".encode(),
        f"{package}.go": f"package {package}\n\n{body}\n".encode(),
        "LICENSE": b"Test fixture, no rights reserved.\n",
    })


WORDS = "example.com/Upper/words"
GREET = "example.com/greet"
SAMPLE = [
    _lib(WORDS, "v0.1.0", "words", 'func Hello() string { return "hullo" }'),
    _lib(WORDS, "v0.2.0", "words", 'func Hello() string { return "hello" }'),
    _lib(GREET, "v1.0.0", "greet", 'import "example.com/Upper/words"\n\n'
                                   'func Greet(n string) string { return words.Hello() + ", " + n }',
         {WORDS: "v0.1.0"}),
    _lib(GREET, "v1.1.0", "greet", 'import "example.com/Upper/words"\n\n'
                                   'func Greet(n string) string { return words.Hello() + ", " + n + "!" }',
         {WORDS: "v0.2.0"}),
]
# The program the app module builds, and what it prints.
APP_MAIN = 'package main\n\nimport (\n\t"fmt"\n\n\t"example.com/greet"\n)\n\nfunc main() { fmt.Println(greet.Greet("gopher")) }\n'
APP_OUTPUT = "hello, gopher!"
APP_REQUIRES = {GREET: "v1.1.0"}


def app_module(root: Path, requires: dict[str, str], main: str = APP_MAIN) -> None:
    """A main module at ``root`` requiring ``requires`` (go fills in go.sum)."""
    root.mkdir(parents=True, exist_ok=True)
    req = "".join(f"require {m} {v}\n" for m, v in requires.items())
    (root / "go.mod").write_text(f"module example.com/app\n\ngo 1.19\n\n{req}")
    (root / "main.go").write_text(main)


def scaled(n: int) -> tuple[list[ModuleVersion], dict[str, str], str]:
    """``n`` modules ``example.com/Dep<i>/lib`` of two versions each (the app needs
    the second), and the main.go that imports them all: a build with 2n versions."""
    versions: list[ModuleVersion] = []
    requires: dict[str, str] = {}
    imports, calls = [], []
    for i in range(n):
        mod = f"example.com/Dep{i}/lib"
        for v in ("v1.0.0", "v1.0.1"):
            versions.append(_lib(mod, v, "lib", f"func N() int {{ return {i} }}\n\n// {'x' * 2000}"))
        requires[mod] = "v1.0.1"
        imports.append(f'\tl{i} "{mod}"')
        calls.append(f"l{i}.N()")
    main = "package main\n\nimport (\n\t\"fmt\"\n" + "\n".join(imports) + "\n)\n\n" \
        + "func main() { fmt.Println(" + " + ".join(calls or ["0"]) + ") }\n"
    return versions, requires, main
