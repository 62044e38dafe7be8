"""The ``nsaconf`` command (also ``python -m nsaconf``): a table of subcommands, one module each.

Each module in ``COMMANDS`` has ``register(subparsers)``, which adds its parser and sets ``func``; they share
the options and the selection of cases and oracles of ``common``. Every user error is one line
``nsaconf: error: ...`` and exit status 2; otherwise a subcommand returns its own exit status (``run``:
0 nothing FAILed/ERRORed/CRASHed/TIMEOUTed, 1 otherwise).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

from nsaconf._version import __version__
from nsaconf.harness.cli.common import Parser, fail, user_errors

#: subcommand -> module of this package
COMMANDS = {
    "run": "run",              # judge oracles on cases -> results.jsonl + reports
    "list": "listing",         # oracles and their availability
    "repro": "repro",          # rerun one case, print the comparison
    "report": "report",        # rebuild the reports of a run
    "merge": "report",         # join run directories (e.g. --shard runs) and write their reports
    "masks": "masks",          # classify conventions from behaviour (convention probe)
    "search": "search",        # draw cases, shrink the first failure to a minimal case (Hypothesis)
    "bench": "bench",          # GPU timings
    "new-plugin": "new_plugin",  # write the plugin example to start an adapter
}


def build_parser() -> Parser:
    p = Parser(prog="nsaconf", description="Conformance harness for Native Sparse Attention implementations")
    p.add_argument("--version", action="version", version=f"nsaconf {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(f"{__name__}.{module}").register(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    errors = user_errors()
    before = os.environ.get("NSACONF_CONFIG")
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "config", None):  # adapters and worker processes read the same file
            os.environ["NSACONF_CONFIG"] = str(Path(args.config).resolve())
        return int(args.func(args) or 0)
    except errors as e:
        return fail(e)
    except KeyboardInterrupt:
        print("nsaconf: interrupted (results written so far are kept)", file=sys.stderr)
        return 130
    finally:  # the command's --config does not outlive the command (main may be called again in-process)
        if before is None:
            os.environ.pop("NSACONF_CONFIG", None)
        else:
            os.environ["NSACONF_CONFIG"] = before
