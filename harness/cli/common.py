"""What every subcommand shares: the one error style, the parser, and the selection of cases and oracles.

A user error (bad option, malformed case or config, unknown oracle, broken plugin) is one line on stderr,
``nsaconf: error: ...``, and exit status 2. Subcommands raise; ``nsaconf.harness.cli.main`` prints.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from nsaconf.cases.vocabulary import DEVICES, DTYPE_ALIASES


class UsageError(Exception):
    """Bad usage or input: printed as one line, exit 2."""


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types that are the user's mistake (one line, exit 2), not nsaconf's."""
    from nsaconf.cases.model import CaseError
    from nsaconf.harness.probe import ProbeError
    from nsaconf.harness.results import RunFolderError
    from nsaconf.harness.tolerance import ToleranceError
    from nsaconf.oracles.base import OracleError
    from nsaconf.oracles.config import ConfigError
    from nsaconf.reports import ReportError

    return (UsageError, CaseError, OracleError, ConfigError, ToleranceError, ProbeError, ReportError, RunFolderError)


def fail(msg: object) -> int:
    """Print ``nsaconf: error: <msg on one line>`` to stderr; the exit status 2."""
    print(f"nsaconf: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """argparse with the one error style (argparse's own usage text + exit 2 becomes a UsageError)."""

    def error(self, message: str) -> None:
        raise UsageError(message)


# ------------------------------------------------------------------------------------------ options
def add_oracle_options(p: argparse.ArgumentParser, oracles_help: str, device: bool = True) -> None:
    """``--oracles``, ``--plugin`` (and ``--device``)."""
    p.add_argument("--oracles", help=oracles_help)
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="Python file registering oracles (repeatable; it is code and runs with your rights)")
    if device:
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def add_case_options(p: argparse.ArgumentParser) -> None:
    """``--profile``, ``--case``, ``--dtype``, ``--seed``."""
    from nsaconf.cases.generator import PROFILES

    p.add_argument("--profile", choices=PROFILES, help="a generated case list (default smoke when no --case)")
    p.add_argument("--case", action="append", default=[], metavar="FILE", help="case JSON file (repeatable)")
    p.add_argument("--dtype", help="comma-separated dtypes; each case is run in each (default: the case's own)")
    p.add_argument("--seed", type=int, help="profile seed (and the seed of --case files)")


def add_tolerance_options(p: argparse.ArgumentParser) -> None:
    """``--tol`` and ``--config``."""
    p.add_argument("--tol", action="append", default=[], metavar="KEY=VALUE",
                   help="tolerance override, e.g. k=3, slc_o.k=3, fla_naive.o.floor_add=1e-4 (repeatable)")
    p.add_argument("--config", metavar="FILE", help="config file (default $NSACONF_CONFIG or ./nsaconf.toml)")


# ------------------------------------------------------------------------------------------ selection
def load_oracle_sources(plugins: list[str]) -> None:
    """The built-in oracles, the ``--plugin`` files and the installed entry points."""
    from nsaconf.oracles.base import load_oracle_sources as load

    load(plugins)


def check_device(device: str, indexed: bool = False) -> str:
    """``cpu`` or ``cuda`` (and ``cuda:N`` where ``indexed``) that torch can use; UsageError otherwise."""
    ok = device in DEVICES or (indexed and device.startswith("cuda:") and device[5:].isdigit())
    if not ok:
        raise UsageError(f"--device must be cpu or cuda{' (or cuda:N)' if indexed else ''}, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda but torch sees no CUDA device")
        if device[5:] and int(device[5:]) >= torch.cuda.device_count():
            raise UsageError(f"--device {device} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def seconds(text: str) -> float:
    """argparse type of a time limit: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def command_line() -> str:
    """The command this process runs, as recorded in run.json and a run folder's lock."""
    return "nsaconf " + " ".join(sys.argv[1:]) if sys.argv else "nsaconf"


def parse_dtypes(text: Optional[str]) -> list[str]:
    """``"fp16,bf16"`` -> ``["float16", "bfloat16"]`` (any spelling of ``DTYPE_ALIASES``)."""
    out = []
    for t in (text or "").split(","):
        t = t.strip().lower()
        if not t:
            continue
        if t not in DTYPE_ALIASES:
            raise UsageError(f"unknown dtype {t!r}; use fp16, bf16, fp32, fp64 (or float16, bfloat16, float32, float64)")
        out.append(DTYPE_ALIASES[t])
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N): shard K of N takes cases K, K+N, K+2N, ... of the selected list (0 <= K < N)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must be K/N with integers 0 <= K < N, got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard must be K/N with integers 0 <= K < N, got {text!r}")
    return k, n


def select_cases(args: argparse.Namespace) -> list:
    """The cases of ``--profile`` and ``--case`` files (``smoke`` when neither), re-run in each ``--dtype``,
    without duplicates, then the ``--shard`` slice; UsageError when that leaves no case."""
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
    dtypes = parse_dtypes(args.dtype)
    if dtypes:
        cases = [c.replace(dtype=dt) for c in cases for dt in dtypes]
    cases = dedupe_cases(cases)
    if not cases:
        where = f"the case file(s) {', '.join(args.case)} hold none" if args.case else "the profile has none"
        raise UsageError(f"no cases selected ({where})")
    if getattr(args, "shard", None):
        k, n = parse_shard(args.shard)
        if not cases[k::n]:
            raise UsageError(f"no cases selected (shard {k}/{n} of {len(cases)} case(s) is empty)")
        cases = cases[k::n]
    return cases


def select_oracles(spec: Optional[str], device: str) -> list[str]:
    """The names in ``spec`` (each must be registered), else every oracle that runs on ``device``."""
    from nsaconf.oracles.base import get_oracle, registry

    if spec:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        for n in names:
            get_oracle(n)  # raises OracleError naming the unknown oracle
        return names
    return [n for n, cls in sorted(registry().items()) if device.split(":")[0] in cls.devices]


def tolerance_from_args(args: argparse.Namespace):
    """Defaults, then the config file's ``[tolerance]``, then ``--tol``."""
    from nsaconf.harness.tolerance import tolerance_table
    from nsaconf.oracles.config import load_config

    return tolerance_table(load_config(args.config), args.tol)


def resolved(paths: list[str]) -> list[str]:
    """Absolute paths (worker processes may start in another folder)."""
    return [str(Path(p).resolve()) for p in paths]
