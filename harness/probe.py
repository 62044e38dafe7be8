"""Receptive-field probe: which NSA conventions does an oracle really compute?

Black-box measurement of the dependency matrix of one output branch::

    M[p, s] = 1  iff  max_{h,c} |out[p, h, c](k, v with position s perturbed) - out[p, h, c](k, v)| > thr

Perturbations are batched: one forward call carries ``S = batch x kv heads`` independent copies of the
same sequence (every kv head's data is a copy of kv head 0, with its query-head group, gates and block
indices), copy i with key AND value of one position ``s_i`` perturbed by a fixed random
``amplitude * N(0, 1)`` vector (deterministic seed; fp16/bf16 OR two draws). A T=128 probe costs
``2 + ceil(T / S)`` calls (S = 64 by default): 2 unperturbed calls give the baseline and the oracle's
own noise. ``thr = max(8 * noise, floor[dtype] * max|out|)`` is reported with the smallest kept signal.

``M`` is compared with the dense mask every canonical convention predicts (built only from
``cases.conventions``):

* ``cmp_o``: ``M[p, s] = exists c: CMP_MASKS[conv](c, p, l, d) and c*d <= s < c*d + l`` (and s < T);
* ``swa_o``: ``WINDOW_KEYS[conv](p, s, w)``;
* ``slc_o``: ``s`` in a selected block and ``selection_causal(p, s)`` (convention name ``causal``);
* ``o``: the union of the three (names ``cmp_mask/window_keys``).

The exact match is the classification; otherwise ``unknown`` with the nearest convention (fewest
differing cells). Any dependence on ``s > p`` is a causality leak (count and first ``(p, s)``).
``probe_module`` does the same for any callable mapping tokens ``[B, T, dim] -> [B, T, dim']``.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from nsaconf.cases.conventions import (CMP_MASKS, WINDOW_KEYS, cmp_block_covers, cmp_mask_matrix, num_cmp_blocks,
                               selection_key_mask, window_mask_matrix)
from nsaconf.cases.model import Case, CaseError
from nsaconf.cases.tensors import Inputs, materialize
from nsaconf.cases.vocabulary import BRANCH_ALIASES, PROBE_BRANCHES, SLC_CONVENTION  # noqa: F401 (re-exported)
from nsaconf.harness.worker import Reply, Worker, collect_all
from nsaconf.oracles.base import Oracle, OracleError, get_oracle

DTYPE_PREFERENCE = ("float64", "float32", "float16", "bfloat16")  # most mantissa bits first
# relative noise floor of the threshold, times max|out| of the branch
# (an unperturbed-but-masked key changes nothing bit-for-bit in a deterministic kernel, so the floor is
# small; the measured noise dominates for non-deterministic kernels)
NOISE_FLOOR = {"float64": 1e-12, "float32": 1e-7, "float16": 1e-5, "bfloat16": 1e-4}
NOISE_FACTOR = 8.0
LOW_PRECISION_DRAWS = 2  # fp16/bf16: independent perturbation draws, dependencies OR-ed
BATCH_CHOICES = (64, 32, 16, 8, 4, 2, 1)


class ProbeError(Exception):
    """The probe cannot run (one-line reason)."""


@dataclass(frozen=True)
class ProbeConfig:
    """Shape of the probe case (conventions are chosen per oracle)."""

    seq_len: int = 128
    block_size: int = 16
    window: int = 32
    cmp_block: Optional[int] = None
    cmp_stride: Optional[int] = None
    top_n: int = 4
    heads_q: int = 16
    heads_kv: int = 1
    head_dim: int = 32
    seed: int = 0
    amplitude: float = 2.0
    max_slots: int = 64  # perturbed copies per forward call (batch x kv heads)


# (heads_q, heads_kv, head_dim) tried in order: many kv heads first (each carries its own perturbation,
# so a call covers batch x heads positions), then shapes for kernels with group-size / head-dim limits
HEAD_SHAPES = ((16, 16, 32), (16, 1, 32), (16, 1, 64), (32, 2, 64), (16, 1, 128))


# ------------------------------------------------------------------------------------------------------
# Predicted masks (from cases.conventions only)
# ------------------------------------------------------------------------------------------------------


def cmp_dependency_mask(cmp_mask: str, T: int, l: int, d: int) -> torch.Tensor:
    """Bool ``[T, T]``: ``exists c: CMP_MASKS[cmp_mask](c, p, l, d) and cmp_block_covers(c, s, l, d)``."""
    pos = torch.arange(T)
    nc = num_cmp_blocks(T, d)
    vis = cmp_mask_matrix(cmp_mask, pos, nc, l, d).double()  # [T, NC]
    c = torch.arange(nc)[:, None]
    cover = cmp_block_covers(c, pos[None, :], l, d).double()  # [NC, T]
    return (vis @ cover) > 0


def window_dependency_mask(window_keys: str, T: int, w: int) -> torch.Tensor:
    """Bool ``[T, T]``: ``WINDOW_KEYS[window_keys](p, s, w)``."""
    pos = torch.arange(T)
    return window_mask_matrix(window_keys, pos, pos, w)


def selection_dependency_mask(idx: torch.Tensor, T: int, ls: int) -> torch.Tensor:
    """Bool ``[T, T]`` from block indices ``[T, H, n]`` (-1 padding): s in a block selected for p by any
    kv head, and ``selection_causal(p, s)``."""
    pos = torch.arange(T)
    blk = (pos // ls)[None, None, None, :]  # [1,1,1,T]
    chosen = ((idx.long()[..., None] == blk) & (idx[..., None] >= 0)).any(dim=2).any(dim=1)  # [T, T]
    return chosen & selection_key_mask(pos, pos)


def expected_name(branch: str, cmp_mask: str, window_keys: str, window: int) -> str:
    """Convention name of a branch for the given conventions."""
    if branch == "cmp_o":
        return cmp_mask
    if branch == "swa_o":
        return window_keys
    if branch == "slc_o":
        return SLC_CONVENTION
    return f"{cmp_mask}/{window_keys}" if window > 0 else cmp_mask


# ------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """One (oracle, branch) probe: observed ``matrix`` and its classification."""

    oracle: str
    branch: str
    matrix: torch.Tensor                      # bool [T, T] observed M[p, s]
    candidates: dict[str, torch.Tensor]       # convention name -> predicted bool [T, T]
    threshold: float
    noise: float
    calls: int
    case: Optional[Case] = None
    dont_care: Optional[torch.Tensor] = None  # cells ignored (dependency through the oracle's own top-k)
    expected_convention: Optional[str] = None  # the case's, when the oracle follows the case
    claimed_convention: Optional[str] = None   # from the oracle's fixed_conventions
    min_signal: Optional[float] = None         # smallest above-threshold change
    nan_rows: int = 0
    # filled by classify()
    convention: str = "unknown"
    matches: list[str] = field(default_factory=list)
    nearest: Optional[str] = None
    differing_cells: int = 0
    differences: list[tuple[int, int, str]] = field(default_factory=list)  # (p, s, '+'|'-') vs nearest
    distances: dict[str, int] = field(default_factory=dict)
    leaks: int = 0
    first_leak: Optional[tuple[int, int]] = None
    gated: Optional[str] = None  # ``o`` only: conventions of the gate-isolated re-probes

    def __post_init__(self) -> None:
        self.classify()

    # -------------------------------------------------------------------------------------------
    def _diff(self, mask: torch.Tensor) -> torch.Tensor:
        d = self.matrix ^ mask
        if self.dont_care is not None:
            d &= ~self.dont_care
        return d

    def classify(self) -> None:
        """Exact match, else nearest convention; leaks (s > p)."""
        self.distances = {name: int(self._diff(m).sum()) for name, m in self.candidates.items()}
        self.matches = [n for n, dist in self.distances.items() if dist == 0]
        if len(self.matches) == 1:
            self.convention = self.matches[0]
        elif len(self.matches) > 1:
            pref = [n for n in self.matches if n in (self.expected_convention, self.claimed_convention)]
            self.convention = "ambiguous(" + "|".join(self.matches) + ")"
            self.matches = pref + [n for n in self.matches if n not in pref]
        else:
            self.convention = "unknown"
        self.nearest = min(self.distances, key=lambda n: (self.distances[n], n != self.expected_convention)) if self.distances else None
        ref = self.reference_name()
        self.differing_cells = self.distances.get(self.nearest, 0) if self.nearest else 0
        self.differences = []
        if ref is not None:
            d = self._diff(self.candidates[ref])
            for p, s in d.nonzero().tolist()[:200]:
                self.differences.append((p, s, "+" if bool(self.matrix[p, s]) else "-"))
        T = self.matrix.shape[0]
        future = torch.triu(torch.ones(T, self.matrix.shape[1], dtype=torch.bool), diagonal=1)
        leak = self.matrix & future
        self.leaks = int(leak.sum())
        nz = leak.nonzero()
        self.first_leak = (int(nz[0, 0]), int(nz[0, 1])) if len(nz) else None

    def reference_name(self) -> Optional[str]:
        """The mask the ASCII/HTML diff is drawn against: expected, else claimed, else nearest."""
        for n in (self.expected_convention, self.claimed_convention, self.nearest):
            if n is not None and n in self.candidates:
                return n
        return None

    @property
    def finding(self) -> str:
        """``leak`` (critical) > ``mismatch`` (differs from expected/claimed) > ``unknown`` > ``ok``."""
        if self.leaks:
            return "leak"
        target = self.expected_convention or self.claimed_convention
        if target is not None and target not in self.matches:
            return "mismatch"
        if self.convention == "unknown":
            return "unknown"
        return "ok"

    def diff_chars(self) -> list[str]:
        """Rows of ``.`` agree-no-dep, ``#`` agree-dep, ``+`` extra, ``-`` missing, ``~`` ignored
        (top-k mediated) against ``reference_name()``."""
        ref = self.reference_name()
        exp = self.candidates[ref] if ref else torch.zeros_like(self.matrix)
        return diff_rows(self.matrix, exp, self.dont_care)

    def to_record(self) -> dict:
        ref = self.reference_name()
        c = self.case
        return {
            "oracle": self.oracle,
            "branch": self.branch,
            "convention": self.convention,
            "matches": list(self.matches),
            "expected_convention": self.expected_convention,
            "claimed_convention": self.claimed_convention,
            "nearest": self.nearest,
            "diff_against": ref,
            "finding": self.finding,
            "gated": self.gated,
            "leaks": self.leaks,
            "first_leak": list(self.first_leak) if self.first_leak else None,
            "differing_cells": self.differing_cells,
            "differing_vs_reference": self.distances.get(ref) if ref else None,
            "differences": [[p, s, k] for p, s, k in self.differences[:50]],
            "distances": dict(self.distances),
            "threshold": self.threshold,
            "noise": self.noise,
            "min_signal": self.min_signal,
            "nan_rows": self.nan_rows,
            "calls": self.calls,
            "seq_len": int(self.matrix.shape[0]),
            "block_size": c.block_size if c else None,
            "cmp_block": c.cmp_block if c else None,
            "cmp_stride": c.cmp_stride if c else None,
            "window": c.window if c else None,
            "block_indices": c.block_indices if c else None,
            "dtype": c.dtype if c else None,
            "case_id": c.id if c else None,
            "matrix": bits(self.matrix),
            "expected_matrix": bits(self.candidates[ref]) if ref else None,
            "dont_care": bits(self.dont_care) if self.dont_care is not None else None,
            "skipped": None,
        }


def bits(m: torch.Tensor) -> list[str]:
    """Bool matrix -> list of '0'/'1' strings (one per row)."""
    return ["".join("1" if x else "0" for x in row) for row in m.tolist()]


def diff_rows(obs: torch.Tensor, exp: torch.Tensor, dont_care: Optional[torch.Tensor] = None) -> list[str]:
    rows = []
    dc = dont_care if dont_care is not None else torch.zeros_like(obs)
    for o_row, e_row, d_row in zip(obs.tolist(), exp.tolist(), dc.tolist()):
        rows.append("".join(("~" if o else ".") if d else ("#" if o and e else "+" if o else "-" if e else ".")
                            for o, e, d in zip(o_row, e_row, d_row)))
    return rows


def skipped_record(oracle: str, branch: str, reason: str, finding: str = "skipped") -> dict:
    """A record for an (oracle, branch) that could not be probed; ``skipped`` holds the reason and
    ``finding`` is ``skipped`` (unsupported / unavailable) or ``error`` (the oracle failed)."""
    keys = ("convention", "matches", "gated", "expected_convention", "claimed_convention", "nearest", "diff_against",
            "leaks", "first_leak", "differing_cells", "differing_vs_reference", "differences", "distances", "threshold", "noise",
            "min_signal", "nan_rows", "calls", "seq_len", "block_size", "cmp_block", "cmp_stride", "window",
            "block_indices", "dtype", "case_id", "matrix", "expected_matrix", "dont_care")
    rec = {"oracle": oracle, "branch": branch, **{k: None for k in keys}}
    rec.update(finding=finding, skipped=reason)
    return rec


# ------------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------------


def _change(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``[S, TQ, ...] -> [S, TQ]``: max abs difference over the trailing dims; NaN mismatch = inf."""
    out, base = out.double(), base.double().expand_as(out)
    d = (out - base).abs()
    both_nan = torch.isnan(out) & torch.isnan(base)
    d = torch.where(both_nan, torch.zeros_like(d), d)
    d = torch.nan_to_num(d, nan=float("inf"))
    return d.flatten(2).amax(-1) if d.dim() > 2 else d


@dataclass
class Measurement:
    """Observed dependencies of one output: ``matrix`` bool ``[T, T]``, ``change`` (max abs change)."""

    matrix: torch.Tensor
    change: torch.Tensor
    threshold: float
    noise: float
    base: torch.Tensor


def measure_dependencies(call: Callable[[list[Optional[int]]], dict[str, torch.Tensor]], T: int, slots: int,
                         dtype: str, branches: tuple[str, ...], base_slots: Optional[int] = None
                         ) -> tuple[dict[str, Measurement], int, dict]:
    """Run the batched perturbation design.

    ``call(positions)`` runs one forward whose ``len(positions) == slots`` independent copies of the
    same sequence have position ``positions[i]`` perturbed in copy i (None: unperturbed) and returns
    ``{branch: [slots, T, ...]}`` on the CPU. Two unperturbed calls of ``base_slots`` copies (a divisor
    of ``slots``; default ``slots``) give the baseline and the noise. Returns per branch a
    ``Measurement``, the number of calls and the first unperturbed output.
    """
    nb = base_slots or slots
    base_a = call([None] * nb)
    base_b = call([None] * nb)
    calls = 2
    missing = [b for b in branches if b not in base_a]
    if missing:
        raise ProbeError(f"oracle returned no {', '.join(missing)}")
    noise = {b: max(float(_change(base_b[b], base_a[b]).max()), float(_change(base_a[b], base_a[b][:1]).max()))
             for b in branches}
    change = {b: torch.zeros(T, T, dtype=torch.float64) for b in branches}  # [p, s]
    for s0 in range(0, T, slots):
        pos: list[Optional[int]] = list(range(s0, min(s0 + slots, T)))
        pos += [None] * (slots - len(pos))
        out = call(pos)
        calls += 1
        for b in branches:
            ch = _change(out[b], base_a[b].repeat(slots // nb, *([1] * (base_a[b].dim() - 1))))  # [S, T]
            for i, s in enumerate(pos):
                if s is None:
                    noise[b] = max(noise[b], float(ch[i].max()))
                else:
                    change[b][:, s] = ch[i]
    res = {}
    for b in branches:
        if noise[b] == float("inf"):
            raise ProbeError(f"branch {b}: identical inputs gave different NaN/Inf patterns (non-deterministic)")
        finite = base_a[b][torch.isfinite(base_a[b])]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        thr = max(NOISE_FACTOR * noise[b], NOISE_FLOOR.get(dtype, 1e-3) * max(scale, 1e-30))
        res[b] = Measurement(change[b] > thr, change[b], thr, noise[b], base_a[b][0])
    return res, calls, base_a


def candidate_dtypes(oracle: Oracle) -> list[str]:
    """The oracle's declared float dtypes, most mantissa bits first."""
    out = [d for d in DTYPE_PREFERENCE if d in oracle.dtypes]
    if not out:
        raise ProbeError(f"{oracle.name} declares no float dtype")
    return out


def convention_candidates(oracle: Oracle, cmp_mask: Optional[str] = None, window_keys: Optional[str] = None):
    """(cmp_mask, window_keys) pairs to try, the oracle's fixed (claimed) ones first."""
    fixed = oracle.fixed_conventions or {}
    cms = [cmp_mask] if cmp_mask else ([fixed["cmp_mask"]] if "cmp_mask" in fixed else []) + [c for c in CMP_MASKS if c != fixed.get("cmp_mask")]
    wks = [window_keys] if window_keys else ([fixed["window_keys"]] if "window_keys" in fixed else []) + [w for w in WINDOW_KEYS if w != fixed.get("window_keys")]
    return list(itertools.product(cms, wks))


def probe_case(cfg: ProbeConfig, heads: tuple[int, int, int] = HEAD_SHAPES[0], dtype: str = "float64",
               cmp_mask: Optional[str] = None, window_keys: Optional[str] = None, block_indices: str = "random",
               other: Optional[dict] = None) -> Case:
    """The batch-1 probe case of ``cfg`` with ``heads = (heads_q, heads_kv, head_dim)`` (conventions:
    the first of ``CMP_MASKS`` / ``WINDOW_KEYS`` unless given; ``other``: more case fields, e.g. an oracle's
    claimed ``forced_blocks``); ProbeError ``bad probe parameters: ...`` when ``cfg`` makes no valid case."""
    hq, h, dh = heads
    try:
        return Case(batch=1, seq_len=cfg.seq_len, heads_q=hq, heads_kv=h, head_dim=dh, dtype=dtype,
                    block_size=cfg.block_size, cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride, top_n=cfg.top_n,
                    window=cfg.window, cmp_mask=cmp_mask or next(iter(CMP_MASKS)),
                    window_keys=window_keys or next(iter(WINDOW_KEYS)), block_indices=block_indices, seed=cfg.seed,
                    **(other or {}))
    except CaseError as e:
        raise ProbeError(f"bad probe parameters: {e}") from None


def probed_branches(oracle: Oracle, branches: Optional[tuple[str, ...]] = None, window: int = 1) -> list[str]:
    """The branches of ``branches`` (default ``PROBE_BRANCHES``) the oracle returns; no ``swa_o`` when
    ``window == 0``."""
    return [b for b in (branches or PROBE_BRANCHES) if b in oracle.branches and not (b == "swa_o" and window == 0)]


def probe_cases(oracle: Oracle, device: str, cfg: ProbeConfig, cmp_mask: Optional[str] = None,
                window_keys: Optional[str] = None, head_shapes: tuple = HEAD_SHAPES, want: tuple[str, ...] = ()):
    """Yield ``(case, batch)`` the oracle supports, in order of preference: head shapes (many kv heads
    first: each kv head carries its own perturbation), dtypes (most precise first), conventions (claimed
    first; its other claimed fields, e.g. ``forced_blocks``, set), ``block_indices`` (random first); one case
    per (head shape, dtype): the first on which every branch of ``want`` is supported (``branch_supports``),
    else the first supported. Raises ProbeError with the refusal reasons when none (more) is supported."""
    reasons: list[str] = []
    other = {k: v for k, v in (oracle.fixed_conventions or {}).items() if k not in ("cmp_mask", "window_keys")}
    for hq, h, dh in head_shapes:
        for dtype in candidate_dtypes(oracle):
            chosen = first = None
            for cm, wk in convention_candidates(oracle, cmp_mask, window_keys):
                for bi in ("random", "topk"):
                    case = probe_case(cfg, (hq, h, dh), dtype, cm, wk, bi, other)
                    why = oracle.check_support(case, device)
                    if why:
                        if why not in reasons:
                            reasons.append(why)
                        continue
                    first = first or case
                    if all(oracle.branch_supports(case, b) is None for b in want):
                        chosen = case
                        break
                if chosen is not None:
                    break
            case = chosen or first
            if case is None:
                continue
            want_b = max(1, -(-cfg.max_slots // h))
            batch = next(b for b in BATCH_CHOICES if b == 1 or (b <= want_b and oracle.check_support(case.replace(batch=b), device) is None))
            yield case, batch
    raise ProbeError("; ".join(reasons[-2:]) or "no supported probe case")


@torch.no_grad()
def probe_oracle(oracle: Oracle | str, device: str = "cpu", cfg: ProbeConfig = ProbeConfig(),
                 branches: Optional[tuple[str, ...]] = None, cmp_mask: Optional[str] = None,
                 window_keys: Optional[str] = None, head_shapes: tuple = HEAD_SHAPES) -> list[ProbeResult]:
    """Probe the branches of an oracle (default: every one of ``cmp_o, slc_o, swa_o, o`` it returns).

    Tries the supported probe cases in ``probe_cases`` order and keeps the first that runs."""
    if isinstance(oracle, str):
        oracle = get_oracle(oracle)
    want = probed_branches(oracle, branches, cfg.window)
    if not want:
        raise ProbeError(f"{oracle.name} returns none of the probed branches {', '.join(branches or PROBE_BRANCHES)}")
    errors = []
    gen = probe_cases(oracle, device, cfg, cmp_mask, window_keys, head_shapes, tuple(want))
    while True:
        try:
            case, batch = next(gen)
        except ProbeError as e:
            raise ProbeError(errors[0] if errors else str(e)) from None
        runs = [b for b in want if oracle.branch_supports(case, b) is None]  # a branch it SKIPs here is not probed
        if not runs:
            raise ProbeError(f"{oracle.name} computes none of {', '.join(want)} on the probe case "
                             f"({oracle.branch_supports(case, want[0])})")
        try:
            return _probe_case(oracle, device, cfg, case, batch, runs,
                               configured=tuple(k for k, v in (("cmp_mask", cmp_mask), ("window_keys", window_keys)) if v))
        except ProbeError as e:
            if "run failed" not in str(e):
                raise
            errors.append(str(e))


def _probe_inputs(case: Case) -> Inputs:
    """Batch-1 inputs whose kv heads (and their query-head groups, gates and block indices) are copies
    of kv head 0, so that every kv head can carry an independent perturbation."""
    x = materialize(case, "cpu")
    H, G = case.heads_kv, case.group
    return Inputs(q=x.q[:, :, :G].repeat(1, 1, H, 1), k=x.k[:, :, :1].repeat(1, 1, H, 1),
                  v=x.v[:, :, :1].repeat(1, 1, H, 1), g_cmp=x.g_cmp[:, :, :G].repeat(1, 1, H),
                  g_slc=x.g_slc[:, :, :G].repeat(1, 1, H), g_swa=x.g_swa[:, :, :G].repeat(1, 1, H),
                  block_indices=None if x.block_indices is None else x.block_indices[:, :, :1].repeat(1, 1, H, 1))


def _probe_case(oracle: Oracle, device: str, cfg: ProbeConfig, case: Case, batch: int, want: list[str],
                configured: tuple[str, ...] = ()) -> list[ProbeResult]:
    """Probe ``want`` on ``case``; ``configured``: the convention fields the caller set on the probe case,
    whose claim is then the case's value (an adapter may translate a case away from its native convention)."""
    T, H, G = case.seq_len, case.heads_kv, case.group
    S = batch * H
    base_in = _probe_inputs(case)
    gen = torch.Generator().manual_seed(case.seed + 7919)
    draws = LOW_PRECISION_DRAWS if case.dtype in ("float16", "bfloat16") else 1
    deltas = [((cfg.amplitude * torch.randn((T, case.head_dim), generator=gen, dtype=torch.float64)).to(base_in.k.dtype),
               (cfg.amplitude * torch.randn((T, case.head_dim_v), generator=gen, dtype=torch.float64)).to(base_in.v.dtype))
              for _ in range(draws)]
    draw = [0]
    given_idx = None
    if oracle.needs_block_indices:
        if case.block_indices == "random":
            given_idx = base_in.block_indices
        else:
            from nsaconf.oracles.reference import nsa_reference
            given_idx = nsa_reference(case, base_in)["topk_idx"]
    ask = tuple(dict.fromkeys(want + (["topk_idx"] if "topk_idx" in oracle.branches else [])))

    def call(pos: list[Optional[int]], gates=(1.0, 1.0, 1.0)) -> dict[str, torch.Tensor]:
        batch = len(pos) // H
        rep = lambda x: None if x is None else x.expand(batch, *x.shape[1:]).contiguous()  # noqa: E731
        k, v = rep(base_in.k).clone(), rep(base_in.v).clone()
        for i, s in enumerate(pos):
            if s is not None:
                b, h = divmod(i, H)
                k[b, s, h] += deltas[draw[0]][0][s]
                v[b, s, h] += deltas[draw[0]][1][s]
        inp = Inputs(q=rep(base_in.q), k=k, v=v, g_cmp=rep(base_in.g_cmp) * gates[0],
                     g_slc=rep(base_in.g_slc) * gates[1], g_swa=rep(base_in.g_swa) * gates[2],
                     block_indices=rep(base_in.block_indices)).to(device)
        kw = {"block_indices": rep(given_idx).to(device)} if given_idx is not None else {}
        try:
            out = oracle.run(case.replace(batch=batch), inp, device, **kw)
        except Exception as e:  # noqa: BLE001 - foreign code: one-line reason
            msg = str(e).splitlines()[0] if str(e) else ""
            raise ProbeError(f"{oracle.name}.run failed on {case.id}: {type(e).__name__}: {msg}") from None
        res = {}
        for name in ask:
            if name not in out:
                continue
            t = out[name].detach().to("cpu")
            if name == "topk_idx":
                res[name] = t
            elif tuple(t.shape[:3]) != (batch, T, case.heads_q):
                raise ProbeError(f"{oracle.name} returned {name} of shape {tuple(t.shape)}, expected [{batch}, {T}, {case.heads_q}, DV]")
            else:  # [B, T, HQ, DV] -> [B*H, T, G*DV]: slot b*H + h holds the query heads of kv head h
                res[name] = t.reshape(batch, T, H, -1).transpose(1, 2).reshape(batch * H, T, -1)
        return res

    measured, calls, base_out = measure_dependencies(call, T, S, case.dtype, tuple(want), base_slots=H)
    for draw[0] in range(1, draws):  # low precision: OR of independent draws (a tiny effect may round away)
        more, c2, _ = measure_dependencies(call, T, S, case.dtype, tuple(want), base_slots=H)
        calls += c2
        for b, m in measured.items():
            o = more[b]
            measured[b] = Measurement(m.matrix | o.matrix, torch.maximum(m.change, o.change), max(m.threshold, o.threshold),
                                      max(m.noise, o.noise), m.base)
    draw[0] = 0
    fixed = oracle.fixed_conventions
    if fixed:
        fixed = {k: (getattr(case, k) if k in configured else v) for k, v in fixed.items()}
    sel_cache: dict[str, torch.Tensor] = {}

    def sel_idx(cm: str) -> torch.Tensor:
        """Block indices the oracle used: given, its own top-k output, or the reference top-k for cm."""
        if case.block_indices == "random":
            return base_in.block_indices[0]
        if given_idx is not None:
            return given_idx[0]
        if "topk_idx" in base_out:
            return base_out["topk_idx"][0]
        if cm not in sel_cache:
            from nsaconf.oracles.reference import nsa_reference
            sel_cache[cm] = nsa_reference(case.replace(cmp_mask=cm), base_in)["topk_idx"][0]
        return sel_cache[cm]

    l, d, ls, w = case.cmp_block, case.cmp_stride, case.block_size, case.window
    own_topk = case.block_indices == "topk" and given_idx is None
    cmp_c = {cm: cmp_dependency_mask(cm, T, l, d) for cm in CMP_MASKS}
    swa_c = {wk: window_dependency_mask(wk, T, w) for wk in WINDOW_KEYS} if w > 0 else {}
    results = []
    for b in want:
        m = measured[b]
        dont_care = None
        if b == "cmp_o":
            cands = cmp_c
        elif b == "swa_o":
            cands = swa_c
        elif b == "slc_o":
            sel = selection_dependency_mask(sel_idx(case.cmp_mask), T, ls)
            cands = {SLC_CONVENTION: sel}
            if own_topk:  # perturbing a key moves the oracle's own top-k: causal non-selected cells ignored
                dont_care = selection_key_mask(torch.arange(T), torch.arange(T)) & ~sel
        else:
            cands = {}
            for cm in CMP_MASKS:
                base_mask = cmp_c[cm] | selection_dependency_mask(sel_idx(cm), T, ls)
                if w > 0:
                    for wk in WINDOW_KEYS:
                        cands[f"{cm}/{wk}"] = base_mask | swa_c[wk]
                else:
                    cands[cm] = base_mask
        exp = None if fixed else expected_name(b, case.cmp_mask, case.window_keys, w)
        claimed = None
        if fixed:
            claimed = expected_name(b, fixed.get("cmp_mask", case.cmp_mask), fixed.get("window_keys", case.window_keys), w)
        sig = m.change[m.matrix]
        r = ProbeResult(oracle=oracle.name, branch=b, matrix=m.matrix, candidates=cands, threshold=m.threshold,
                        noise=m.noise, calls=calls, case=case, dont_care=dont_care, expected_convention=exp,
                        claimed_convention=claimed if claimed in cands else None,
                        min_signal=float(sig.min()) if sig.numel() else None,
                        nan_rows=int(torch.isnan(m.base).flatten(1).any(-1).sum()))
        results.append(r)
    by_branch = {r.branch: r for r in results}
    r = by_branch.get("o")
    if r is not None and len(r.matches) > 1:
        parts = [by_branch.get("cmp_o")] + ([by_branch.get("swa_o")] if w > 0 else [])
        if all(p is not None and p.convention in p.candidates for p in parts):
            _resolve(r, "/".join(p.convention for p in parts), "branches")
        else:
            _resolve_by_gates(r, call, T, S, H, case, cmp_c, swa_c)
    return results


def _resolve(r: ProbeResult, name: str, how: str) -> None:
    """Settle an ambiguous ``o`` classification with the conventions of its isolated parts."""
    r.gated = f"{name} (from {how})"
    if name in r.matches:
        r.convention = name
        r.matches = [name] + [n for n in r.matches if n != name]


def _resolve_by_gates(r: ProbeResult, call, T: int, S: int, H: int, case: Case, cmp_c: dict, swa_c: dict) -> None:
    """Causal NSA's ``o`` depends on every s <= p (selection always reaches the current block), so its
    union mask cannot tell conventions apart: re-probe ``o`` with only ``g_cmp`` (then only ``g_swa``)
    non-zero and classify each part."""
    parts = []
    for gates, cands in (((1.0, 0.0, 0.0), cmp_c), ((0.0, 0.0, 1.0), swa_c)):
        if not cands:
            continue
        m, calls, _ = measure_dependencies(lambda pos, g=gates: call(pos, g), T, S, case.dtype, ("o",), base_slots=H)
        r.calls += calls
        hits = [n for n, mask in cands.items() if bool((m["o"].matrix == mask).all())]
        parts.append(hits[0] if len(hits) == 1 else "unknown")
    _resolve(r, "/".join(parts), "gates")

@dataclass
class ModuleProbe:
    """Receptive field of a token-sequence module: ``matrix[p, s]`` = output p depends on input token s."""

    matrix: torch.Tensor
    threshold: float
    noise: float
    calls: int
    leaks: int
    first_leak: Optional[tuple[int, int]]

    @property
    def causal(self) -> bool:
        return self.leaks == 0


@torch.no_grad()
def probe_module(fn: Callable[[torch.Tensor], torch.Tensor], seq_len: int, dim: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float64, batch: int = 32, seed: int = 0, amplitude: float = 1.0) -> ModuleProbe:
    """Probe any callable ``[B, T, dim] -> [B, T, dim']`` (e.g. an ``nn.Module`` with its projections) by
    perturbing whole input tokens; same batched design and threshold as ``probe_oracle``."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, seq_len, dim, generator=gen, dtype=torch.float64).to(dtype)
    dx = (amplitude * torch.randn(seq_len, dim, generator=gen, dtype=torch.float64)).to(dtype)
    name = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]

    B = max(1, min(batch, seq_len))

    def call(slots: list[Optional[int]]) -> dict[str, torch.Tensor]:
        x = x0.expand(B, -1, -1).clone()
        for i, s in enumerate(slots):
            if s is not None:
                x[i, s] += dx[s]
        y = fn(x.to(device))
        if not isinstance(y, torch.Tensor) or y.dim() < 2 or y.shape[:2] != (B, seq_len):
            raise ProbeError(f"module must map [B, T, dim] to [B, T, ...], got {getattr(y, 'shape', type(y))}")
        return {"y": y.detach().to("cpu")}

    measured, calls, _ = measure_dependencies(call, seq_len, B, name, ("y",))
    m = measured["y"]
    M, thr, noise = m.matrix, m.threshold, m.noise
    leak = M & torch.triu(torch.ones_like(M), diagonal=1)
    nz = leak.nonzero()
    return ModuleProbe(matrix=M, threshold=thr, noise=noise, calls=calls, leaks=int(leak.sum()),
                       first_leak=(int(nz[0, 0]), int(nz[0, 1])) if len(nz) else None)


# ------------------------------------------------------------------------------------------------------
# Engine hook
# ------------------------------------------------------------------------------------------------------

# small shapes first; top_n a power of 2 (FLA's top-k), block sizes powers of 2 >= 16 (Triton kernels)
LEAK_CHECK_CONFIGS = (
    ProbeConfig(seq_len=64, block_size=16, window=16, top_n=4),
    ProbeConfig(seq_len=128, block_size=32, window=32, top_n=4),
    ProbeConfig(seq_len=256, block_size=64, window=64, top_n=4),
)


def probe_with_fallback(oracle: Oracle, device: str, configs=LEAK_CHECK_CONFIGS, **kw) -> list[ProbeResult]:
    """``probe_oracle`` with the first config (of small shapes) whose case the oracle supports."""
    first = None
    for cfg in configs:
        try:
            return probe_oracle(oracle, device, cfg, **kw)
        except ProbeError as e:
            if "bad probe parameters" in str(e) or "run failed" in str(e) or "returned no" in str(e):
                raise
            first = first or str(e)
    raise ProbeError(first or "no supported probe case")


def _kind(e: ProbeError) -> str:
    """``error`` when the oracle ran and failed, ``skipped`` when no probe case was supported."""
    m = str(e)
    return "error" if (".run failed" in m or "returned" in m or "non-deterministic" in m) else "skipped"


PROBE_TIMEOUT_S = 300.0  # default limit of one oracle's probe in its worker


@dataclass(frozen=True)
class ProbeRequest:
    """One oracle's probe, as sent to its worker process:
    ``probe_with_fallback(oracle, device, configs, branches=..., cmp_mask=..., window_keys=...)``."""

    configs: tuple[ProbeConfig, ...] = LEAK_CHECK_CONFIGS
    branches: Optional[tuple[str, ...]] = None  # default: every branch of PROBE_BRANCHES the oracle returns
    cmp_mask: Optional[str] = None
    window_keys: Optional[str] = None

    def wanted(self, oracle: Oracle) -> list[str]:
        """The branches this request probes on ``oracle``."""
        return probed_branches(oracle, self.branches, max(c.window for c in self.configs))

    def to_json(self) -> str:
        return json.dumps({"configs": [asdict(c) for c in self.configs], "branches": self.branches,
                           "cmp_mask": self.cmp_mask, "window_keys": self.window_keys})

    @classmethod
    def from_json(cls, text: str) -> "ProbeRequest":
        d = json.loads(text)
        return cls(configs=tuple(ProbeConfig(**c) for c in d["configs"]),
                   branches=tuple(d["branches"]) if d["branches"] else None,
                   cmp_mask=d["cmp_mask"], window_keys=d["window_keys"])


def oracle_probe_records(oracle: Oracle, device: str, request: ProbeRequest) -> list[dict]:
    """The records of one oracle's probe: one per probed branch, or, when the probe cannot run
    (``ProbeError``), one per branch carrying the reason."""
    want = request.wanted(oracle)
    try:
        return [r.to_record() for r in probe_with_fallback(oracle, device, request.configs, branches=tuple(want),
                                                           cmp_mask=request.cmp_mask, window_keys=request.window_keys)]
    except ProbeError as e:
        return [skipped_record(oracle.name, b, str(e), _kind(e)) for b in want]


def serve_probe(oracle: Oracle, device: str, request_json: str) -> list[dict]:
    """``oracle_probe_records`` of a ``ProbeRequest`` as JSON: what an oracle's worker process runs."""
    return oracle_probe_records(oracle, device, ProbeRequest.from_json(request_json))


FAILURE_WORDS = {"crash": "probe crashed", "timeout": "probe timed out"}  # Reply status -> reason prefix


def failure_records(oracle: str, branches: list[str], reply: Reply) -> list[dict]:
    """``error`` records for a probe whose worker gave no records: ``probe crashed: worker process
    killed by SIGSEGV (exit -11)``, ``probe timed out: ...``, ``probe failed: ...``."""
    why = f"{FAILURE_WORDS.get(reply.status, 'probe failed')}: {reply.message}"
    return [skipped_record(oracle, b, why, "error") for b in branches]


def probe_in_workers(oracle_names: list[str], device: str, request: ProbeRequest = ProbeRequest(),
                     plugins: tuple[str, ...] = (), timeout: float = PROBE_TIMEOUT_S,
                     emit: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Each oracle's probe in its own worker process (``harness.worker``, all at once; CPU threads
    split between them), records in ``oracle_names`` order. A crash, a poisoned CUDA context, a failed
    set-up or a probe past ``timeout`` seconds gives that oracle's ``failure_records``; unknown,
    unavailable or branch-less oracles give ``skipped`` records without a worker. ``emit(record)`` is
    called as each oracle's records arrive. ``plugins``: resolved ``--plugin`` paths."""
    done: dict[str, list[dict]] = {}
    live: dict[str, list[str]] = {}

    def finish(name: str, recs: list[dict]) -> None:
        done[name] = recs
        for r in recs:
            if emit is not None:
                emit(r)

    for name in oracle_names:
        try:
            oracle = get_oracle(name)
        except OracleError as e:
            finish(name, [skipped_record(name, "*", str(e))])
            continue
        want = request.wanted(oracle)
        if not want:
            listed = ", ".join(request.branches or PROBE_BRANCHES)
            finish(name, [skipped_record(name, "*", f"{name} returns none of {listed}")])
            continue
        try:
            why = oracle.availability()
        except Exception as e:  # noqa: BLE001 - foreign code: recorded, the other oracles still run
            finish(name, [skipped_record(name, b, f"availability() raised {type(e).__name__}: {e}", "error") for b in want])
            continue
        if why:
            finish(name, [skipped_record(name, b, why) for b in want])
        else:
            live[name] = want
    threads = max(1, (os.cpu_count() or 2) // max(1, len(live))) if device == "cpu" else 0
    workers = {name: Worker(name, device, list(plugins), threads, restart=False) for name in live}
    sent = []
    try:
        for name, w in workers.items():
            bad = w.submit_call(serve_probe, request.to_json())
            if bad is None:
                sent.append(w)
            else:
                finish(name, failure_records(name, live[name], bad))
        for w, reply in collect_all(sent, timeout):
            ok = reply.status == "ok"
            finish(w.oracle, reply.value if ok else failure_records(w.oracle, live[w.oracle], reply))
    finally:
        for w in workers.values():
            w.stop()
    return [r for name in oracle_names for r in done.get(name, [])]


def leak_check_records(oracle_names: list[str], device: str, plugins: tuple[str, ...] = (),
                       timeout: float = PROBE_TIMEOUT_S) -> list[dict]:
    """``nsaconf run``'s convention probe: one record per (oracle, branch) for the report's Conventions
    section, each oracle probed in its worker process with the first of ``LEAK_CHECK_CONFIGS`` it
    supports. Oracles that cannot be probed, or whose probe crashed or timed out, give records
    carrying the reason (never silent, never an exception)."""
    return probe_in_workers(oracle_names, device, ProbeRequest(), plugins, timeout)


def probe_records(oracle_names: list[str], device: str, cfg: ProbeConfig = ProbeConfig(),
                  branches: Optional[tuple[str, ...]] = None, cmp_mask: Optional[str] = None,
                  window_keys: Optional[str] = None, emit: Optional[Callable[[dict], None]] = None,
                  plugins: tuple[str, ...] = (), timeout: float = PROBE_TIMEOUT_S) -> list[dict]:
    """``nsaconf masks``: one record per (oracle, branch) probed with ``cfg`` (default: every branch of
    ``PROBE_BRANCHES`` the oracle returns), each oracle in its worker process (``probe_in_workers``),
    with the device's description. Raises ``OracleError`` for an unknown name and ``ProbeError`` for
    ``bad probe parameters`` before probing anything; ``emit(record)`` is called as soon as an oracle
    is done, so that a run cut off by a time limit keeps what it had measured."""
    from nsaconf.harness.environment import where

    for name in oracle_names:
        get_oracle(name)
    probe_case(cfg, cmp_mask=cmp_mask, window_keys=window_keys)
    here = where(device)

    def located(rec: dict) -> None:
        rec.update(here)
        if emit is not None:
            emit(rec)

    request = ProbeRequest((cfg,), branches, cmp_mask, window_keys)
    return probe_in_workers(oracle_names, device, request, plugins, timeout, located)
