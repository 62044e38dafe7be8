"""``nsaconf search --oracles A[,B]``: draw cases each oracle supports (Hypothesis), judge each with the engine,
shrink the first failure to a minimal case; print it, its diagnosis and the ``nsaconf repro`` line, write it to
the regression corpus, and DIR/results.jsonl + the reports of every draw judged.

Exit status: 0 no failure found, 1 a failure found (a minimal case printed), 2 bad usage or input.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nsaconf.cases.vocabulary import REGRESSIONS, RESULTS_FILE
from nsaconf.harness.cli.common import (UsageError, add_oracle_options, add_tolerance_options, check_device, command_line,
                                        load_oracle_sources, resolved, seconds, select_oracles, tolerance_from_args)
from nsaconf.harness.cli.run import check_tolerance_keys, write_reports_or_say

DEFAULT_SECONDS = 60.0


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def register(sub) -> None:
    s = sub.add_parser("search", help="search the case space for a failure and shrink it to a minimal case")
    add_oracle_options(s, "comma-separated oracle names (required)")
    budget = s.add_mutually_exclusive_group()
    budget.add_argument("--time", type=seconds, metavar="S",
                        help=f"seconds for the whole search, shrinking included, split between the oracles "
                        f"(default {DEFAULT_SECONDS:g} unless --examples)")
    budget.add_argument("--examples", type=_count, metavar="N", help="judge at most N cases per oracle (no time limit)")
    s.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0; the same seed draws the same cases)")
    s.add_argument("--out", default="out/search", help="output directory: results.jsonl, search.json, the reports and "
                   "the Hypothesis example database (hypothesis/), which a re-run replays first (default out/search)")
    s.add_argument("--corpus", default=str(Path("cases") / REGRESSIONS), metavar="DIR",
                   help=f"regression corpus: each minimal failing case goes to DIR/<oracle>/<case_id>.json "
                   f"(default cases/{REGRESSIONS}; `nsaconf run --case DIR` replays it)")
    s.add_argument("--no-corpus", action="store_true", help="write no corpus entry")
    s.add_argument("--checks", metavar="NAME,...", help="also judge the checks that need no truth (all, or some of "
                   "inputs_unchanged, determinism, decode_consistency, batch_independence, gqa_equivariance, causality)")
    s.add_argument("--max-seq-len", type=_count, default=128, metavar="T", help="longest sequence drawn (default 128)")
    s.add_argument("--max-heads", type=_count, default=32, metavar="HQ",
                   help="most query heads drawn, H * G (default 32; an oracle that needs more G gets its smallest)")
    s.add_argument("--timeout", type=seconds, default=300.0, help="seconds per cell (default 300)")
    add_tolerance_options(s)
    s.add_argument("--no-report", action="store_true", help="do not write summary.md/results.csv/report.html")
    s.set_defaults(func=cmd_search)


def repro_line(f, device: str, plugins: list[str], tol: list[str]) -> str:
    """The ``nsaconf repro`` command of a finding: its corpus file when written (the exact case), else its id."""
    from nsaconf.harness.check import repro_command

    line = repro_command(str(f.corpus_path) if f.corpus_path else f.case.id, f.oracle, device, plugins, tol)
    return line + (f" --checks {f.sig[1]}" if f.sig[1] else "")


def cmd_search(args: argparse.Namespace) -> int:
    from nsaconf.harness.checks import CheckError, parse_checks
    from nsaconf.harness.environment import versions
    from nsaconf.harness.results import keep_previous, owned_run_folder
    from nsaconf.harness.search import SEARCH_FILE, SearchConfig, SearchError, need_hypothesis, search

    try:
        need_hypothesis()
        checks = parse_checks(args.checks)
    except (SearchError, CheckError) as e:
        raise UsageError(str(e)) from None
    if not args.oracles:
        raise UsageError("search needs --oracles (comma-separated oracle names)")
    table = tolerance_from_args(args)
    load_oracle_sources(args.plugin)
    check_tolerance_keys(table)
    check_device(args.device)
    oracles = select_oracles(args.oracles, args.device)
    budget = None if args.examples else (args.time or DEFAULT_SECONDS)
    with owned_run_folder(args.out, command_line()) as out:
        keep_previous(out)
        cfg = SearchConfig(oracles=oracles, device=args.device, out=out, plugins=resolved(args.plugin), seconds=budget,
                           examples=args.examples, seed=args.seed, corpus=None if args.no_corpus else Path(args.corpus),
                           max_seq_len=args.max_seq_len, max_heads=args.max_heads, checks=checks, table=table, timeout=args.timeout,
                           command=command_line())
        t0 = time.monotonic()
        print(f"nsaconf: search {', '.join(oracles)} on {args.device} for "
              + (f"{budget:g}s" if budget else f"{args.examples} case(s) per oracle") + f" (seed {args.seed}) -> "
              f"{out / RESULTS_FILE}", file=sys.stderr)
        try:
            results = search(cfg)
        except SearchError as e:
            raise UsageError(str(e)) from None
        info = {"command": command_line(), "oracles": oracles, "device": args.device, "seed": args.seed,
                "time_s": budget, "examples": args.examples, "max_seq_len": args.max_seq_len, "max_heads": args.max_heads, "checks": list(checks),
                "plugins": args.plugin, "tolerance": table.as_dict(), "versions": versions(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(time.monotonic() - t0, 2),
                "oracle_searches": [r.to_dict() for r in results]}
        (out / SEARCH_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
        html = None if args.no_report or not (out / RESULTS_FILE).exists() else write_reports_or_say(out)
    found = False
    for r in results:
        if not r.findings:
            print(f"{r.oracle}: no failure in {r.judged} case(s) ({r.seconds:.1f}s){'; ' + r.note if r.note else ''}")
        for f in r.findings:
            found = True
            what = f"{f.sig[0]}" + (f" ({f.sig[1]})" if f.sig[1] else "")
            print(f"{r.oracle}: {what} first at draw {f.draws_to_first} ({f.seconds_to_first:.1f}s, {f.first_case.id}); "
                  f"shrunk in {f.shrink_steps} step(s) to the minimal case ({r.judged} case(s) judged, {r.seconds:.1f}s):")
            print(f"  {f.case.id}")
            print(f"  {sizes_line(f)}")
            print(f"  {f.case.to_json()}")
            for c in f.cells:
                print(f"  {c.status} {c.branch}: {' '.join(c.reason.split())[:300]}")
            if f.diagnosis:
                print(f"  diagnosis: {f.diagnosis['text']}")
            if f.corpus_path:
                print(f"  corpus: {f.corpus_path}")
            print(f"  repro: {repro_line(f, args.device, args.plugin, args.tol)}")
    print(f"nsaconf: search {'found a failure' if found else 'found no failure'}; results: {out / RESULTS_FILE}"
          + (f"; report: {html}" if html else ""))
    return 1 if found else 0


def sizes_line(f) -> str:
    from nsaconf.harness.search import sizes

    return sizes(f.case)
