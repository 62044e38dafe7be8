"""GPU timing of oracles (``nsaconf bench``), with a roofline floor per case.

Timing: CUDA events around each call, ``--warmup`` calls first, median of ``--reps`` (>= 20) calls,
rotating over enough copies of the inputs that each call reads data not left in L2 by the previous.
Ceilings are measured in the same run: a large bf16 matmul (FLOP/s) and a device-to-device copy
(bytes read + written per second). Floor of a case = ``max(FLOPs / matmul rate, bytes / copy rate)``
with FLOPs and minimum bytes counted per branch (``branch_costs``). Writes ``DIR/bench.jsonl`` (one
record per oracle x case); ``nsaconf bench`` renders it as ``DIR/performance.html``.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from nsaconf.cases.conventions import cmp_mask_matrix, num_cmp_blocks, window_mask_matrix
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import TORCH_DTYPES, Inputs, materialize, query_positions
from nsaconf.harness.environment import versions as environment_versions

L2_BYTES = 50 * 2**20           # H100 L2; inputs are rotated so that > 2x this is touched between reuses
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


# ------------------------------------------------------------------------------------ cost model
@dataclass
class Cost:
    """FLOPs (multiply-add = 2) and the fewest bytes one branch must move (inputs read once,
    outputs written once)."""

    flops: float = 0.0
    bytes: float = 0.0


def _visible_counts(case: Case, rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_keys: int) -> float:
    """Sum over queries (and batch / sequences) of the number of visible keys under ``rule``."""
    total = 0.0
    for s0, s1 in case.sequences:
        L = s1 - s0
        pos = query_positions(case)[: (L if case.cu_seqlens is not None else case.q_len)]
        if case.cu_seqlens is None:
            pos = torch.arange(case.q_offset, case.seq_len)
        for c0 in range(0, len(pos), 2048):
            total += float(rule(pos[c0:c0 + 2048], min(n_keys, L) if n_keys else L).sum())
    return total * case.batch


def branch_costs(case: Case) -> dict[str, Cost]:
    """Per-branch cost of the forward (``cmp`` = compression attention, ``topk`` = importance scoring,
    ``slc``, ``swa``; gates and pooling are folded into bytes). FLOPs count only visible keys."""
    e = BYTES[case.dtype]
    B, TQ, HQ, H, D, DV = case.batch, case.q_len, case.heads_q, case.heads_kv, case.head_dim, case.head_dim_v
    T, l, d, ls, n, w = case.seq_len, case.cmp_block, case.cmp_stride, case.block_size, case.top_n, case.window
    q_bytes, kv_bytes, o_bytes = B * TQ * HQ * D * e, B * T * H * (D + DV) * e, B * TQ * HQ * DV * e
    nc = num_cmp_blocks(T, d)
    n_cmp = _visible_counts(case, lambda p, L: cmp_mask_matrix(case.cmp_mask, p, num_cmp_blocks(L, d), l, d), 0)
    out = {"cmp": Cost(2.0 * HQ * n_cmp * (D + DV), q_bytes + kv_bytes + o_bytes + B * TQ * HQ * 4),
           "topk": Cost(2.0 * HQ * n_cmp * D, B * TQ * H * n * 4)}
    # selection: min(n*l', p+1) keys per query (the selected blocks hold at most p+1 causal keys)
    pos = torch.arange(case.q_offset, T).double() if case.cu_seqlens is None else query_positions(case).double()
    n_slc = float(torch.clamp(pos + 1, max=n * ls).sum()) * B
    out["slc"] = Cost(2.0 * HQ * n_slc * (D + DV), q_bytes + kv_bytes + o_bytes)
    if w > 0:
        keys = w if case.window_keys == "w" else w + 1
        n_swa = float(torch.clamp(pos + 1, max=keys).sum()) * B
        out["swa"] = Cost(2.0 * HQ * n_swa * (D + DV), q_bytes + kv_bytes + o_bytes)
    return out


def dense_causal_cost(case: Case) -> Cost:
    """Dense causal attention over all T keys (the SDPA baseline)."""
    e = BYTES[case.dtype]
    B, TQ, HQ, H, D, DV, T = case.batch, case.q_len, case.heads_q, case.heads_kv, case.head_dim, case.head_dim_v, case.seq_len
    pos = torch.arange(case.q_offset, T).double()
    keys = float((pos + 1).sum()) * B
    return Cost(2.0 * HQ * keys * (D + DV), B * TQ * HQ * (D + DV) * e + B * T * H * (D + DV) * e)


BRANCH_PARTS = {"cmp_o": ("cmp",), "cmp_lse": ("cmp",), "topk_idx": ("cmp", "topk"), "slc_o": ("slc",),
                "swa_o": ("swa",), "o": ("cmp", "topk", "slc", "swa")}


def cost_of(case: Case, branches: tuple[str, ...]) -> Cost:
    """Cost of computing ``branches`` together: FLOPs of the distinct parts they need; bytes = q, k, v
    (and the gates for ``o``) read once + each returned branch written once."""
    e = BYTES[case.dtype]
    B, TQ, HQ, H, D, DV, T = case.batch, case.q_len, case.heads_q, case.heads_kv, case.head_dim, case.head_dim_v, case.seq_len
    parts = {p for b in branches for p in BRANCH_PARTS.get(b, ())}
    costs = branch_costs(case)
    flops = sum(c.flops for p, c in costs.items() if p in parts)
    out_bytes = {"cmp_o": B * TQ * HQ * DV * e, "slc_o": B * TQ * HQ * DV * e, "swa_o": B * TQ * HQ * DV * e,
                 "o": B * TQ * HQ * (DV * e + 3 * e), "cmp_lse": B * TQ * HQ * 4, "topk_idx": B * TQ * H * case.top_n * 4}
    nbytes = B * TQ * HQ * D * e + B * T * H * (D + DV) * e + sum(out_bytes.get(b, 0) for b in branches)
    return Cost(flops, float(nbytes))


# ------------------------------------------------------------------------------------ timing
@dataclass
class Ceilings:
    """Measured in the run: bf16 matmul TFLOP/s and D2D copy GB/s (read + write)."""

    matmul_tflops: float
    copy_gbps: float
    device: str


def measure_ceilings(reps: int = 20) -> Ceilings:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_fn(lambda: torch.matmul(a, b), reps=reps, warmup=3)
    x = torch.empty(2**30 // 2, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    ms_copy = time_fn(lambda: y.copy_(x), reps=reps, warmup=3)
    del a, b, x, y
    return Ceilings(2 * n**3 / ms / 1e9, 2 * 2**30 / ms_copy / 1e6, torch.cuda.get_device_name())


def time_fn(fn: Callable[[], object], reps: int = 20, warmup: int = 3,
            rotate: Optional[list[Callable[[], object]]] = None) -> float:
    """Median ms of ``reps`` calls, each bracketed by CUDA events. ``rotate``: several closures over
    different input copies used in turn (defeats L2 reuse)."""
    fns = rotate or [fn]
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fns[i % len(fns)]()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def input_copies(case: Case, inputs: Inputs) -> int:
    """How many input copies to rotate over so that > 2x L2 is touched between reuses (max 8)."""
    nbytes = sum(t.numel() * t.element_size() for t in inputs.as_dict().values())
    return int(min(8, max(1, -(-2 * L2_BYTES // max(nbytes, 1)))))


def clone_inputs(inputs: Inputs) -> Inputs:
    return Inputs(**{k: (None if v is None else v.clone()) for k, v in vars(inputs).items()})


@dataclass
class BenchRecord:
    """One oracle x case timing (``bench.jsonl`` line)."""

    case: str
    oracle: str
    layer: str
    branches: list[str]
    ms: float
    reps: int
    flops: float
    bytes: float
    floor_ms: float
    pct_of_floor: float          # 100 * floor / ms: 100 % = at the roofline
    ratio_to_fastest: float = 1.0
    group: str = ""              # records compared in ratio_to_fastest share the case and branch set
    device: str = ""
    ceilings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    note: str = ""


def make_record(case: Case, oracle: str, layer: str, branches: tuple[str, ...], ms: float, reps: int,
                cost: Cost, ceil: Ceilings, versions: Optional[dict] = None, note: str = "", group: str = "") -> BenchRecord:
    floor = max(cost.flops / (ceil.matmul_tflops * 1e9), cost.bytes / (ceil.copy_gbps * 1e6))
    return BenchRecord(case=case.id, oracle=oracle, layer=layer, branches=list(branches), ms=ms, reps=reps,
                       flops=cost.flops, bytes=cost.bytes, floor_ms=floor, pct_of_floor=100.0 * floor / ms if ms else 0.0,
                       group=f"T{case.seq_len}|{group}" if group else f"{case.id}|{','.join(sorted(branches))}", device=ceil.device,
                       ceilings={"matmul_tflops": round(ceil.matmul_tflops, 1), "copy_gbps": round(ceil.copy_gbps, 1)},
                       versions=versions or {}, note=note)


def fill_ratios(records: list[BenchRecord]) -> None:
    """``ratio_to_fastest = ms / min(ms)`` within each group."""
    best: dict[str, float] = {}
    for r in records:
        best[r.group] = min(best.get(r.group, float("inf")), r.ms)
    for r in records:
        r.ratio_to_fastest = r.ms / best[r.group]


def write_records(out: Path, records: list[BenchRecord]) -> Path:
    """``out/bench.jsonl``, one record per line (``nsaconf.reports.performance`` renders it)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.jsonl"
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
    return path


# ------------------------------------------------------------------------------------ command
def bench_oracles(cases: list[Case], oracle_names: list[str], reps: int, warmup: int, log=print,
                  on_record: Optional[Callable[[list[BenchRecord]], None]] = None) -> list[BenchRecord]:
    """Time ``oracle.run`` (forward branches: inside ``forward_only()``) for every supported (case,
    oracle) on CUDA; ``on_record(records so far)``
    after each timing (the CLI rewrites DIR/bench.jsonl, so a run cut off by a time limit keeps them)."""
    from nsaconf.oracles.base import GRAD_BRANCHES, forward_only, get_oracle
    from nsaconf.oracles.reference import nsa_reference
    ceil = measure_ceilings()
    log(f"ceilings on {ceil.device}: bf16 matmul {ceil.matmul_tflops:.0f} TFLOP/s, D2D copy {ceil.copy_gbps:.0f} GB/s")
    records: list[BenchRecord] = []
    oracles = [get_oracle(n) for n in oracle_names]
    for case in cases:
        inputs = materialize(case, "cuda")
        copies = [inputs] + [clone_inputs(inputs) for _ in range(input_copies(case, inputs) - 1)]
        given = None
        for o in oracles:
            why = o.check_support(case, "cuda")
            if why:
                log(f"SKIP {case.id} {o.name}: {why}")
                continue
            bi = None
            if o.needs_block_indices:
                if given is None:
                    given = (inputs.block_indices if case.block_indices == "random"
                             else nsa_reference(case, inputs, dtype=None)["topk_idx"])
                bi = given
            branches = tuple(b for b in o.branches if (b != "swa_o" or case.window > 0) and b not in GRAD_BRANCHES)
            fns = [lambda x=x, o=o, bi=bi: o.run(case, x, "cuda", block_indices=bi) for x in copies]
            try:
                with forward_only():      # oracles that also compute gradients time their forward only
                    ms = time_fn(fns[0], reps=reps, warmup=warmup, rotate=fns)
            except Exception as e:  # noqa: BLE001  (a failing oracle is reported, not fatal)
                log(f"FAIL {case.id} {o.name}: {type(e).__name__}: {str(e)[:200]}")
                continue
            rec = make_record(case, o.name, o.layer, branches, ms, reps, cost_of(case, branches), ceil,
                              {**environment_versions(), **o.versions()})
            log(f"{case.id} {o.name}: {ms:.3f} ms ({rec.pct_of_floor:.0f} % of floor)")
            records.append(rec)
            if on_record is not None:
                fill_ratios(records)
                on_record(records)
    fill_ratios(records)
    return records


def default_bench_oracles() -> tuple[list[str], list[tuple[str, str]]]:
    """The oracles ``nsaconf bench`` times without ``--oracles``: every registered CUDA oracle except
    those declaring ``not_timed_by_default``; returns (names, [(left-out name, reason)])."""
    from nsaconf.oracles.base import registry
    names, left_out = [], []
    for name, cls in sorted(registry().items()):
        if "cuda" not in cls.devices:
            continue
        if cls.not_timed_by_default:
            left_out.append((name, cls.not_timed_by_default))
        else:
            names.append(name)
    return names, left_out
