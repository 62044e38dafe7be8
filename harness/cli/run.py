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
    r.add_argument("--diagnosis-budget", type=_budget, default=None, metavar="SECONDS",
                   help="seconds per case to name the convention each FAIL cell matches (default 10; 0: no diagnosis)")
    r.add_argument("--no-probe", action="store_true", help="skip the convention probe after a profile run")
    r.add_argument("--no-report", action="store_true", help="do not write summary.md/results.csv/report.html")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--shard", metavar="K/N", help="run only cases K, K+N, K+2N, ... of the selection (parallel "
                   "runs; combine them with `nsaconf merge`)")
    r.add_argument("--junit", metavar="FILE", help="also write JUnit XML: one testcase per cell (CI test reports)")
    r.add_argument("--require", metavar="ORACLE,...", default=[], type=lambda s: [n.strip() for n in s.split(",") if n.strip()],
                   help="exit 1 when one of these oracles ran no cell or SKIPped every cell (unavailable, unsupported)")
    r.add_argument("--checks", metavar="NAME,...", help="also judge the checks that need no truth, each a cell per case "
                   "and oracle: all, or some of inputs_unchanged, determinism, decode_consistency, batch_independence, "
                   "gqa_equivariance, causality")
    add_limit_options(r)
    r.set_defaults(func=cmd_run)


def _budget(text: str) -> float:
    """argparse type of ``--diagnosis-budget``: a finite number of seconds >= 0."""
    return 0.0 if text.strip() in ("0", "0.0") else seconds(text)


def _size(text: str) -> int:
    from nsaconf.oracles.resources import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _work(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of multiply-adds >= 1, got {text!r}")
    return value


def add_limit_options(p: argparse.ArgumentParser) -> None:
    """``--max-memory`` and ``--max-work``: what one case's float64 truth may need (``oracles.resources``)."""
    p.add_argument("--max-memory", type=_size, metavar="SIZE",
                   help="the most memory the float64 truth of one case may need, estimated before anything is "
                   "allocated, e.g. 8GB, 512MB, 2GiB (default: [limits] max_memory of the config, else 8GB); a "
                   "profile's case over it is a SKIP cell, a --case over it an error")
    p.add_argument("--max-work", type=_work, metavar="N",
                   help="the most multiply-adds the float64 truth of one case may need, likewise (default: [limits] "
                   "max_work of the config, else 2e12 on cpu, about 10 minutes of 2 cores, and 2e14 on cuda)")


def check_tolerance_keys(table) -> None:
    """ToleranceError for a ``--tol`` or ``[tolerance]`` key naming no registered oracle (after the plugins load)."""
    from nsaconf.oracles.base import registry

    table.check_oracles(registry())


def case_limits(args: argparse.Namespace) -> tuple[int, float]:
    """(bytes, multiply-adds) one case's truth may need: the options, else the config's ``[limits]``, else the
    defaults of ``oracles.resources``."""
    from nsaconf.oracles.config import ConfigError, load_config
    from nsaconf.oracles.resources import DEFAULT_MAX_MEMORY, DEFAULT_MAX_WORK

    limits = load_config(args.config).get("limits", {})
    out = []
    for name, parse, default in (("max_memory", _size, DEFAULT_MAX_MEMORY),
                                 ("max_work", _work, DEFAULT_MAX_WORK[args.device.split(":")[0]])):
        value = getattr(args, name)
        if value is None and name in limits:
            try:
                value = parse(str(limits[name]))
            except argparse.ArgumentTypeError as e:
                raise ConfigError(f"config [limits] {name}: {e}") from None
        out.append(default if value is None else value)
    return out[0], out[1]


def over_limits(args: argparse.Namespace, cases: list) -> dict[str, str]:
    """Case id -> why its truth is over ``case_limits``, for the cases of ``--profile``; a case of a ``--case``
    file over them is a CaseError (exit 2 before anything is written)."""
    from nsaconf.cases.model import CaseError
    from nsaconf.oracles.resources import resource_problem

    max_bytes, max_work = case_limits(args)
    over = {c.id: why for c in cases if (why := resource_problem(c, max_bytes, max_work))}
    if over:
        profile = {c.id for c in select_cases(argparse.Namespace(**{**vars(args), "case": [], "shard": None}))} \
            if args.profile else set()
        explicit = [cid for cid in over if cid not in profile]
        if explicit:
            raise CaseError(f"case {explicit[0]}: {over[explicit[0]]} (raise the limit to run it)")
    return over


def write_skipped(out: Path, cases: list, over: dict[str, str], oracles: list[str], device: str, resume: bool) -> None:
    """A SKIP cell with the reason for every branch of every oracle on each case over the limits (after the run,
    so that they join its results; with ``--resume`` the cells already recorded are kept)."""
    from nsaconf.harness.environment import versions
    from nsaconf.harness.results import ResultWriter, done_keys
    from nsaconf.harness.runner import _record
    from nsaconf.oracles.base import get_oracle

    done = done_keys(out) if resume else set()
    base = versions()
    with ResultWriter(out, resume=True) as writer:
        for case in (c for c in cases if c.id in over):
            for name in oracles:
                oracle = get_oracle(name)
                for b in oracle.branches:
                    if (case.id, name, b, device) not in done:
                        writer.write(_record(case, oracle, b, device, "SKIP", over[case.id], versions=base))


def write_run_info(out: Path, args: argparse.Namespace, oracles: list[str], n_cases: int, table) -> None:
    """DIR/run.json: the command, the selection, the tolerance table and the versions."""
    from nsaconf.harness.environment import versions

    info = {"command": command_line(),
            "profile": args.profile, "case_files": args.case, "device": args.device, "oracles": oracles,
            "n_cases": n_cases, "shard": args.shard, "seed": args.seed, "timeout_s": args.timeout,
            "max_memory": args.max_memory, "max_work": args.max_work, "checks": args.checks,
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

    from nsaconf.harness.checks import CheckError, parse_checks

    try:
        checks = parse_checks(args.checks)
    except CheckError as e:
        raise UsageError(str(e)) from None
    table = tolerance_from_args(args)
    load_oracle_sources(args.plugin)
    check_tolerance_keys(table)
    check_device(args.device)
    cases = select_cases(args)
    oracles = select_oracles(args.oracles, args.device)
    if not oracles:
        raise UsageError(f"no oracle runs on {args.device}")
    if args.require:
        select_oracles(",".join(args.require), args.device)  # an unknown name: exit 2 before the run
    args.max_memory, args.max_work = case_limits(args)
    over = over_limits(args, cases)
    with owned_run_folder(args.out, command_line()) as out:
        if not args.resume:
            keep_previous(out)
        write_run_info(out, args, oracles, len(cases), table)
        print(f"nsaconf: {len(cases)} cases x {len(oracles)} oracles ({', '.join(oracles)}) on {args.device} -> "
              f"{out / RESULTS_FILE}", file=sys.stderr)
        if over:
            print(f"nsaconf: {len(over)} case(s) over --max-memory/--max-work are SKIP cells", file=sys.stderr)
        run_cfg = RunConfig(cases=[c for c in cases if c.id not in over], oracles=oracles, device=args.device, out=out,
                            plugins=resolved(args.plugin), save_tensors=args.save_tensors, resume=args.resume,
                            timeout=args.timeout, table=table, progress=not args.no_progress, checks=checks,
                            **({} if args.diagnosis_budget is None else {"diagnosis_budget": args.diagnosis_budget}))
        Runner(run_cfg).run()
        if over:
            write_skipped(out, cases, over, oracles, args.device, args.resume)
        html = None if args.no_report else write_reports_or_say(out)
        if args.profile and not args.no_probe:  # the reports above stand if the probe is cut off
            write_probe(out, oracles, args.device, run_cfg.plugins, args.timeout)
            html = None if args.no_report else write_reports_or_say(out)
        from nsaconf.reports.junit import ci_outputs

        unmet = ci_outputs(out, args.junit, args.require)  # --junit FILE, --require ORACLE,...
        counts, bad = cell_verdict(out)
        for line in cause_lines(out):
            print(line, file=sys.stderr)
    print(f"nsaconf: {counts}; results: {out / RESULTS_FILE}" + (f"; report: {html}" if html else ""))
    for line in unmet:
        print(f"nsaconf: required oracle {line}", file=sys.stderr)
    return 1 if bad or unmet else 0


MAX_CAUSE_LINES = 20


def cause_lines(out: Path) -> list[str]:
    """The bad cells of DIR by cause (``reports.tables.failure_groups``, the probe's findings joined): a
    headline, then one line per (oracle, diagnosis); [] when no cell is bad or none was diagnosed."""
    from nsaconf.reports.load import load
    from nsaconf.reports.tables import diagnosis_headline, failure_groups, finding_line

    res = load(out)
    groups = failure_groups(res.bad, res.probe_records())
    if not groups:
        return []
    lines = [f"nsaconf: {diagnosis_headline(groups)}:"]
    for g in groups[:MAX_CAUSE_LINES]:
        n = len(g.records)
        line = f"  {g.oracle}: {g.title} — {n} cell{'s' if n != 1 else ''} ({', '.join(g.branches)})"
        probe = [finding_line(f, g.key) for f in g.findings]
        lines.append(line + (f"; probe: {'; '.join(probe)}" if probe else ""))
    if len(groups) > MAX_CAUSE_LINES:
        lines.append(f"  … and {len(groups) - MAX_CAUSE_LINES} more (summary.md)")
    return lines


def cell_verdict(out: Path) -> tuple[str, bool]:
    """The status counts of DIR's cells and whether one is bad, as the reports read them: the last record of a
    cell wins (``--resume`` covers earlier invocations too) and a status outside STATUSES is bad."""
    from nsaconf.reports.load import load

    res = load(out)
    counts = " ".join(f"{k}={v}" for k, v in sorted(res.counts.items())) or "no cells"
    if res.malformed:
        counts += f" ({len(res.malformed)} malformed line(s) not counted)"
    return counts, res.verdict == "FAIL"
