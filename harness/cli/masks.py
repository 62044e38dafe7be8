"""``nsaconf masks``: which masking conventions does each oracle really compute?

Per oracle and branch: the convention classified from behaviour (``harness.probe``), causality leaks,
and an ASCII diff of the measured dependency matrix M against the expected mask::

    .  no dependency, expected      #  dependency, expected
    +  extra dependency             -  missing dependency       ~  ignored (through the oracle's own top-k)

T <= 64 prints every cell; larger T is shrunk by an integer factor (a cell shows the most severe char
of its block). ``--json`` prints one JSON object per (oracle, branch); ``--html FILE`` writes a page
with heatmaps; ``--md FILE`` a markdown report (docs/results/conventions.md).
``--module pkg.mod:factory --dim N`` probes a whole module in this process instead: ``factory()`` returns a
callable ``[B, T, dim] -> [B, T, dim']`` (e.g. an ``nn.Module`` with its projections).
Exit codes: 0 (1 with ``--fail-on-leak`` when a leak or mismatch is found), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from nsaconf.harness.cli.common import (UsageError, add_oracle_options, check_device, load_oracle_sources, resolved,
                                        seconds)


def register(sub) -> None:
    """Add the ``masks`` subcommand to ``nsaconf``'s subparsers."""
    p = sub.add_parser("masks", help="classify each oracle's masking conventions from behaviour",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=cmd_masks)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_oracle_options(p, "comma-separated oracle names (default: every registered oracle)", device=False)
    p.add_argument("--branch", action="append", default=[], metavar="B",
                   help="cmp, slc, swa or e2e (repeatable or comma-separated; default: every branch the oracle returns)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16, help="selection block l' (also l and d unless given)")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--cmp-block", type=int, help="compression block l (default: block size)")
    p.add_argument("--cmp-stride", type=int, help="compression stride d (default: compression block)")
    p.add_argument("--top-n", type=int, default=4)
    p.add_argument("--cmp-mask", help="configure the probe case's cmp_mask (oracles that follow the case)")
    p.add_argument("--window-keys", help="configure the probe case's window_keys")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per oracle/branch on stdout")
    p.add_argument("--html", metavar="FILE", help="write a standalone HTML page with heatmaps")
    p.add_argument("--md", metavar="FILE", help="write a markdown report")
    p.add_argument("--width", type=int, default=64, help="max ASCII diff width (default 64)")
    p.add_argument("--summary", action="store_true", help="text output without the ASCII diffs")
    p.add_argument("--from-json", metavar="FILE", help="no probing: render --md/--html/text from the JSON Lines of "
                   "earlier `--json` runs (e.g. one run per oracle, each under its own time limit)")
    p.add_argument("--timeout", type=seconds, default=300.0, metavar="S",
                   help="limit of each oracle's probe in its worker process, seconds (default 300)")
    p.add_argument("--fail-on-leak", action="store_true", help="exit 1 when a leak, a mismatch or an oracle error is found")
    p.add_argument("--module", metavar="PKG.MOD:FACTORY", help="probe a module in this process: FACTORY() returns a callable "
                   "[B, T, dim] -> [B, T, dim'] (e.g. an nn.Module); PKG.MOD may be a .py file; takes --dim, --seq-len")
    p.add_argument("--dim", type=int, help="the model width of --module's input [B, T, dim]")


def _branches(values: list[str]) -> Optional[tuple[str, ...]]:
    from nsaconf.cases.vocabulary import BRANCH_ALIASES

    names = [v.strip() for item in values for v in item.split(",") if v.strip()]
    bad = [n for n in names if n not in BRANCH_ALIASES]
    if bad:
        raise UsageError(f"unknown branch {bad[0]!r}; use one of cmp, slc, swa, e2e")
    return tuple(dict.fromkeys(BRANCH_ALIASES[n] for n in names)) or None


_NUMBER = (int, float)
#: what the text, markdown and HTML renderings read of a probe record: field -> the types it may hold
#: (None: any value, present); a skipped record needs only the first three and ``skipped``
_COMMON_FIELDS = {"oracle": None, "branch": None, "finding": str}
_PROBED_FIELDS = {"convention": str, "leaks": int, "differing_cells": None, "diff_against": None, "seq_len": None,
                  "cmp_block": None, "cmp_stride": None, "block_size": None, "window": None, "dtype": None,
                  "block_indices": None, "threshold": _NUMBER, "noise": _NUMBER, "calls": None, "matrix": list}


def _record_problem(r: object) -> Optional[str]:
    """Why ``r`` cannot be rendered as a probe record (a missing or mistyped field), or None."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not an object"
    fields = dict(_COMMON_FIELDS)
    if not r.get("skipped"):
        fields.update(_PROBED_FIELDS, min_signal=(type(None), *_NUMBER))
        if r.get("convention") == "unknown":
            fields["nearest"] = None
        if r.get("leaks"):
            fields["first_leak"] = list
        if r.get("differences"):
            fields.update(differences=list, differing_vs_reference=None)
    for name, types in fields.items():
        if name not in r:
            return f"no {name!r}"
        if types is not None and (not isinstance(r[name], types) or isinstance(r[name], bool)):
            return f"{name!r} is {json.dumps(r[name])[:40]}"
    if r.get("skipped"):
        return None
    rows = [r["matrix"]] + [r[k] for k in ("expected_matrix", "dont_care") if r.get(k) is not None]
    if any(not isinstance(m, list) or len(m) < len(r["matrix"]) or not all(isinstance(x, str) for x in m) for m in rows):
        return "'matrix', 'expected_matrix' or 'dont_care' is not a list of row strings"
    if r.get("differences") and not all(isinstance(d, list) and len(d) == 3 for d in r["differences"]):
        return "'differences' is not a list of [p, s, kind]"
    return None


def _load_records(path: str, names: Optional[list[str]], branches) -> list[dict]:
    """Probe records from a ``--json`` output file (ValueError naming the file and line when malformed)."""
    recs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read --from-json {path!r}: {e.strerror or e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON probe record ({e.msg})") from None
        why = _record_problem(r)
        if why:
            raise ValueError(f"{path}:{i}: not a probe record ({why})")
        if (names is None or r["oracle"] in names) and (branches is None or r["branch"] in branches):
            recs.append(r)
    return recs


def cmd_masks(args: argparse.Namespace) -> int:
    from nsaconf.cases.vocabulary import CMP_MASKS, WINDOW_KEYS
    from nsaconf.harness.environment import where
    from nsaconf.harness.probe import ProbeConfig, probe_records
    from nsaconf.oracles.base import registry
    from nsaconf.reports.conventions import format_markdown, format_text

    if args.module or args.dim is not None:
        return cmd_module(args)
    load_oracle_sources(args.plugin)
    branches = _branches(args.branch)
    check_device(args.device, indexed=True)
    if args.cmp_mask and args.cmp_mask not in CMP_MASKS:
        raise UsageError(f"unknown --cmp-mask {args.cmp_mask!r}; use one of {', '.join(CMP_MASKS)}")
    if args.window_keys and args.window_keys not in WINDOW_KEYS:
        raise UsageError(f"unknown --window-keys {args.window_keys!r}; use one of {', '.join(WINDOW_KEYS)}")
    if args.width < 8:
        raise UsageError(f"--width must be >= 8, got {args.width}")
    cfg = ProbeConfig(seq_len=args.seq_len, block_size=args.block_size, window=args.window, cmp_block=args.cmp_block,
                      cmp_stride=args.cmp_stride, top_n=args.top_n, seed=args.seed)
    names = [n.strip() for n in args.oracles.split(",") if n.strip()] if args.oracles else None

    def emit(r: dict) -> None:  # streamed: a run cut off by a time limit keeps the oracles already probed
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(format_text(r, args.width, diff=not args.summary) + ("" if args.summary else "\n"), flush=True)

    if args.from_json:
        try:
            records = _load_records(args.from_json, names, branches)
        except ValueError as e:
            raise UsageError(str(e)) from None
        for r in records:
            emit(r)
    else:
        records = probe_records(names or sorted(registry()), args.device, cfg, branches, args.cmp_mask,
                                args.window_keys, emit=emit, plugins=resolved(args.plugin), timeout=args.timeout)
    try:
        if args.html:
            from nsaconf.reports.conventions import render_standalone

            Path(args.html).write_text(render_standalone(records), encoding="utf-8")
        if args.md:
            Path(args.md).write_text(format_markdown(records, where(args.device), args.width), encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write output: {e}") from None
    bad = any(r.get("finding") in ("leak", "mismatch", "error") for r in records)
    return 1 if (args.fail_on_leak and bad) else 0


# ------------------------------------------------------------------------------------------ --module
MODULE_CONFLICTS = ("oracles", "plugin", "branch", "from_json", "html", "md", "cmp_mask", "window_keys")


def load_factory(spec: str):
    """``pkg.mod:factory`` or ``path/file.py:factory`` -> the factory (UsageError naming the problem)."""
    import importlib
    import importlib.util
    import sys

    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise UsageError(f"--module must be PKG.MOD:FACTORY or FILE.py:FACTORY, got {spec!r}")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise UsageError(f"--module file {where!r} does not exist")
            loc = importlib.util.spec_from_file_location(f"nsaconf_module_{Path(where).stem}", where)
            mod = importlib.util.module_from_spec(loc)
            loc.loader.exec_module(mod)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # as `python -m` would: the user's package in this folder
            mod = importlib.import_module(where)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code failed to import
        raise UsageError(f"--module {spec}: cannot import {where!r}: {type(e).__name__}: {e}") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UsageError(f"--module {spec}: {where!r} has no callable {attr!r}")
    return factory


def cmd_module(args: argparse.Namespace) -> int:
    """``--module``: the receptive field of ``factory()`` on ``[B, --seq-len, --dim]`` tokens, printed with its
    causality verdict (or one JSON object with ``--json``); exit 1 on a leak with ``--fail-on-leak``."""
    import torch

    from nsaconf.harness.probe import bits, probe_module
    from nsaconf.reports.conventions import format_module_text

    bad = [f"--{o.replace('_', '-')}" for o in MODULE_CONFLICTS if getattr(args, o)]
    if not args.module or bad:
        raise UsageError("--dim goes with --module" if not args.module else f"--module does not take {', '.join(bad)}")
    if args.dim is None or args.dim < 1 or args.seq_len < 2:
        raise UsageError("--module needs --dim N >= 1 (the width of its input [B, T, dim]) and --seq-len >= 2")
    if args.width < 8:
        raise UsageError(f"--width must be >= 8, got {args.width}")
    check_device(args.device, indexed=True)
    factory = load_factory(args.module)
    try:
        fn = factory()
    except Exception as e:  # noqa: BLE001 - the user's code failed
        raise UsageError(f"--module {args.module}: the factory raised {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise UsageError(f"--module {args.module}: the factory returned a {type(fn).__name__}, not a callable")
    dtype = torch.float64
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(args.device).eval()
        dtype = next((t.dtype for t in [*fn.parameters(), *fn.buffers()] if t.is_floating_point()), torch.float64)
    try:
        mp = probe_module(fn, seq_len=args.seq_len, dim=args.dim, device=args.device, dtype=dtype, seed=args.seed)
    except Exception as e:  # noqa: BLE001 - the user's module failed on the probe's input
        raise UsageError(f"--module {args.module} failed on input [B, {args.seq_len}, {args.dim}]: "
                         f"{type(e).__name__}: {e}") from None
    rec = {"module": args.module, "seq_len": args.seq_len, "dim": args.dim, "dtype": str(dtype).removeprefix("torch."),
           "device": args.device, "causal": mp.causal, "leaks": mp.leaks,
           "first_leak": list(mp.first_leak) if mp.first_leak else None,
           "dependencies": int((mp.matrix & torch.ones_like(mp.matrix).tril()).sum()),
           "threshold": mp.threshold, "noise": mp.noise, "calls": mp.calls, "matrix": bits(mp.matrix)}
    print(json.dumps(rec) if args.json else format_module_text(rec, args.width, diff=not args.summary))
    return 1 if (args.fail_on_leak and mp.leaks) else 0
