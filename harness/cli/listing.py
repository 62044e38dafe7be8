"""``nsaconf list``: every oracle with its layer, devices, dtypes, branches and availability here."""
from __future__ import annotations

import argparse
import json

from nsaconf.harness.cli.common import load_oracle_sources


def register(sub) -> None:
    p = sub.add_parser("list", help="list oracles and their availability")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE", help="Python file registering oracles (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON list instead of text")
    p.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    from nsaconf.oracles.base import registry

    load_oracle_sources(args.plugin)
    rows = []
    for name, cls in sorted(registry().items()):
        try:
            why = cls().availability()
        except Exception as e:  # noqa: BLE001 - foreign code: said, not raised
            why = f"availability() raised {type(e).__name__}: {e}"
        rows.append((name, cls, why))
    if args.json:
        print(json.dumps([{"name": n, "layer": c.layer, "devices": list(c.devices), "dtypes": list(c.dtypes),
                           "branches": list(c.branches), "needs_block_indices": c.needs_block_indices,
                           "available": w is None, "unavailable_reason": w, "description": c.description}
                          for n, c, w in rows], indent=1))
        return 0
    for name, cls, why in rows:
        state = "available" if why is None else "UNAVAILABLE"
        print(f"{name:<16} {cls.layer:<9} {state:<11} devices={','.join(cls.devices)} dtypes={','.join(cls.dtypes)}"
              f" branches={','.join(cls.branches)}{' (needs block indices)' if cls.needs_block_indices else ''}")
        if cls.description:
            print(f"{'':<16} {cls.description}")
        if why:
            print(f"{'':<16} -> {why}")
    return 0
