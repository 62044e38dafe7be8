"""Property-based search of the case space: draw canonical cases an oracle supports, judge each with the
engine, and shrink the first failure to a minimal case (``nsaconf search``).

For each oracle, ``search_space`` measures what it supports from its ``supports()`` answers: starting from
the first profile case it supports, each dimension's values (dtype, every convention field of
``cases.vocabulary``, the GQA ratio, kv heads, block sizes (l, d, l'), head dims, window, scale, batch,
decode, varlen) are kept where the oracle accepts that value on that case. ``case_strategy`` draws from
those values, simplest first (Hypothesis shrinks towards the first value and the smallest integer), and
``assume``s whatever the per-value answers could not rule out. Each draw is judged by ``Runner.judge``:
the float64 truth, the oracle in its worker process, the tolerance rule, top-k ties (and the checks that
need no truth with ``checks``; the minimal case is judged once more with the diagnosis of its FAIL
cells, which draws skip). A draw fails when a cell is FAIL, ERROR, CRASH or TIMEOUT; its failure
signature (the worst cell's status, and the check's name for a check) is the Hypothesis failure that the
shrinker keeps while it looks for a smaller case: the shortest sequence, fewest heads and batch, the
first convention values, seed 0.

Time: ``seconds`` bounds the search and the shrinking together. Hypothesis runs in batches of
``BATCH`` draws; once the time is spent, draws not judged before are not judged (they count as passing,
so the shrinker stops), and a judged draw keeps its verdict (``memo``), so the minimal case is always one
that failed. The Hypothesis example database is kept in ``DIR/hypothesis``: a re-run first replays the
failures it found before.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from nsaconf.cases.conventions import max_forced
from nsaconf.cases.model import Case, CaseError
from nsaconf.cases import vocabulary as V
from nsaconf.cases.vocabulary import BAD_STATUSES, CHECKS, SEVERITY
from nsaconf.harness.results import CellResult, ResultWriter
from nsaconf.harness.tolerance import ToleranceTable

BATCH = 25                 # draws per Hypothesis run (the time budget is checked between runs)
DATABASE_DIR = "hypothesis"  # DIR/hypothesis: the Hypothesis example database
SEARCH_FILE = "search.json"  # DIR/search.json: the command, the space of each oracle, the findings
#: the dtypes in the order a search prefers them (the shrinker moves towards the first one an oracle supports)
DTYPE_ORDER = ("float32", "float64", "bfloat16", "float16")
GROUPS = (1, 2, 4, 8, 16, 32)
HEADS_KV = (1, 2, 3)
#: (l, d, l') candidates, simplest (smallest, l = d = l') first
BLOCKS = ((4, 4, 4), (8, 8, 8), (16, 16, 16), (32, 32, 32), (64, 64, 64), (8, 4, 8), (16, 8, 16), (32, 16, 32),
          (4, 4, 8), (8, 8, 16), (16, 16, 32), (8, 4, 16), (16, 8, 32), (32, 16, 64))
HEAD_DIMS = (4, 8, 16, 32, 64, 128)
WINDOWS = (0, 1, 2, 3, 4, 8, 16, 32)
SCALES = (None, 0.5, 0.1, 2.0)  # printed exactly by Case.id (%g): a repro by id is the same case
BATCHES = (1, 2, 3)
MAX_TOP_N = 8


class SearchError(ValueError):
    """Bad search input (one line): no case the oracle supports, hypothesis missing, ..."""


def need_hypothesis() -> None:
    """SearchError with what to install when Hypothesis is missing."""
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise SearchError("nsaconf search needs the hypothesis package: pip install 'nsaconf[search]' "
                          "(or pip install 'hypothesis>=6.100')") from None


# ------------------------------------------------------------------------------------------ the space
def convention_fields() -> dict[str, tuple[str, ...]]:
    """Every string field of ``Case`` but ``dtype`` -> its values in ``cases.vocabulary`` (the field's name in
    capitals, or with an S: ``cmp_mask`` -> ``CMP_MASKS``, ``gates`` -> ``GATES``), default first. A new convention
    field is drawn as soon as the vocabulary names its values."""
    out = {}
    defaults = Case()
    for f in dataclasses.fields(Case):
        if f.name == "dtype" or not isinstance(getattr(defaults, f.name), str):
            continue
        values = getattr(V, f.name.upper(), None) or getattr(V, f.name.upper() + "S", None)
        if not (isinstance(values, tuple) and values and all(isinstance(v, str) for v in values)):
            raise SearchError(f"case field {f.name!r} has no tuple of values in cases.vocabulary "
                              f"({f.name.upper()} or {f.name.upper()}S)")
        default = getattr(defaults, f.name)
        out[f.name] = (default,) + tuple(v for v in values if v != default)
    return out


@dataclass(frozen=True)
class SearchSpace:
    """The values a search draws for one oracle, each tuple simplest first (what its ``supports()`` accepted,
    one dimension at a time, on ``base``)."""

    oracle: str
    base: Case
    dtypes: tuple[str, ...]
    conventions: dict[str, tuple[str, ...]]
    groups: tuple[int, ...]
    heads_kv: tuple[int, ...]
    blocks: tuple[tuple[int, int, int], ...]
    head_dims: tuple[int, ...]
    head_dims_v: tuple[int, ...]
    windows: tuple[int, ...]
    scales: tuple[Optional[float], ...]
    batches: tuple[int, ...]
    decode: bool
    varlen: bool
    max_seq_len: int
    max_heads: int = 32

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["base"] = self.base.id
        return json.loads(json.dumps(d))

    def digest(self) -> bytes:
        """Distinguishes the Hypothesis database entries of different oracles and spaces."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).digest()


def _supported(check: Callable[[Case], Optional[str]], case: Case) -> bool:
    try:
        return check(case) is None
    except Exception:  # noqa: BLE001 - foreign code: a supports() that raises rules the value out
        return False


def _try(check: Callable[[Case], Optional[str]], base: Case, **kw: Any) -> bool:
    try:
        case = base.replace(**kw)
    except CaseError:
        return False
    return _supported(check, case)


def _computes(oracle, base: Case, name: str, value: str) -> bool:
    """Whether every branch of ``oracle`` is judged with ``name = value`` (``Oracle.supported_conventions``: a
    value it does not declare SKIPs the branches it changes, so the search does not draw it)."""
    from nsaconf.oracles.base import convention_support

    try:
        case = base.replace(**{name: value})
    except CaseError:
        return False
    return all(convention_support(oracle, case, b) is None for b in oracle.branches)


def search_space(oracle, device: str, max_seq_len: int = 128, max_heads: int = 32) -> SearchSpace:
    """Probe ``oracle.check_support`` one dimension at a time from the first profile case it supports (query heads
    ``HQ = H * G <= max_heads`` where the oracle supports such a G)."""
    from nsaconf.cases.generator import profile_cases

    check = lambda c: oracle.check_support(c, device)  # noqa: E731
    base = next((c for p in ("smoke", "ci", "gpu") for c in profile_cases(p) if _supported(check, c)), None)
    if base is None:
        raise SearchError(f"{oracle.name} supports none of the smoke, ci and gpu profile cases on {device}: "
                          "nothing to start a search from")
    base = base.replace(q_len=base.seq_len, cu_seqlens=None) if _try(check, base, q_len=base.seq_len, cu_seqlens=None) else base
    dtypes = tuple(d for d in DTYPE_ORDER if _try(check, base, dtype=d))
    conventions = {name: tuple(v for v in values if _try(check, base, **{name: v}) and _computes(oracle, base, name, v))
                   for name, values in convention_fields().items()}
    groups = tuple(g for g in GROUPS if _try(check, base, heads_q=base.heads_kv * g))
    groups = tuple(g for g in groups if g <= max_heads) or groups[:1]
    heads_kv = tuple(h for h in HEADS_KV if _try(check, base, heads_kv=h, heads_q=h * base.group))
    blocks = tuple(b for b in BLOCKS if _try(check, base, cmp_block=b[0], cmp_stride=b[1], block_size=b[2]))
    head_dims = tuple(d for d in HEAD_DIMS if _try(check, base, head_dim=d, head_dim_v=d))
    head_dims_v = tuple(d for d in HEAD_DIMS if _try(check, base, head_dim_v=d))
    windows = tuple(w for w in WINDOWS if _try(check, base, window=w))
    scales = tuple(s for s in SCALES if _try(check, base, scale=s))
    batches = tuple(b for b in BATCHES if _try(check, base, batch=b))
    T = base.seq_len
    decode = _try(check, base, q_len=max(1, T // 2))
    varlen = T >= 2 and _try(check, base, batch=1, cu_seqlens=(0, T // 2, T))
    return SearchSpace(oracle.name, base, dtypes or (base.dtype,),
                       {k: v or (getattr(base, k),) for k, v in conventions.items()},
                       groups or (base.group,), heads_kv or (base.heads_kv,),
                       blocks or ((base.cmp_block, base.cmp_stride, base.block_size),), head_dims or (base.head_dim,),
                       head_dims_v or (base.head_dim_v,), windows or (base.window,), scales or (base.scale,),
                       batches or (base.batch,), decode, varlen, max_seq_len, max_heads)


def case_strategy(space: SearchSpace, supported: Callable[[Case], bool]):
    """A Hypothesis strategy of valid cases of ``space`` that ``supported`` accepts (``assume``)."""
    from hypothesis import assume
    from hypothesis import strategies as st

    @st.composite
    def cases(draw) -> Case:
        conv = {name: draw(st.sampled_from(values)) for name, values in space.conventions.items()}
        dtype = draw(st.sampled_from(space.dtypes))
        h = draw(st.sampled_from(space.heads_kv))
        g = draw(st.sampled_from(space.groups))
        assume(h * g <= max(space.max_heads, space.groups[0]))
        l, d, ls = draw(st.sampled_from(space.blocks))
        dim = draw(st.sampled_from(space.head_dims))
        dim_v = draw(st.sampled_from(space.head_dims_v)) if len(space.head_dims_v) > 1 and draw(st.booleans()) else dim
        top_n = draw(st.integers(max(1, max_forced(conv.get("forced_blocks", "initial_local"))), MAX_TOP_N))
        window = draw(st.sampled_from(space.windows))
        scale = draw(st.sampled_from(space.scales))
        T_max = space.max_seq_len
        if space.varlen and draw(st.booleans()):
            lens = draw(st.lists(st.integers(1, max(1, T_max // 2)), min_size=2, max_size=3))
            cu = [0]
            for n in lens:
                cu.append(cu[-1] + n)
            batch, T, TQ, cu_seqlens = 1, cu[-1], cu[-1], tuple(cu)
        else:
            batch = draw(st.sampled_from(space.batches))
            T = draw(st.integers(1, T_max))
            TQ = draw(st.integers(1, T)) if space.decode and draw(st.booleans()) else T
            cu_seqlens = None
        seed = draw(st.integers(0, 2**31 - 1))
        try:
            case = Case(batch=batch, seq_len=T, q_len=TQ, heads_q=h * g, heads_kv=h, head_dim=dim, head_dim_v=dim_v,
                        dtype=dtype, block_size=ls, cmp_block=l, cmp_stride=d, top_n=top_n, window=window, scale=scale,
                        cu_seqlens=cu_seqlens, seed=seed, **conv)
        except CaseError:
            assume(False)
            raise  # unreachable: assume(False) raises
        assume(supported(case))
        return case

    return cases()


# ------------------------------------------------------------------------------------------ findings
def signature(cells: list[CellResult]) -> Optional[tuple[str, str]]:
    """The failure a draw shows: (status of the worst cell judged against the truth, "") or, when only checks
    failed, (status, check name); None when no cell is bad."""
    bad = [c for c in cells if c.status in BAD_STATUSES]
    if not bad:
        return None
    truth = [c for c in bad if c.branch not in CHECKS]
    if truth:
        return (max(truth, key=lambda c: SEVERITY.get(c.status, 0)).status, "")
    first = max(bad, key=lambda c: (SEVERITY.get(c.status, 0), -CHECKS.index(c.branch)))
    return (first.status, first.branch)


class SearchFailure(Exception):
    """Raised inside the Hypothesis test for a failing draw; one subclass per signature, so that the shrinker
    keeps each failure apart."""

    sig: tuple[str, str] = ("", "")


_FAILURE_TYPES: dict[tuple[str, str], type] = {}


def failure_type(sig: tuple[str, str]) -> type:
    if sig not in _FAILURE_TYPES:
        _FAILURE_TYPES[sig] = type(f"SearchFailure_{sig[0]}_{sig[1] or 'truth'}", (SearchFailure,), {"sig": sig})
    return _FAILURE_TYPES[sig]


def sizes(case: Case) -> str:
    """``T=5 TQ=5 HQ=2 H=1 B=1 D=4 DV=4 l/d/l'=4/4/4 n=1 w=1 fp32`` (and the non-default fields)."""
    out = (f"T={case.seq_len} TQ={case.q_len} HQ={case.heads_q} H={case.heads_kv} B={case.batch} D={case.head_dim} "
           f"DV={case.head_dim_v} l/d/l'={case.cmp_block}/{case.cmp_stride}/{case.block_size} n={case.top_n} "
           f"w={case.window} {V.DTYPE_SHORT[case.dtype]}")
    defaults = Case()
    extra = [f"{k}={getattr(case, k)}" for k in convention_fields() if getattr(case, k) != getattr(defaults, k)]
    extra += [f"scale={case.scale:g}"] if case.scale is not None else []
    extra += [f"cu_seqlens={list(case.cu_seqlens)}"] if case.cu_seqlens is not None else []
    return out + "".join(" " + e for e in extra)


@dataclass
class Finding:
    """One minimal failing case of one oracle and what it took to find it."""

    oracle: str
    sig: tuple[str, str]
    case: Case
    cells: list[CellResult]           # the minimal case's bad cells
    draws_to_first: int               # cases judged until the first failure (that one included)
    seconds_to_first: float
    first_case: Case
    shrink_steps: int                 # smaller failing cases found while shrinking
    shrink_seconds: float
    judged: int                       # cases judged in all for this oracle
    corpus_path: Optional[Path] = None

    @property
    def diagnosis(self) -> Optional[dict]:
        for c in self.cells:
            d = getattr(c, "diagnosis", None)
            if isinstance(d, dict) and d.get("text"):
                return d
        return None

    def to_dict(self) -> dict:
        return {"oracle": self.oracle, "status": self.sig[0], "check": self.sig[1] or None, "case_id": self.case.id,
                "case": self.case.to_dict(), "sizes": sizes(self.case),
                "failure": [failure_record(c) for c in self.cells], "draws_to_first": self.draws_to_first,
                "seconds_to_first": round(self.seconds_to_first, 3), "first_case_id": self.first_case.id,
                "shrink_steps": self.shrink_steps, "shrink_seconds": round(self.shrink_seconds, 3),
                "judged": self.judged, "corpus": str(self.corpus_path) if self.corpus_path else None}


def failure_record(c: CellResult) -> dict:
    """What a corpus entry keeps of one bad cell."""
    d = {"branch": c.branch, "status": c.status, "reason": c.reason,
         "err_ratio": c.metrics.get("err_ratio") if isinstance(c.metrics, dict) else None}
    diag = getattr(c, "diagnosis", None)
    if diag:
        d["diagnosis"] = diag
    return d


def write_corpus_entry(corpus: Path, f: Finding, command: str, versions: dict) -> Path:
    """``corpus/<oracle>/<case_id>.json``: the case, the oracle, the failure it showed and how it was found
    (``cases.model.load_cases`` reads it back as the case)."""
    path = Path(corpus) / f.oracle / f"{f.case.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"case": {**f.case.to_dict(), "id": f.case.id}, "oracle": f.oracle,
             "failure": [failure_record(c) for c in f.cells],
             "found": {"by": "nsaconf search", "command": command, "date": time.strftime("%Y-%m-%d", time.gmtime()),
                       "draws_to_first": f.draws_to_first, "shrink_steps": f.shrink_steps, "versions": versions}}
    from nsaconf.harness.results import _jsonable

    path.write_text(json.dumps(_jsonable(entry), indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------------ the search
def _seed_hypothesis(seed: int) -> Callable[[], None]:
    """Seed the random source Hypothesis draws each run's seed from (the same ``--seed`` draws the same cases) and
    return what restores it. ``@hypothesis.seed`` would do it too, but it turns the example database off."""
    import random

    try:
        import hypothesis.core as core

        local = core.threadlocal
        before = getattr(local, "_hypothesis_global_random", None)
        local._hypothesis_global_random = random.Random(seed)
    except (ImportError, AttributeError):  # another Hypothesis version: unseeded draws, the database still works
        return lambda: None
    return lambda: setattr(local, "_hypothesis_global_random", before)


@dataclass
class SearchConfig:
    """What ``nsaconf search`` asks for."""

    oracles: list[str]
    device: str = "cpu"
    out: Path = Path("out/search")
    plugins: list[str] = field(default_factory=list)
    seconds: Optional[float] = None     # for all oracles together (split evenly); None: only ``examples`` bounds it
    examples: Optional[int] = None      # cases judged per oracle at most
    seed: int = 0
    corpus: Optional[Path] = None       # where minimal failing cases are written (None: nowhere)
    max_seq_len: int = 128
    max_heads: int = 32
    checks: tuple[str, ...] = ()
    diagnosis_budget: float = 10.0      # seconds to diagnose each minimal case (``harness.diagnosis``; 0: none)
    table: ToleranceTable = field(default_factory=ToleranceTable)
    timeout: float = 300.0
    isolate: bool = True
    command: str = "nsaconf search"
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
    progress_every: float = 5.0         # seconds between progress lines


@dataclass
class OracleSearch:
    """The outcome of one oracle's search."""

    oracle: str
    space: Optional[SearchSpace]
    judged: int
    seconds: float
    findings: list[Finding]
    note: str = ""
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"oracle": self.oracle, "judged": self.judged, "seconds": round(self.seconds, 3), "note": self.note,
                "versions": self.versions,
                "space": self.space.to_dict() if self.space else None, "findings": [f.to_dict() for f in self.findings]}


def search(cfg: SearchConfig) -> list[OracleSearch]:
    """Search each oracle in turn (``cfg.seconds`` split evenly), cells appended to ``cfg.out/results.jsonl``,
    minimal failing cases written to ``cfg.corpus``."""
    need_hypothesis()
    from nsaconf.harness.environment import versions

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    res = []
    writer = ResultWriter(out, resume=True)
    try:
        for name in cfg.oracles:
            budget = None if cfg.seconds is None else cfg.seconds / len(cfg.oracles)
            res.append(_search_oracle(cfg, name, budget, writer, versions()))
    finally:
        writer.close()
    return res


def _search_oracle(cfg: SearchConfig, name: str, budget: Optional[float], writer: ResultWriter, base_versions: dict) -> OracleSearch:
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis.database import DirectoryBasedExampleDatabase
    from hypothesis.errors import Unsatisfiable

    from nsaconf.harness.runner import RunConfig, Runner
    from nsaconf.oracles.base import get_oracle

    oracle = get_oracle(name)
    t0 = time.monotonic()
    why = oracle.availability()
    if why:
        cfg.echo(f"nsaconf search: {name}: not available: {why}")
        return OracleSearch(name, None, 0, 0.0, [], note=f"not available: {why}")
    space = search_space(oracle, cfg.device, cfg.max_seq_len, cfg.max_heads)
    cfg.echo(f"nsaconf search: {name}: drawing T <= {space.max_seq_len}, HQ <= {space.max_heads}, dtypes {','.join(V.DTYPE_SHORT[d] for d in space.dtypes)}, "
             f"G {space.groups}, (l,d,l') {len(space.blocks)} choices, decode {'yes' if space.decode else 'no'}, "
             f"varlen {'yes' if space.varlen else 'no'}, batch {space.batches}"
             + (f", checks {','.join(cfg.checks)}" if cfg.checks else ""))
    runner = Runner(RunConfig(cases=[], oracles=[name], device=cfg.device, out=Path(cfg.out), plugins=list(cfg.plugins),
                              table=cfg.table, isolate=cfg.isolate, timeout=cfg.timeout, progress=False,
                              echo=lambda s: None, checks=tuple(cfg.checks), diagnosis_budget=0.0))
    memo: dict[str, Optional[tuple[str, str]]] = {}
    bad_cells: dict[str, list[CellResult]] = {}
    last_fail: dict[tuple[str, str], Case] = {}
    st = {"judged": 0, "failing": 0, "first": None, "first_at": 0.0, "first_n": 0, "steps": 0, "last_print": 0.0,
          "best": {}, "firsts": {}}
    deadline = None if budget is None else t0 + budget

    def time_up() -> bool:
        return (deadline is not None and time.monotonic() > deadline) or \
               (cfg.examples is not None and st["judged"] >= cfg.examples)

    def progress(force: bool = False) -> None:
        now = time.monotonic()
        if force or now - st["last_print"] >= cfg.progress_every:
            st["last_print"] = now
            best = min(st["best"].values(), key=lambda c: (c.seq_len, c.heads_q, c.batch), default=None)
            cfg.echo(f"nsaconf search: {name}: {st['judged']} tried, {len(st['best'])} failure(s), {st['steps']} shrink "
                     f"step(s), {now - t0:.1f}s" + (f"; smallest failing so far: {sizes(best)}" if best else ""))

    def judge(case: Case) -> Optional[tuple[str, str]]:
        cells: list[CellResult] = []

        def emit(rec: CellResult) -> None:
            writer.write(rec)
            cells.append(rec)

        runner.judge(case, emit, Path(cfg.out))
        st["judged"] += 1
        sig = signature(cells)
        if sig is not None:
            bad_cells[case.id] = [c for c in cells if c.status in BAD_STATUSES]
            if st["first"] is None:
                st["first"], st["first_at"], st["first_n"] = case, time.monotonic() - t0, st["judged"]
                c0 = bad_cells[case.id][0]
                cfg.echo(f"nsaconf search: {name}: draw {st['judged']} fails ({c0.status} {c0.branch}: "
                         f"{' '.join(c0.reason.split())[:160]}); shrinking {sizes(case)}")
            if sig in st["best"]:
                st["steps"] += 1
            else:
                st["firsts"][sig] = (st["judged"], time.monotonic() - t0, case)
            st["best"][sig] = case
        progress()
        return sig

    def body(case: Case) -> None:
        if case.id in memo:
            sig = memo[case.id]
        elif time_up():
            return
        else:
            sig = memo[case.id] = judge(case)
        if sig is not None:
            last_fail[sig] = case
            raise failure_type(sig)(f"{name}: {sig[0]} {sig[1]} on {case.id}")

    body._hypothesis_internal_add_digest = space.digest() + cfg.device.encode() + b"|".join(c.encode() for c in cfg.checks)
    supported = lambda c: _supported(lambda x: oracle.check_support(x, cfg.device), c)  # noqa: E731
    strategy = case_strategy(space, supported)
    db = DirectoryBasedExampleDatabase(str(Path(cfg.out) / DATABASE_DIR))
    raised: list[SearchFailure] = []
    unsat = 0
    batch_no = 0
    seeded = _seed_hypothesis(int.from_bytes(hashlib.sha256(f"{cfg.seed}|{name}".encode()).digest()[:8], "big"))
    try:
        while not time_up() and not raised:
            test = settings(max_examples=BATCH, deadline=None, database=db, derandomize=False,
                            suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, print_blob=False,
                            phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
                            report_multiple_bugs=True)(given(strategy)(body))
            batch_no += 1
            before = st["judged"]
            try:
                test()
            except SearchFailure as e:
                raised.append(e)
            except BaseExceptionGroup as eg:  # noqa: F821 - Python >= 3.11; several signatures
                raised += [e for e in eg.exceptions if isinstance(e, SearchFailure)]
                others = [e for e in eg.exceptions if not isinstance(e, SearchFailure)]
                if others:
                    raise others[0]
            except Unsatisfiable:
                unsat += 1
            if st["judged"] == before and not raised:
                unsat += 1
                if unsat >= 3:
                    break
            else:
                unsat = 0
        if raised and cfg.diagnosis_budget > 0:  # the minimal cases judged again, now with their diagnosis
            runner.cfg.diagnosis_budget = cfg.diagnosis_budget
            for e in raised:
                case = last_fail.get(e.sig)
                if case is None:
                    continue
                again: list[CellResult] = []
                runner.judge(case, lambda rec: (writer.write(rec), again.append(rec)), Path(cfg.out))
                bad = [c for c in again if c.status in BAD_STATUSES]
                if signature(again) == e.sig:
                    bad_cells[case.id] = bad
    finally:
        oracle_versions = runner._versions(name)
        runner.close()
        seeded()
    progress(force=True)
    findings = []
    for e in raised:
        case = last_fail.get(e.sig)
        if case is None:
            continue
        n, at, first = st["firsts"].get(e.sig, (st["first_n"], st["first_at"], st["first"] or case))
        f = Finding(oracle=name, sig=e.sig, case=case, cells=bad_cells.get(case.id, []), draws_to_first=n,
                    seconds_to_first=at, first_case=first, shrink_steps=st["steps"],
                    shrink_seconds=time.monotonic() - t0 - at, judged=st["judged"])
        if cfg.corpus is not None:
            vers = dict(base_versions)
            for c in f.cells[:1]:
                vers.update(c.versions or {})
            f.corpus_path = write_corpus_entry(cfg.corpus, f, cfg.command, vers)
        findings.append(f)
    note = "" if findings or st["judged"] else "no case drawn (every draw rejected by supports())"
    return OracleSearch(name, space, st["judged"], time.monotonic() - t0, findings, note=note, versions=oracle_versions)
