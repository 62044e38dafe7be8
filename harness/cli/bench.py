"""``nsaconf bench``: time GPU oracles on cases (CUDA events, median of >= 20 calls) -> DIR/bench.jsonl and
DIR/performance.html, each timing beside its roofline floor (``nsaconf.harness.bench``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from nsaconf.harness.cli.common import UsageError, load_oracle_sources


def register(sub) -> None:
    """Add ``nsaconf bench`` to the CLI."""
    from nsaconf.cases.generator import PROFILES

    p = sub.add_parser("bench", help="time GPU oracles (CUDA events), write DIR/bench.jsonl + performance section")
    p.add_argument("--case", action="append", default=[], metavar="FILE", help="case JSON file (repeatable)")
    p.add_argument("--profile", choices=PROFILES, help="case profile (e.g. paper, gpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oracles", default=None, help="comma-separated (default: every oracle with a cuda device)")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE", help="Python file registering oracles (repeatable)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per oracle x case (median; >= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="out/run")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from nsaconf.cases.generator import profile_cases
    from nsaconf.cases.model import load_cases
    from nsaconf.harness.bench import bench_oracles, default_bench_oracles, write_records
    from nsaconf.oracles.base import get_oracle

    if not torch.cuda.is_available():
        raise UsageError("bench needs a CUDA device")
    if args.reps < 20:
        raise UsageError(f"--reps must be >= 20, got {args.reps}")
    load_oracle_sources(args.plugin)
    cases = [c for f in args.case for c in load_cases(f)]
    if args.profile:
        cases += profile_cases(args.profile, args.seed)
    if not cases:
        raise UsageError("no cases (give --case FILE or --profile NAME)")
    if args.oracles:
        names = [n.strip() for n in args.oracles.split(",") if n.strip()]
        for n in names:
            get_oracle(n)  # an unknown name is an error before any timing
    else:
        names, left_out = default_bench_oracles()
        for name, why in left_out:
            print(f"nsaconf bench: not timed by default: {name} ({why}); name it in --oracles to time it")
    from nsaconf.reports.performance import write_performance

    out = Path(args.out)

    def save(records: list) -> Path:  # after each timing: a run cut off by a time limit keeps what it measured
        path = write_records(out, records)
        write_performance(out)
        return path

    records = bench_oracles(cases, names, args.reps, args.warmup, on_record=save)
    path = save(records)
    print(f"wrote {path} ({len(records)} records) and {out / 'performance.html'}")
    return 0
