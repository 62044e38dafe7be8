"""``nsaconf run``: judge oracles on cases against the fp64 truth -> DIR/results.jsonl, run.json,
conventions.jsonl, summary.md, results.csv, report.html.

Exit status: 0 nothing FAILed/ERRORed/CRASHed/TIMEOUTed (and each ``--require`` oracle ran a cell that is
not SKIP), 1 otherwise, 2 bad usage or input.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from nsaconf.cases.vocabulary import CONVENTIONS_FILE, RESULTS_FILE, RUN_INFO_FILE
from nsaconf.harness.cli.common import (UsageError, add_case_options, add_oracle_options, add_tolerance_options,
                                        check_device, command_line, load_oracle_sources, resolved, seconds,
                                        select_cases, select_oracles, tolerance_from_args)


def register(sub) -> None:
    r = sub.add_parser("run", help="run oracles on cases and judge them against the fp64 truth")
    add_case_options(r)
    add_oracle_options(r, "comma-separated oracle names (default: every oracle for --device)")
    r.add_argument("--out", default="out/run", help="output directory (default out/run); a fresh run moves its earlier "
                   "results.jsonl, run.json, conventions.jsonl to the first free suffix .prev, .prev2, ...")
    r.add_argument("--save-tensors", action="store_true", help="write DIR/tensors/<case>/{inputs,reference,oracles/*}.pt")
    r.add_argument("--resume", action="store_true", help="keep DIR/results.jsonl and skip cells already recorded")
    r.add_argument("--timeout", type=seconds, default=300.0,
                   help="seconds per cell, and per oracle for the convention probe (default 300)")
    add_tolerance_options(r)
    r.add_argument("--no-probe", action="store_true", help="skip the convention probe after a profile run")
    r.add_argument("--no-report", action="store_true", help="do not write summary.md/results.csv/report.html")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--shard", metavar="K/N", help="run only cases K, K+N, K+2N, ... of the selection (parallel "
                   "runs; combine them with `nsaconf merge`)")
    r.add_argument("--junit", metavar="FILE", help="also write JUnit XML: one testcase per cell (CI test reports)")
    r.add_argument("--require", metavar="ORACLE,...", default=[], type=lambda s: [n.strip() for n in s.split(",") if n.strip()],
                   help="exit 1 when one of these oracles ran no cell or SKIPped every cell (unavailable, unsupported)")
    r.set_defaults(func=cmd_run)


def write_run_info(out: Path, args: argparse.Namespace, oracles: list[str], n_cases: int, table) -> None:
    """DIR/run.json: the command, the selection, the tolerance table and the versions."""
    from nsaconf.harness.environment import versions

    info = {"command": command_line(),
            "profile": args.profile, "case_files": args.case, "device": args.device, "oracles": oracles,
            "n_cases": n_cases, "shard": args.shard, "seed": args.seed, "timeout_s": args.timeout,
            "plugins": args.plugin, "tolerance": table.as_dict(), "versions": versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / RUN_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")


def write_reports_or_say(out: Path) -> Optional[Path]:
    """summary.md, results.csv, report.html of DIR; a failure is said on stderr (the results stay on disk)."""
    from nsaconf.reports import write_reports

    try:
        return Path(write_reports(out)["html"])
    except Exception as e:  # noqa: BLE001 - the results are on disk; say why the report failed
        print(f"nsaconf: report failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def write_probe(out: Path, oracles: list[str], device: str, plugins: list[str], timeout: float) -> None:
    """DIR/conventions.jsonl: the convention probe of the run's oracles, each in its worker process
    (a crash or timeout is a recorded ``error`` finding; the run goes on)."""
    from nsaconf.harness.probe import leak_check_records, skipped_record

    try:
        recs = leak_check_records(oracles, device, plugins, timeout)
    except Exception as e:  # noqa: BLE001 - the probe must never lose the run's results
        print(f"nsaconf: convention probe failed: {type(e).__name__}: {e}", file=sys.stderr)
        recs = [skipped_record(o, "*", f"probe failed: {type(e).__name__}: {e}", "error") for o in oracles]
    with open(out / CONVENTIONS_FILE, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, default=str) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    from nsaconf.harness.results import keep_previous, owned_run_folder
    from nsaconf.harness.runner import RunConfig, Runner

    table = tolerance_from_args(args)
    load_oracle_sources(args.plugin)
    check_device(args.device)
    cases = select_cases(args)
    oracles = select_oracles(args.oracles, args.device)
    if not oracles:
        raise UsageError(f"no oracle runs on {args.device}")
    if args.require:
        select_oracles(",".join(args.require), args.device)  # an unknown name: exit 2 before the run
    with owned_run_folder(args.out, command_line()) as out:
        if not args.resume:
            keep_previous(out)
        write_run_info(out, args, oracles, len(cases), table)
        print(f"nsaconf: {len(cases)} cases x {len(oracles)} oracles ({', '.join(oracles)}) on {args.device} -> "
              f"{out / RESULTS_FILE}", file=sys.stderr)
        run_cfg = RunConfig(cases=cases, oracles=oracles, device=args.device, out=out, plugins=resolved(args.plugin),
                            save_tensors=args.save_tensors, resume=args.resume, timeout=args.timeout, table=table,
                            progress=not args.no_progress)
        Runner(run_cfg).run()
        html = None if args.no_report else write_reports_or_say(out)
        if args.profile and not args.no_probe:  # the reports above stand if the probe is cut off
            write_probe(out, oracles, args.device, run_cfg.plugins, args.timeout)
            html = None if args.no_report else write_reports_or_say(out)
        from nsaconf.reports.junit import ci_outputs

        unmet = ci_outputs(out, args.junit, args.require)  # --junit FILE, --require ORACLE,...
        counts, bad = cell_verdict(out)
    print(f"nsaconf: {counts}; results: {out / RESULTS_FILE}" + (f"; report: {html}" if html else ""))
    for line in unmet:
        print(f"nsaconf: required oracle {line}", file=sys.stderr)
    return 1 if bad or unmet else 0


def cell_verdict(out: Path) -> tuple[str, bool]:
    """The status counts of DIR's cells and whether one is bad, as the reports read them: the last record of a
    cell wins (``--resume`` covers earlier invocations too) and a status outside STATUSES is bad."""
    from nsaconf.reports.load import load

    res = load(out)
    counts = " ".join(f"{k}={v}" for k, v in sorted(res.counts.items())) or "no cells"
    if res.malformed:
        counts += f" ({len(res.malformed)} malformed line(s) not counted)"
    return counts, res.verdict == "FAIL"
