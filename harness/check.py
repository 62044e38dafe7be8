"""``nsaconf.check``: the conformance of a plain callable, judged in this process like any oracle.

The callable (no ``Oracle`` class needed)::

    def my_nsa(case: nsaconf.Case, inputs: nsaconf.Inputs) -> dict[str, torch.Tensor]:
        ...  # inputs: q [B,TQ,HQ,D], k [B,T,H,D], v [B,T,H,DV], g_cmp/g_slc/g_swa [B,TQ,HQ]
        return {"o": o}  # any of: cmp_o, slc_o, swa_o, o [B,TQ,HQ,DV]; cmp_lse [B,TQ,HQ] (natural log);
                         # topk_idx [B,TQ,H,n] (any order, -1 padding)

A selection kernel that must be *given* its blocks takes a ``block_indices`` keyword ``[B,TQ,H,n]``
(the case's top-n, canonical order, -1 last). Inputs are in the case dtype on the device.

    result = nsaconf.check(my_nsa)                     # the smoke profile, on the CPU
    nsaconf.assert_conforms(my_nsa, cases="ci")        # AssertionError listing each bad cell
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Union

from nsaconf.cases.vocabulary import ALL_BRANCHES, BAD_STATUSES, DEVICES, DTYPE_ALIASES, FORWARD_BRANCHES
from nsaconf.cases.repro_line import repro_command  # noqa: F401 (re-exported: the one place it is built)

if TYPE_CHECKING:
    import pandas as pd

    from nsaconf.cases.model import Case
    from nsaconf.harness.results import CellResult
    from nsaconf.harness.tolerance import ToleranceTable

#: what ``cases=`` takes: a Case, a profile name, a case file, a case id, or a list of those
CaseSpec = Union["Case", str, Path, Iterable[Union["Case", str, Path]]]
DEFAULT_CASES = "smoke"


# ------------------------------------------------------------------------------------------ selection
def resolve_cases(cases: CaseSpec = DEFAULT_CASES, dtype: Any = None, seed: Optional[int] = None) -> list["Case"]:
    """The cases of ``cases`` (a ``Case``, a profile name, a case JSON file, a case id, or a list of those),
    re-run in each ``dtype`` (``"bf16"``, ``"fp16,fp32"``, ``torch.float16`` or a list), without duplicates.
    ``seed``: the profiles' seed (default 0) and, when given, the seed of case-file cases.
    Raises ``CaseError`` naming what is wrong."""
    from nsaconf.cases.generator import PROFILES, dedupe_cases, profile_cases
    from nsaconf.cases.model import Case, CaseError, load_cases

    items = [cases] if isinstance(cases, (str, Path, Case)) else list(cases)
    out: list[Case] = []
    for item in items:
        if isinstance(item, Case):
            out.append(item)
        elif isinstance(item, str) and item in PROFILES:
            out += profile_cases(item, seed or 0)
        elif isinstance(item, Path) or (isinstance(item, str) and (Path(item).is_file() or item.endswith((".json", ".jsonl"))
                                                                  or "/" in item)):
            found = load_cases(item)
            out += [c.replace(seed=seed) for c in found] if seed is not None else found
        elif isinstance(item, str):
            try:
                out.append(Case.from_id(item))
            except CaseError:
                raise CaseError(f"cases: {item!r} is neither a profile ({', '.join(PROFILES)}), a case file nor a "
                                "case id") from None
        else:
            raise CaseError(f"cases: expected a Case, a profile name, a case file or a case id, got {type(item).__name__}")
    dtypes = parse_dtypes(dtype)
    if dtypes:
        out = [c.replace(dtype=d) for c in out for d in dtypes]
    out = dedupe_cases(out)
    if not out:
        raise CaseError("no cases selected")
    return out


def parse_dtypes(dtype: Any) -> list[str]:
    """``"fp16,bf16"``, ``torch.float16`` or a list of either -> case dtype names (``[]`` for None)."""
    from nsaconf.cases.model import CaseError

    if dtype is None:
        return []
    items = dtype.split(",") if isinstance(dtype, str) else (list(dtype) if isinstance(dtype, (list, tuple)) else [dtype])
    out = []
    for d in items:
        key = str(d).strip().lower().removeprefix("torch.")
        if not key:
            continue
        if key not in DTYPE_ALIASES:
            raise CaseError(f"unknown dtype {str(d)!r}; use fp16, bf16, fp32, fp64 (or float16, bfloat16, float32, float64)")
        out.append(DTYPE_ALIASES[key])
    return out


def parse_branches(branches: Any) -> Optional[tuple[str, ...]]:
    """``"swa_o"``, ``"cmp_o,cmp_lse"`` or a list -> canonical branch names (None for None)."""
    if branches is None:
        return None
    names = [b.strip() for b in (branches.split(",") if isinstance(branches, str) else branches) if b.strip()]
    bad = [b for b in names if b not in ALL_BRANCHES]
    if bad or not names:
        raise ValueError(f"unknown branch {bad[0] if bad else branches!r}; canonical branches: {', '.join(ALL_BRANCHES)}")
    return tuple(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------ messages
def failure_text(cell: "CellResult", *repro: str) -> str:
    """One bad cell: its status, oracle.branch, case and reason (after the diagnosis, its headline, when there
    is one), then each ``repro`` line indented."""
    diag = (getattr(cell, "diagnosis", None) or {}).get("text")
    head = f"{cell.status} {cell.oracle}.{cell.branch} on {cell.case_id}"
    lines = [f"{head} — {diag}", f"  {cell.reason}"] if diag else [f"{head}: {cell.reason}"]
    if cell.metrics.get("worst_index") is not None:
        lines.append(f"  worst [b, pos, head]: {cell.metrics['worst_index']}")
    return "\n".join(lines + [f"  {r}" for r in repro])


# ------------------------------------------------------------------------------------------ the result
@dataclass(frozen=True)
class CheckResult:
    """The cells of one ``check``: ``cells`` (one ``CellResult`` per case x branch), ``ok`` (no
    FAIL/ERROR/CRASH/TIMEOUT cell and at least one PASS), ``failures`` (the bad cells), ``frame()``."""

    oracle: str
    cells: tuple
    device: str = "cpu"

    @property
    def failures(self) -> tuple:
        return tuple(c for c in self.cells if c.status in BAD_STATUSES)

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.cells:
            counts[c.status] = counts.get(c.status, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def ok(self) -> bool:
        return not self.failures and self.counts.get("PASS", 0) > 0

    def frame(self) -> "pd.DataFrame":
        """One row per cell: the ``CellResult`` fields, nested ones flattened with the column names of
        ``results.csv`` (``metric.err_ratio``, ``tolerance.k``, ``case.seq_len``, ``diagnosis.key``)."""
        import json

        import pandas as pd

        df = pd.json_normalize([json.loads(c.to_json()) for c in self.cells])
        return df.rename(columns=lambda c: "metric." + c[len("metrics."):] if c.startswith("metrics.") else c)

    def message(self) -> str:
        """What ``assert_conforms`` raises: the counts, then each bad cell with its reason and how to rerun it."""
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items()) or "no cells"
        if self.ok:
            return f"nsaconf.check: {self.oracle} conforms on {self.device} ({counts})"
        if not self.failures:
            why = "; ".join(sorted({c.reason for c in self.cells})) or "no case selected"
            return f"nsaconf.check: {self.oracle}: no cell passed on {self.device} ({counts}): {why}"
        lines = [f"nsaconf.check: {self.oracle}: {len(self.failures)} of {len(self.cells)} cells bad on {self.device} ({counts})"]
        for c in self.failures:
            rerun = f"rerun: nsaconf.check(fn, cases={c.case_id!r}, branches={c.branch!r}" + \
                    (f", device={self.device!r})" if self.device != "cpu" else ")")
            repro = f"repro: {repro_command(c.case_id, c.oracle, self.device)} --plugin FILE  (fn as an oracle plugin: " \
                    "nsaconf new-plugin FILE)"
            lines.append(failure_text(c, rerun, repro))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.message()


# ------------------------------------------------------------------------------------------ the ad-hoc oracle
def _oracle_name(fn: Callable, name: Optional[str]) -> str:
    from nsaconf.oracles.base import ORACLE_NAME

    if name is not None:
        return name
    guess = getattr(fn, "__name__", None) or type(fn).__name__
    return guess if ORACLE_NAME.fullmatch(guess) and ".." not in guess else "callable"


def takes_block_indices(fn: Callable) -> bool:
    """Whether ``fn`` has a ``block_indices`` parameter (a selection kernel given its blocks)."""
    try:
        return "block_indices" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def callable_oracle(fn: Callable, name: str, branches: tuple[str, ...], returned: Optional[set] = None) -> type:
    """An ``Oracle`` class whose ``run`` calls ``fn(case, inputs)`` (with ``block_indices=`` when ``fn`` takes
    it); the keys ``fn`` returns are added to ``returned``."""
    from nsaconf.oracles.base import Oracle

    given = takes_block_indices(fn)

    class CallableOracle(Oracle):
        needs_block_indices = given
        layer = "kernel" if given else "e2e"
        devices = DEVICES
        description = f"nsaconf.check of {getattr(fn, '__qualname__', type(fn).__name__)}"

        def run(self, case, inputs, device, block_indices=None):
            out = fn(case, inputs, block_indices=block_indices) if given else fn(case, inputs)
            if returned is not None and isinstance(out, dict):
                returned.update(k for k in out if isinstance(k, str))
            return out

    CallableOracle.name = name
    CallableOracle.branches = branches
    return CallableOracle


@contextmanager
def registered(cls: type) -> Iterator[None]:
    """``cls`` in the oracle registry for the ``with`` block only (its name must be free)."""
    from nsaconf.oracles import base

    if cls.name in base.registry():
        raise base.OracleError(f"{cls.name!r} is the name of a registered oracle; pass check(..., name=...)")
    base.register_oracle(cls)
    try:
        yield
    finally:
        base.unregister_oracle(cls.name)  # an ad-hoc oracle lives for one check


# ------------------------------------------------------------------------------------------ entry points
def check(fn: Callable, cases: CaseSpec = DEFAULT_CASES, branches: Any = None, device: str = "cpu", dtype: Any = None,
          table: Optional["ToleranceTable"] = None, name: Optional[str] = None) -> CheckResult:
    """Judge ``fn(case, inputs) -> {branch: tensor}`` on ``cases`` against the fp64 truth, in this process.

    ``cases``: a ``Case``, a profile name (default ``smoke``), a case file, a case id, or a list of those;
    ``branches``: the branches to judge (default: those ``fn`` returns); ``dtype``: re-run every case in
    these dtypes; ``table``: a ``ToleranceTable`` (default: the built-in rules); ``name``: the oracle
    name in the cells (default ``fn.__name__``)."""
    from nsaconf.harness.runner import evaluate

    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
    selected = resolve_cases(cases, dtype)
    wanted = parse_branches(branches)
    returned: set[str] = set()
    cls = callable_oracle(fn, _oracle_name(fn, name), wanted or FORWARD_BRANCHES, returned)
    cells: list = []
    with registered(cls):
        for case in selected:
            cells += evaluate(case, [cls.name], device=device, table=table)
    if wanted is None and returned:
        if not returned & set(FORWARD_BRANCHES):
            raise ValueError(f"fn returned no canonical branch (keys: {', '.join(sorted(returned))}); return some of "
                             f"{', '.join(FORWARD_BRANCHES)} or pass branches=")
        cells = [c for c in cells if c.branch in returned]  # the branches fn computes
    return CheckResult(oracle=cls.name, cells=tuple(cells), device=device)


def assert_conforms(fn: Callable, cases: CaseSpec = DEFAULT_CASES, branches: Any = None, device: str = "cpu",
                    dtype: Any = None, table: Optional["ToleranceTable"] = None, name: Optional[str] = None) -> CheckResult:
    """``check``, then ``AssertionError`` (each bad cell: status, reason, rerun lines) unless ``ok``."""
    result = check(fn, cases=cases, branches=branches, device=device, dtype=dtype, table=table, name=name)
    if not result.ok:
        raise AssertionError(result.message())
    return result
