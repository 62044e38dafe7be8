"""Command line: ``nsaconf`` (also ``python -m nsaconf``).

``nsaconf run``    run a case matrix -> DIR/results.jsonl (+ run.json, conventions.jsonl, reports)
``nsaconf list``   every oracle with layer, devices, dtypes, branches and availability
``nsaconf repro``  rerun one case (id or file) against some oracles and print the comparison
``nsaconf report`` rebuild the reports of DIR from DIR/results.jsonl
``nsaconf merge``  merge the results of several run directories (e.g. ``--shard`` runs) into one report

Exit codes: 0 nothing FAILed/ERRORed/CRASHed/TIMEOUTed, 1 otherwise, 2 bad usage or input (one line
``nsaconf: error: ...`` on stderr).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from nsaconf.cases.vocabulary import BAD_STATUSES, DTYPE_ALIASES

# Subcommands contributed by other modules: each exposes ``register(subparsers)`` and sets ``func``.
SUBCOMMAND_MODULES = ("nsaconf.harness.masks", "nsaconf.harness.bench")



class UsageError(Exception):
    """Bad usage or input: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(message)


def _fail(msg: str) -> int:
    print(f"nsaconf: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------- helpers
def _load_oracle_sources(plugins: list[str]) -> None:
    from nsaconf.oracles.base import load_builtins, load_entry_points, load_plugin

    load_builtins()
    for p in plugins:
        load_plugin(p)
    load_entry_points()


def _parse_dtypes(text: Optional[str]) -> list[str]:
    if not text:
        return []
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        if t not in DTYPE_ALIASES:
            raise UsageError(f"unknown dtype {t!r}; use fp16, bf16, fp32, fp64 (or float16, bfloat16, float32, float64)")
        out.append(DTYPE_ALIASES[t])
    return out


def _select_cases(args: argparse.Namespace):
    from nsaconf.cases.generator import dedupe_cases, profile_cases
    from nsaconf.cases.model import load_cases

    cases = []
    if args.profile:
        cases += profile_cases(args.profile, args.seed or 0)
    for f in args.case:
        fc = load_cases(f)
        if args.seed is not None:
            fc = [c.replace(seed=args.seed) for c in fc]
        cases += fc
    if not args.profile and not args.case:
        cases = profile_cases("smoke", args.seed or 0)
    dtypes = _parse_dtypes(args.dtype)
    if dtypes:
        cases = [c.replace(dtype=dt) for c in cases for dt in dtypes]
    cases = dedupe_cases(cases)
    if getattr(args, "shard", None):
        k, n = parse_shard(args.shard)
        cases = cases[k::n]
    return cases


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N): shard K of N takes cases K, K+N, K+2N, ... of the selected list (0 <= K < N)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must be K/N with integers 0 <= K < N, got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard must be K/N with integers 0 <= K < N, got {text!r}")
    return k, n


def _select_oracles(spec: Optional[str], device: str) -> list[str]:
    from nsaconf.oracles.base import get_oracle, registry

    if spec:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        for n in names:
            get_oracle(n)  # raises OracleError naming the unknown oracle
        return names
    return [n for n, cls in sorted(registry().items()) if device in cls.devices]


def _write_run_info(out: Path, args: argparse.Namespace, oracles: list[str], cases, table) -> None:
    from nsaconf.harness.results import base_versions

    info = {"command": "nsaconf " + " ".join(sys.argv[1:]) if sys.argv else "nsaconf run",
            "profile": args.profile, "case_files": args.case, "device": args.device, "oracles": oracles,
            "n_cases": len(cases), "shard": getattr(args, "shard", None), "seed": args.seed, "timeout_s": args.timeout, "plugins": args.plugin,
            "tolerance": table.as_dict(), "versions": base_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "run.json").write_text(json.dumps(info, indent=1) + "\n")


def _write_reports(out: Path, quiet: bool = False) -> Optional[Path]:
    """Call ``reports.write_reports`` when the reports package provides it."""
    try:
        from nsaconf.reports import write_reports
    except ImportError as e:
        if not quiet:
            print(f"nsaconf: reports not written (reports.write_reports unavailable: {e})", file=sys.stderr)
        return None
    paths = write_reports(out)
    return Path(paths["html"]) if isinstance(paths, dict) and "html" in paths else None


def _write_probe(out: Path, oracles: list[str], device: str) -> None:
    """DIR/conventions.jsonl from the probe helper's leak check (imported lazily)."""
    try:
        from nsaconf.harness.probe import leak_check_records
    except ImportError as e:
        print(f"nsaconf: convention probe skipped (harness.probe unavailable: {e})", file=sys.stderr)
        return
    try:
        recs = leak_check_records(oracles, device)
    except Exception as e:  # noqa: BLE001 - the probe must never lose the run's results
        print(f"nsaconf: convention probe failed: {type(e).__name__}: {e}", file=sys.stderr)
        return
    with open(out / "conventions.jsonl", "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, default=str) + "\n")


# ----------------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from nsaconf.harness.config import load_config, tolerance_table
    from nsaconf.harness.runner import RunConfig, Runner

    cfg = load_config(args.config)
    table = tolerance_table(cfg, args.tol)
    _load_oracle_sources(args.plugin)
    if args.device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    cases = _select_cases(args)
    oracles = _select_oracles(args.oracles, args.device)
    if not oracles:
        raise UsageError(f"no oracle runs on {args.device}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_run_info(out, args, oracles, cases, table)
    print(f"nsaconf: {len(cases)} cases x {len(oracles)} oracles ({', '.join(oracles)}) on {args.device} -> {out}/results.jsonl",
          file=sys.stderr)
    run_cfg = RunConfig(cases=cases, oracles=oracles, device=args.device, out=out, plugins=[str(Path(p).resolve()) for p in args.plugin],
                        save_tensors=args.save_tensors, resume=args.resume, timeout=args.timeout, table=table,
                        progress=not args.no_progress)
    summary = Runner(run_cfg).run()
    if args.profile and not args.no_probe:
        _write_probe(out, oracles, args.device)
    html = None
    if not args.no_report:
        try:
            html = _write_reports(out)
        except Exception as e:  # noqa: BLE001 - the results are on disk; say why the report failed
            print(f"nsaconf: report failed: {type(e).__name__}: {e}", file=sys.stderr)
    counts_d = summary.counts
    if args.resume:  # the verdict covers the cells recorded by earlier invocations too
        from nsaconf.harness.results import iter_records, summarize

        counts_d = {k: v for k, v in summarize(iter_records(out)).items() if v}
    counts = " ".join(f"{k}={v}" for k, v in sorted(counts_d.items())) or "no cells"
    print(f"nsaconf: {counts}; results: {out / 'results.jsonl'}" + (f"; report: {html}" if html else ""))
    return 1 if any(counts_d.get(s, 0) for s in BAD_STATUSES) else 0


def cmd_list(args: argparse.Namespace) -> int:
    from nsaconf.oracles.base import registry

    _load_oracle_sources(args.plugin)
    rows = []
    for name, cls in sorted(registry().items()):
        o = cls()
        try:
            why = o.availability()
        except Exception as e:  # noqa: BLE001
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


def cmd_repro(args: argparse.Namespace) -> int:
    from nsaconf.harness.repro import repro

    return repro(args)


def cmd_merge(args: argparse.Namespace) -> int:
    from nsaconf.harness.results import merge_runs

    out = Path(args.out)
    try:
        n = merge_runs([Path(d) for d in args.dirs], out)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(f"nsaconf: merged {n} cells from {len(args.dirs)} run directories into {out / 'results.jsonl'}", file=sys.stderr)
    return cmd_report(argparse.Namespace(dir=str(out)))


def cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if not (out / "results.jsonl").exists():
        raise UsageError(f"{str(out / 'results.jsonl')!r} does not exist")
    try:
        html = _write_reports(out)
    except Exception as e:  # noqa: BLE001 - e.g. reports.ReportError: unreadable results
        raise UsageError(f"cannot build reports from {str(out)!r}: {e}") from None
    print(f"nsaconf: reports written to {out}" + (f" (report: {html})" if html else ""))
    return 0


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from nsaconf.cases.generator import PROFILES

    p = _Parser(prog="nsaconf", description="NSA conformance harness")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run oracles on cases and judge them against the fp64 truth")
    r.add_argument("--profile", choices=PROFILES, help="a generated case list (default smoke when no --case)")
    r.add_argument("--case", action="append", default=[], help="case JSON file (repeatable)")
    r.add_argument("--oracles", help="comma-separated oracle names (default: every oracle for --device)")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--dtype", help="comma-separated dtypes; each case is run in each (default: the case's own)")
    r.add_argument("--out", default="out/run", help="output directory")
    r.add_argument("--plugin", action="append", default=[], help="Python file registering oracles (repeatable)")
    r.add_argument("--save-tensors", action="store_true", help="write DIR/tensors/<case>/{inputs,reference,oracles/*}.pt")
    r.add_argument("--seed", type=int, help="profile seed (and the seed of --case files)")
    r.add_argument("--resume", action="store_true", help="keep DIR/results.jsonl and skip cells already recorded")
    r.add_argument("--timeout", type=float, default=300.0, help="per-cell timeout in seconds (default 300)")
    r.add_argument("--tol", action="append", default=[], metavar="KEY=VALUE",
                   help="tolerance override, e.g. k=3, slc_o.k=3, fla.o.floor_add=1e-4 (repeatable)")
    r.add_argument("--config", help="config file (default $NSACONF_CONFIG or ./nsaconf.toml)")
    r.add_argument("--no-probe", action="store_true", help="skip the causality-leak probe after a profile run")
    r.add_argument("--no-report", action="store_true", help="do not write summary.md/results.csv/report.html")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--shard", metavar="K/N", help="run only cases K, K+N, K+2N, ... of the selection (parallel "
                   "runs; combine them with `nsaconf merge`)")
    r.set_defaults(func=cmd_run)

    li = sub.add_parser("list", help="list oracles and their availability")
    li.add_argument("--plugin", action="append", default=[])
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_list)

    rp = sub.add_parser("repro", help="rerun one case and print the comparison")
    rp.add_argument("case", help="a case id (as in results.jsonl) or a case JSON file")
    rp.add_argument("--oracles", required=True)
    rp.add_argument("--device", default="cpu")
    rp.add_argument("--plugin", action="append", default=[])
    rp.add_argument("--tol", action="append", default=[], metavar="KEY=VALUE")
    rp.add_argument("--config")
    rp.add_argument("--isolate", action="store_true", help="run the oracles in worker processes")
    rp.add_argument("--timeout", type=float, default=300.0)
    rp.add_argument("--save-tensors", metavar="DIR", help="also write the tensor contract to DIR")
    rp.set_defaults(func=cmd_repro)

    rep = sub.add_parser("report", help="rebuild DIR/summary.md, results.csv, report.html from DIR/results.jsonl")
    rep.add_argument("dir")
    rep.set_defaults(func=cmd_report)

    mg = sub.add_parser("merge", help="merge run directories (e.g. --shard runs) into OUT and write its reports")
    mg.add_argument("out", help="output directory (created; its results.jsonl is replaced)")
    mg.add_argument("dirs", nargs="+", help="run directories, each with results.jsonl (a later one wins a repeated cell)")
    mg.set_defaults(func=cmd_merge)

    for mod_name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
            mod.register(sub)
        except ImportError:
            continue  # not contributed (yet) in this checkout
        except Exception as e:  # noqa: BLE001 - a broken contributed subcommand must not break `run`
            print(f"nsaconf: warning: subcommand module {mod_name} failed to load: {type(e).__name__}: {e}", file=sys.stderr)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from nsaconf.cases.model import CaseError
    from nsaconf.harness.config import ConfigError
    from nsaconf.harness.tolerance import ToleranceError
    from nsaconf.oracles.base import OracleError

    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "config", None):  # adapters and worker processes read the same file
            os.environ["NSACONF_CONFIG"] = str(Path(args.config).resolve())
        return int(args.func(args) or 0)
    except (UsageError, CaseError, OracleError, ConfigError, ToleranceError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("nsaconf: interrupted (results written so far are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
