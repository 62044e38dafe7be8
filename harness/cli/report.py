"""``nsaconf report DIR`` rebuilds DIR's summary.md, results.csv and report.html from DIR/results.jsonl;
``nsaconf merge OUT DIR...`` joins run directories (e.g. ``--shard`` runs) into OUT and writes its reports."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nsaconf.cases.vocabulary import RESULTS_FILE
from nsaconf.harness.cli.common import UsageError, command_line


def register(sub) -> None:
    rep = sub.add_parser("report", help="rebuild DIR/summary.md, results.csv, report.html from DIR/results.jsonl")
    rep.add_argument("dir")
    rep.set_defaults(func=cmd_report)
    mg = sub.add_parser("merge", help="merge run directories (e.g. --shard runs) into OUT and write its reports")
    mg.add_argument("out", help="output directory (created; its earlier results.jsonl, run.json, conventions.jsonl "
                    "are moved to the first free suffix .prev, .prev2, ...)")
    mg.add_argument("dirs", nargs="+", help="run directories, each with results.jsonl (a later one wins a repeated cell)")
    mg.set_defaults(func=cmd_merge)


def cmd_report(args: argparse.Namespace) -> int:
    from nsaconf.reports import ReportError, write_reports

    out = Path(args.dir)
    if not (out / RESULTS_FILE).exists():
        raise UsageError(f"{str(out / RESULTS_FILE)!r} does not exist")
    try:
        html = write_reports(out)["html"]
    except (ReportError, OSError, ValueError) as e:
        raise UsageError(f"cannot build reports from {str(out)!r}: {e}") from None
    print(f"nsaconf: reports written to {out} (report: {html})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from nsaconf.harness.results import merge_runs, owned_run_folder

    with owned_run_folder(args.out, command_line()) as out:
        try:
            n, skipped = merge_runs([Path(d) for d in args.dirs], out)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
        if skipped:
            print(f"nsaconf: warning: skipped {skipped} line(s) of the inputs that are not result records", file=sys.stderr)
        print(f"nsaconf: merged {n} cells from {len(args.dirs)} run directories into {out / RESULTS_FILE}", file=sys.stderr)
        return cmd_report(argparse.Namespace(dir=str(out)))
