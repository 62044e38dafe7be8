"""``nsaconf new-plugin FILE``: write the worked plugin example (``oracles/plugin_example.py``, shipped with
the package) to FILE, to edit into an adapter of your own implementation."""
from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from nsaconf.harness.cli.common import UsageError


def register(sub) -> None:
    p = sub.add_parser("new-plugin", help="write the worked plugin example to FILE (a start for your own adapter)")
    p.add_argument("file", help="where to write it (must not exist)")
    p.set_defaults(func=cmd_new_plugin)


def example_text() -> str:
    """The text of the shipped plugin example."""
    return resources.files("nsaconf.oracles").joinpath("plugin_example.py").read_text(encoding="utf-8")


def cmd_new_plugin(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.exists():
        raise UsageError(f"{str(path)!r} exists; choose a new file name")
    try:
        path.write_text(example_text(), encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    print(f"nsaconf: wrote {path}; try it: nsaconf run --plugin {path} --oracles my_sdpa_window --profile smoke")
    return 0
