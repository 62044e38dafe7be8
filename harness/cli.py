"""Command line: ``nsaconf`` (also ``python -m harness``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cases.model import CaseError, load_cases
from cases.tensors import materialize
from harness.tensors_io import save_inputs, save_outputs, save_truth
from oracles.reference import nsa_reference
from oracles.base import OracleError, get_oracle


def _fail(msg: str) -> int:
    print(f"nsaconf: error: {msg}", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cases = [c for f in args.case for c in load_cases(f)]
        oracles = [get_oracle(n) for n in args.oracles.split(",")]
    except (CaseError, OracleError) as e:
        return _fail(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        inputs = materialize(case, args.device)
        if args.save_tensors:
            save_inputs(out, case, inputs)
            save_truth(out, case, nsa_reference(case, inputs))
        for oracle in oracles:
            why = oracle.check_support(case, args.device)
            if why:
                print(f"SKIP {case.id} {oracle.name}: {why}")
                continue
            res = oracle.run(case, inputs, args.device)
            if args.save_tensors:
                save_outputs(out, case, oracle.name, res)
            print(f"ran  {case.id} {oracle.name}: {', '.join(sorted(res))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsaconf", description="NSA conformance harness")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run oracles on cases")
    r.add_argument("--case", action="append", default=[], help="case JSON file (repeatable)")
    r.add_argument("--oracles", default="reference")
    r.add_argument("--device", default="cpu")
    r.add_argument("--out", default="out/run")
    r.add_argument("--save-tensors", action="store_true")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
