"""``nsaconf repro CASE_ID|FILE --oracles X``: rerun one case and print the comparison per branch
(exit 1 when a cell FAILed/ERRORed/CRASHed/TIMEOUTed)."""
from __future__ import annotations

import argparse
from pathlib import Path

from nsaconf.cases.model import Case, CaseError, load_cases
from nsaconf.cases.vocabulary import BAD_STATUSES
from nsaconf.harness.cli.common import (UsageError, add_oracle_options, add_tolerance_options, check_device,
                                        load_oracle_sources, resolved, seconds, select_oracles, tolerance_from_args)
from nsaconf.harness.cli.run import add_limit_options, case_limits, check_tolerance_keys
from nsaconf.harness.results import CellResult


def register(sub) -> None:
    rp = sub.add_parser("repro", help="rerun one case and print the comparison")
    rp.add_argument("case", help="a case id (as in results.jsonl) or a case JSON file")
    add_oracle_options(rp, "comma-separated oracle names (required)")
    add_tolerance_options(rp)
    rp.add_argument("--isolate", action="store_true", help="run the oracles in worker processes")
    rp.add_argument("--timeout", type=seconds, default=300.0, help="per-cell timeout in seconds with --isolate (default 300)")
    rp.add_argument("--save-tensors", metavar="DIR", help="also write the tensor contract to DIR")
    rp.add_argument("--checks", metavar="NAME,...", help="also judge these checks that need no truth (all, or some of "
                    "inputs_unchanged, determinism, decode_consistency, batch_independence, gqa_equivariance, causality)")
    add_limit_options(rp)
    rp.set_defaults(func=repro)


def resolve_cases(spec: str) -> list[Case]:
    """A case JSON file (any format ``load_cases`` reads) or a case id."""
    if Path(spec).is_file():
        return load_cases(spec)
    if spec.endswith(".json") or "/" in spec:
        raise CaseError(f"case file {spec!r} does not exist")
    return [Case.from_id(spec)]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def format_cells(cells: list[CellResult]) -> str:
    """A fixed-width table: oracle, branch, status, err, baseline, bound, ratio, rel_rms, worst, reason."""
    head = f"{'oracle':<14} {'branch':<9} {'status':<7} {'max_abs_err':>11} {'baseline':>9} {'bound':>9} {'ratio':>7} {'rel_rms':>8}  worst[b,pos,h]  reason"
    lines = [head, "-" * len(head)]
    for c in cells:
        m = c.metrics
        lines.append(f"{c.oracle:<14} {c.branch:<9} {c.status:<7} {_fmt(m.get('max_abs_err')):>11} {_fmt(m.get('baseline_err')):>9}"
                     f" {_fmt(m.get('bound')):>9} {_fmt(m.get('err_ratio')):>7} {_fmt(m.get('rel_rms')):>8}  "
                     f"{_fmt(m.get('worst_index')):<14}  {c.reason}")
    return "\n".join(lines)


def repro(args: argparse.Namespace) -> int:
    from nsaconf.harness.runner import evaluate
    from nsaconf.oracles.resources import resource_problem

    from nsaconf.harness.checks import CheckError, parse_checks

    if not args.oracles:
        raise UsageError("repro needs --oracles (comma-separated oracle names)")
    try:
        checks = parse_checks(args.checks)
    except CheckError as e:
        raise UsageError(str(e)) from None
    table = tolerance_from_args(args)
    load_oracle_sources(args.plugin)
    check_tolerance_keys(table)
    check_device(args.device)
    cases = resolve_cases(args.case)
    oracles = select_oracles(args.oracles, args.device)
    max_bytes, max_work = case_limits(args)
    for case in cases:  # before anything is allocated
        why = resource_problem(case, max_bytes, max_work)
        if why:
            raise CaseError(f"case {case.id}: {why} (raise the limit to run it)")
    bad = False
    for case in cases:
        print(f"case {case.id}")
        print(f"  {case.to_json()}")
        cells = evaluate(case, oracles, device=args.device, table=table, isolate=args.isolate, timeout=args.timeout,
                         plugins=resolved(args.plugin),
                         out=Path(args.save_tensors) if args.save_tensors else None, save_tensors=bool(args.save_tensors),
                         checks=checks)
        print(format_cells(cells))
        for c in cells:
            if c.diagnosis:
                print(f"diagnosis {c.oracle}.{c.branch}: {c.diagnosis['text']}")
        bad |= any(c.status in BAD_STATUSES for c in cells)
    print(f"tolerance: {cells[0].tolerance.get('text', '') if cells else ''}")
    return 1 if bad else 0
