"""``sparkcache``: the operators' command line for a running daemon.

Each command is one or two HTTP requests to the daemon's management
endpoints (``sparkcache.cli.client``, the only code here that speaks HTTP),
printed as a table or, with ``--json``, as JSON for scripts. ``config check``
is the exception: it validates a file locally, exactly as ``twistd
sparkcache`` would, without starting anything. See docs/cli.rst.

Exit statuses: 0 done; 1 the daemon answered an error (or a prefetch, a
config check failed); 2 bad arguments; 3 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping, Sequence, TextIO

from sparkcache.cli.client import DEFAULT_TIMEOUT, DEFAULT_URL, CLIError, Client

# Tried in order when --token is not given.
TOKEN_VARS = ("SPARKCACHE_TOKEN", "SPARKCACHE_ADMIN_TOKEN")


def common_options(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes; a command's copy has no defaults, so that
    ``sparkcache --json status`` and ``sparkcache status --json`` mean the same."""

    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=d(None),
                        help=f"the daemon's base URL (env SPARKCACHE_URL; default {DEFAULT_URL})")
    common.add_argument("--token", default=d(None),
                        help="a sparkcache token (env " + " or ".join(TOKEN_VARS) + "); never printed")
    common.add_argument("--json", action="store_true", default=d(False), help="print JSON for scripts instead of tables")
    common.add_argument("--timeout", type=float, default=d(DEFAULT_TIMEOUT),
                        help=f"seconds to wait for the daemon (default {DEFAULT_TIMEOUT:g})")
    return common


def parser() -> argparse.ArgumentParser:
    common = common_options(False)
    p = argparse.ArgumentParser(prog="sparkcache", parents=[common_options(True)],
                                description="Inspect and manage a running sparkcache daemon.",
                                epilog="Exit status: 0 done, 1 error answered, 2 usage, 3 daemon unreachable.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        # The common options are accepted after the command too (sparkcache status --json).
        return sub.add_parser(name, help=help, description=help, parents=[common])

    add("status", "health, store size, in-flight fetches and per-remote hit ratios")
    add("remotes", "the configured remotes and where each comes from (file or API)")

    pp = add("purge", "drop cached entries (pinned uploads stay unless named by --path)")
    pp.add_argument("--remote", default=None, help="only this remote")
    pp.add_argument("--path", default=None, help="only this entry of --remote")
    pp.add_argument("--all", action="store_true", default=False, help="the whole cache")

    pf = add("prefetch", "fetch files of a generic remote into the cache now")
    pf.add_argument("remote", help="a generic (or deb, rpm, alpine, helm) remote")
    pf.add_argument("paths", nargs="*", default=[], help="paths under the remote")
    pf.add_argument("--from", dest="from_file", default=None, metavar="FILE",
                    help="read paths from FILE, one a line (- for stdin)")

    add("repos", "the git mirrors: last fetch, refs, size, last error")
    pr = add("refresh", "fetch a git mirror from its upstream now")
    pr.add_argument("repo", help="a mirror's name or upstream URL")

    pe = add("export", "write an air-gap bundle of cached entries (and git mirrors) to FILE")
    pe.add_argument("-o", "--output", required=True, metavar="FILE", help="the bundle file to write")
    pe.add_argument("--remote", action="append", default=None, metavar="NAME", help="only this remote (repeatable)")
    pe.add_argument("--since", default=None, help="only entries fetched since (Unix time or ISO 8601)")
    pe.add_argument("--git", action="store_true", default=False, help="include every git mirror as a git bundle")
    pe.add_argument("--repo", action="append", default=None, metavar="NAME", help="include this git mirror (repeatable)")
    pi = add("import", "load an air-gap bundle FILE into the daemon's store")
    pi.add_argument("file")
    pi.add_argument("--map", action="append", default=None, metavar="OLD=NEW",
                    help="import the bundle's remote OLD as this daemon's remote NEW (repeatable)")

    pc = add("config", "configuration files")
    csub = pc.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cc = csub.add_parser("check", help="validate FILE as the daemon would, without starting it", parents=[common])
    cc.add_argument("file")

    ps = add("setup", "print the client configuration for TOOL (apt, git, pip, containerd...)")
    ps.add_argument("tool")
    ps.add_argument("--remote", default=None, help="the remote the snippet points at")
    ps.add_argument("--registry", default=None, help="OCI: the registry host to mirror")
    ps.add_argument("--param", action="append", default=None, metavar="NAME=VALUE",
                    help="another query parameter of /setup/TOOL (repeatable)")
    return p


Command = Callable[[argparse.Namespace, Client, TextIO], int]


def handlers() -> dict[str, Command]:
    from sparkcache.cli.bundles import export, import_
    from sparkcache.cli.commands import prefetch, purge, refresh, remotes, repos, setup, status

    return {"status": status, "remotes": remotes, "purge": purge, "prefetch": prefetch,
            "repos": repos, "refresh": refresh, "setup": setup, "export": export, "import": import_}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None,
         environ: Mapping[str, str] | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    env = os.environ if environ is None else environ
    args = parser().parse_args(argv)
    if args.command == "config":
        from sparkcache.cli.config_check import check

        return check(args.file, out, err, args.json, env)
    try:
        url = args.url or env.get("SPARKCACHE_URL") or DEFAULT_URL
        token = args.token or next((env[v] for v in TOKEN_VARS if env.get(v)), None)
        client = Client(url, token, args.timeout)
        return handlers()[args.command](args, client, out)
    except CLIError as e:
        err.write(f"sparkcache {args.command}: {e.message}\n")
        return e.exit_code
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
