"""The comparator: one oracle's canonical outputs against the float64 truth of the same inputs.

Numeric branches (``*_o``, ``cmp_lse``, gradients) use the rule of ``harness.tolerance``:
``err <= k * err(baseline) + floor`` (or the tight rule of reference-layer fp64/fp32 oracles), plus
three always-on checks:

* NaN/Inf where the truth is finite -> FAIL;
* rows with no visible compressed block (truth ``cmp_lse = -inf``) are judged by their semantics,
  not as numbers: ``cmp_o`` must be exactly 0 and ``cmp_lse`` must be -inf there (counted in
  ``empty_rows`` / ``empty_rows_bad``);
* a zero or constant output never passes: ``err < m*max|truth|`` and ``rel_rms < m`` (m = 0.5) —
  KernelBench issue #165 showed all-zero outputs passing a loose atol.

``topk_idx`` is compared as sets per (b, position, kv head), ignoring -1 and order. A differing block
is a tie when its truth importance is within ``tie_tol`` of the n-th selected block's importance
(``tie_tol`` = the same rule applied to the importance: ``k*err(baseline importance) + floor``);
non-candidate blocks (``j*l' > p``) and missing forced blocks are never ties. When the oracle's
selection differs only by ties, its ``slc_o``/``o`` are judged against the truth and baseline
recomputed with the oracle's own indices, so a legitimate tie-break does not fail ``slc_o``.

Gradients (``dq dk dv dg_cmp dg_slc dg_swa``, loss ``sum(o * dO)``, see ``cases.tensors``): the truth
is ``nsa_reference_grads`` in float64 and the baseline the same in the case dtype, both on the truth's
selection (``CaseTruth.grads``, computed lazily, once per case, only when an oracle declares them);
judged by the same rule with ``k_grad``. A tie-only top-n difference recomputes them with the
oracle's indices, like ``slc_o``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from nsaconf.cases.conventions import is_forced, selection_candidate
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import TORCH_DTYPES, Inputs, canonical_order, materialize, query_positions
from nsaconf.harness.error_map import ErrorMapBuilder
from nsaconf.harness.tolerance import TORCH_DEFAULT_TOLS, Rule, ToleranceTable, rule_dict
from nsaconf.oracles.base import GRAD_BRANCHES
from nsaconf.oracles.reference import grad_truth_skip_reason, nsa_reference, nsa_reference_grads  # noqa: F401 (re-exported)

SELECTION_DEPENDENT = ("slc_o", "o") + GRAD_BRANCHES


@dataclass
class Verdict:
    """The judgement of one cell (one branch of one oracle on one case)."""

    branch: str
    status: str  # PASS | FAIL | ERROR
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    tolerance: dict[str, Any] = field(default_factory=dict)
    error_map: Optional[dict[str, Any]] = None  # numeric FAILs: where the error lives (harness.error_map)


@dataclass
class CaseTruth:
    """Truth (float64) and baseline (case dtype) of one case, computed once and shared by all oracles.

    The baseline runs the selection with the truth's block indices (``block_indices="topk"``
    cases), so that its error measures rounding only, never a flipped top-n choice.
    """

    case: Case
    truth: dict[str, torch.Tensor]
    baseline: dict[str, torch.Tensor]
    given_indices: Optional[torch.Tensor]
    device: str = "cpu"
    _inputs: Optional[Inputs] = None
    _alt: dict[bytes, tuple[dict, dict]] = field(default_factory=dict)
    _grads: Optional[tuple[dict, dict]] = None
    _alt_grads: dict[bytes, tuple[dict, dict]] = field(default_factory=dict)

    @classmethod
    def compute(cls, case: Case, inputs: Optional[Inputs] = None, device: str = "cpu") -> "CaseTruth":
        """Truth and baseline computed on ``device`` (float64 on a GPU is fine and much faster for
        paper-size cases); every tensor kept here is on the CPU."""
        x = inputs if inputs is not None else materialize(case, device)
        truth = _cpu(nsa_reference(case, x, dtype=torch.float64, return_importance=True))
        given = truth["topk_idx"] if case.block_indices == "topk" else x.block_indices
        given = None if given is None else given.cpu()
        if _baseline_is_truth(case):
            baseline = truth
        else:
            dev_given = None if given is None else given.to(x.q.device)
            baseline = _cpu(nsa_reference(case, x, dtype=None, block_indices=dev_given, return_importance=True))
        return cls(case=case, truth=truth, baseline=baseline, given_indices=given, device=str(x.q.device), _inputs=inputs)

    @property
    def inputs(self) -> Inputs:
        """The case's inputs on the truth's device: those given to ``compute``, else materialized again
        (``materialize`` is deterministic) so that they are not held between uses."""
        if self._inputs is not None:
            return self._inputs
        return materialize(self.case, self.device)

    def _pair(self, fn, idx: Optional[torch.Tensor]) -> tuple[dict, dict]:
        """(float64 truth, case-dtype baseline) of ``fn`` (``nsa_reference`` or ``nsa_reference_grads``)
        with the selection ``idx`` (None: the case's own rule), computed on the inputs' device, kept on
        the CPU; one computation when the case dtype is float64."""
        x = self.inputs
        d = None if idx is None else idx.to(x.q.device)
        truth = _cpu(fn(self.case, x, dtype=torch.float64, block_indices=d))
        return truth, truth if _baseline_is_truth(self.case) else _cpu(fn(self.case, x, dtype=None, block_indices=d))

    def with_indices(self, idx: torch.Tensor) -> tuple[dict, dict]:
        """Truth and baseline recomputed with the selection ``idx`` (canonical order)."""
        key = idx.cpu().numpy().tobytes()
        if key not in self._alt:
            self._alt[key] = self._pair(nsa_reference, idx)
        return self._alt[key]

    def grads(self) -> tuple[dict, dict]:
        """Gradient truth (float64) and baseline (case dtype), both on the truth's selection; computed
        on the first call."""
        if self._grads is None:
            self._grads = self._pair(nsa_reference_grads, self.given_indices)
        return self._grads

    def grads_with_indices(self, idx: torch.Tensor) -> tuple[dict, dict]:
        """Gradient truth and baseline recomputed with the selection ``idx`` (canonical order)."""
        key = idx.cpu().numpy().tobytes()
        if key not in self._alt_grads:
            self._alt_grads[key] = self._pair(nsa_reference_grads, idx)
        return self._alt_grads[key]


def _baseline_is_truth(case: Case) -> bool:
    """A float64 case's baseline is its truth: the same computation, done once."""
    return TORCH_DTYPES[case.dtype] == torch.float64


def _cpu(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in d.items()}


# ------------------------------------------------------------------------------------------ helpers
KEY_LAYOUT = ("dk", "dv")  # [B,T,H,*]: rows are key positions, not queries


def _worst_index(case: Case, flat: int, shape: tuple[int, ...], keys: bool = False) -> list[int]:
    """``[b, position, head]`` of a flat index into a ``[B,TQ,heads,...]`` tensor (position = the
    query's position inside its sequence), or of a ``[B,T,H,...]`` key tensor with ``keys``."""
    idx = []
    for s in reversed(shape):
        idx.append(flat % s)
        flat //= s
    idx = idx[::-1]
    if keys:
        starts = [s0 for s0, s1 in case.sequences if s0 <= idx[1] < s1] if case.cu_seqlens is not None else [0]
        return [int(idx[0]), int(idx[1]) - (starts[0] if starts else 0), int(idx[2])]
    pos = int(query_positions(case)[idx[1]])
    return [int(idx[0]), pos, int(idx[2])]


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The index tuple of a flat index into a tensor of ``shape`` (as torch.testing prints it)."""
    idx = []
    for s in reversed(shape):
        idx.append(flat % s)
        flat //= s
    return tuple(int(i) for i in idx[::-1])


def _count_over(flat_o: torch.Tensor, flat_t: torch.Tensor, bound: float) -> int:
    """Elements where the truth is finite and the output is non-finite or off by more than ``bound``
    (``COMPARE_CHUNK`` elements at a time)."""
    n = 0
    for s0 in range(0, flat_t.numel(), COMPARE_CHUNK):
        o, t = flat_o[s0:s0 + COMPARE_CHUNK].double(), flat_t[s0:s0 + COMPARE_CHUNK].double()
        fin = torch.isfinite(t)
        n += int((fin & ~((o - t).abs() <= bound)).sum())
    return n


def _nonzero_max(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


#: elements per step of ``compare_numeric``: its temporaries stay this small whatever the tensors' size
COMPARE_CHUNK = 1 << 22


def compare_numeric(case: Case, branch: str, out: torch.Tensor, truth: torch.Tensor,
                    baseline: torch.Tensor, rule: Rule, dtype: str) -> Verdict:
    """Judge a numeric branch (see module docstring). ``truth`` float64, ``baseline`` in ``dtype``.
    Computed over ``COMPARE_CHUNK`` elements at a time: maxima, counts and sums of squares carry over,
    and ``rule.floor``, a maximum over elements, is the maximum of the chunks' floors."""
    tol = rule_dict(rule)
    if not isinstance(out, torch.Tensor):
        return Verdict(branch, "FAIL", f"{branch}: expected a tensor, got {type(out).__name__}", {}, tol)
    if tuple(out.shape) != tuple(truth.shape):
        return Verdict(branch, "FAIL", f"{branch}: shape {list(out.shape)} != canonical {list(truth.shape)}", {}, tol)
    if not (out.is_floating_point()):
        return Verdict(branch, "FAIL", f"{branch}: dtype {out.dtype} is not floating point", {}, tol)
    metrics: dict[str, Any] = {"out_dtype": str(out.dtype).replace("torch.", "")}
    problems: list[str] = []
    flat_o, flat_t = out.detach().cpu().reshape(-1), truth.reshape(-1)
    flat_b = baseline.detach().cpu().reshape(-1)
    rtol, atol = TORCH_DEFAULT_TOLS[dtype]
    torch_dtype = TORCH_DTYPES[dtype]
    err = base_err = scale = sum_t2 = sum_d2 = 0.0
    floor = rule.floor(flat_t[:0].double(), torch_dtype)
    n_empty = n_empty_bad = n_nonfinite = n_finite = n_both = n_mism = 0
    worst, worst_at = -1.0, -1
    emap = ErrorMapBuilder(case, tuple(truth.shape), keys=branch in KEY_LAYOUT)
    for s0 in range(0, flat_t.numel(), COMPARE_CHUNK):
        rows = slice(s0, s0 + COMPARE_CHUNK)
        o, t, bl = flat_o[rows].double(), flat_t[rows].double(), flat_b[rows].double()
        tfin = torch.isfinite(t)
        if branch == "cmp_lse":  # rows with no visible key: truth -inf (cmp_o: check_empty_cmp_o)
            empty = torch.isneginf(t)
            n_empty += int(empty.sum())
            n_empty_bad += int((empty & ~torch.isneginf(o)).sum())
        nonfinite = tfin & ~torch.isfinite(o)
        n_nonfinite += int(nonfinite.sum())
        m = tfin & torch.isfinite(o)
        diff = torch.where(m, (o - t).abs(), 0.0)
        err = max(err, float(diff.max()))
        base_err = max(base_err, float(torch.where(tfin & torch.isfinite(bl), (bl - t).abs(), 0.0).max()))
        tf = t[tfin]
        if tf.numel():
            scale = max(scale, float(tf.abs().max()))
            floor = max(floor, rule.floor(tf, torch_dtype))
            sum_t2 += float(tf.pow(2).sum())
            n_finite += tf.numel()
        del tf
        d_f = (o - t)[m]
        sum_d2 += float(d_f.pow(2).sum())
        n_both += d_f.numel()
        del d_f
        n_mism += int(((diff > atol + rtol * t.abs().nan_to_num(posinf=0.0, neginf=0.0)) | nonfinite).sum())
        src = torch.where(nonfinite, math.inf, diff)
        emap.add(s0, src)
        at = int(src.argmax())
        if float(src[at]) > worst:  # the first largest, as one argmax over the whole tensor
            worst, worst_at = float(src[at]), s0 + at
    if branch == "cmp_lse":
        metrics["empty_rows"], metrics["empty_rows_bad"] = n_empty, n_empty_bad
        if n_empty_bad:
            problems.append(f"{n_empty_bad} of {n_empty} empty rows (no visible block) have cmp_lse != -inf")
    metrics["nonfinite"] = n_nonfinite
    if n_nonfinite:
        problems.append(f"{n_nonfinite} NaN/Inf values where the truth is finite")
    bound = rule.bound(base_err, floor, scale)
    tol = rule_dict(rule, floor)
    rms_t = math.sqrt(sum_t2 / n_finite) if n_finite else 0.0
    rel_rms = math.sqrt(sum_d2 / n_both) / (rms_t + 1e-8) if n_both else 0.0
    metrics.update({
        "max_abs_err": err, "baseline_err": base_err, "floor": floor, "bound": bound,
        "err_ratio": (err / bound) if bound > 0 else (0.0 if err == 0 else math.inf),
        "rel_rms": rel_rms, "mismatch_frac": n_mism / flat_t.numel() if flat_t.numel() else 0.0,
        "max_abs_truth": scale,
    })
    if worst_at >= 0:
        metrics["worst_index"] = _worst_index(case, worst_at, tuple(truth.shape), keys=branch in KEY_LAYOUT)
    if err > bound:
        over = _count_over(flat_o, flat_t, bound)
        metrics["over_bound"] = over
        problems.append(f"Mismatched elements: {over} / {flat_t.numel()} ({over / flat_t.numel():.1%}); greatest absolute "
                        f"difference {err:.3g} at {_unravel(worst_at, tuple(truth.shape))} (bound {bound:.3g}: "
                        f"{rule.describe()}; baseline_err {base_err:.3g}, floor {floor:.3g})")
    # zero / constant outputs never pass (KernelBench#165); its text only when it is what fails the cell
    if scale > 0 and not (err < rule.nontrivial * scale and rel_rms < rule.nontrivial):
        metrics["constant_guard"] = True
        if not problems:
            problems.append(f"zero/constant-output guard (KernelBench#165): need err < {rule.nontrivial:g}*max|truth| and rel_rms < {rule.nontrivial:g} (err {err:.3g} vs max|truth| {scale:.3g}, rel_rms {rel_rms:.3g})")
    status = "FAIL" if problems else "PASS"
    return Verdict(branch, status, "; ".join(problems), metrics, tol, emap.to_dict(bound) if problems else None)


def check_empty_cmp_o(out: torch.Tensor, truth_lse: torch.Tensor, verdict: Verdict) -> Verdict:
    """``cmp_o`` must be exactly 0 in rows where the truth sees no compressed block."""
    empty = torch.isneginf(truth_lse)  # [B,TQ,HQ]
    verdict.metrics["empty_rows"] = int(empty.sum())
    if not isinstance(out, torch.Tensor) or tuple(out.shape[:3]) != tuple(empty.shape):
        return verdict
    o = out.detach().cpu()
    bad = empty & ((o != 0) | ~torch.isfinite(o)).any(dim=-1)
    verdict.metrics["empty_rows_bad"] = int(bad.sum())
    if bad.any():
        msg = f"{int(bad.sum())} of {int(empty.sum())} empty rows (no visible block) have cmp_o != 0"
        verdict.reason = "; ".join(x for x in (verdict.reason, msg) if x)
        verdict.status = "FAIL"
    return verdict


def topk_tie_tolerance(truth_imp: torch.Tensor, base_imp: torch.Tensor, rule: Rule, dtype: str) -> float:
    """Importance tolerance for ties: the numeric rule applied to the importance tensor."""
    scale = _nonzero_max(truth_imp)
    if rule.rule == "tight":
        return rule.tight * max(1.0, scale)
    base_err = float((base_imp.double() - truth_imp.double()).abs().max()) if truth_imp.numel() else 0.0
    return rule.k * base_err + rule.floor(truth_imp.double(), TORCH_DTYPES[dtype])


def compare_topk(case: Case, out: torch.Tensor, truth_idx: torch.Tensor, importance: torch.Tensor,
                 tie_tol: float, rule: Rule) -> Verdict:
    """Set comparison of ``topk_idx`` with ties (see module docstring). ``importance`` ``[B,TQ,H,NS]``
    float64 (summed over the group)."""
    tol = rule_dict(rule)
    tol["tie_tol"] = tie_tol
    if not isinstance(out, torch.Tensor) or out.is_floating_point():
        return Verdict("topk_idx", "FAIL", "topk_idx: expected an integer tensor", {}, tol)
    if tuple(out.shape[:3]) != tuple(truth_idx.shape[:3]) or out.dim() != 4:
        return Verdict("topk_idx", "FAIL", f"topk_idx: shape {list(out.shape)} != canonical {list(truth_idx.shape)}", {}, tol)
    o = out.detach().cpu().long()
    B, TQ, H, _ = truth_idx.shape
    NS = importance.shape[-1]
    ls = case.block_size
    pos = query_positions(case)
    j = torch.arange(NS)
    # membership masks [B,TQ,H,NS+1] (slot NS collects -1 / out-of-range ids)
    def member(idx: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(B, TQ, H, NS + 1, dtype=torch.bool)
        ids = torch.where((idx >= 0) & (idx < NS), idx, torch.full_like(idx, NS))
        m.scatter_(-1, ids, True)
        return m
    out_of_range = ((o >= NS) | (o < -1)).any(dim=-1)
    mo, mt = member(o)[..., :NS], member(truth_idx)[..., :NS]
    # duplicated ids in the oracle's selection
    valid = (o >= 0) & (o < NS)
    dup = (valid.sum(-1) != mo.sum(-1))
    diff = mo ^ mt
    rows_diff = diff.any(-1) | out_of_range | dup
    metrics: dict[str, Any] = {"topk_rows": B * TQ * H, "topk_rows_differ": int(rows_diff.sum())}
    if not rows_diff.any():
        metrics.update({"topk_disagree": 0, "topk_ties": 0})
        return Verdict("topk_idx", "PASS", "", metrics, tol)
    imp = importance.double()
    cand = selection_candidate(j[None, :], pos[:, None], ls)[None, :, None, :]       # [1,TQ,1,NS]
    forced = is_forced(case.forced_blocks, j[None, :], pos[:, None], ls)[None, :, None, :]
    # threshold: importance of the n-th selected (lowest non-forced selected) block; 0 if fewer than n
    sel_nf = mt & ~forced
    thr = torch.where(sel_nf, imp, torch.full_like(imp, math.inf)).min(-1).values
    full = mt.sum(-1) >= case.top_n
    thr = torch.where(full & torch.isfinite(thr), thr, torch.zeros_like(thr))
    near = (imp - thr[..., None]).abs() <= tie_tol
    bad_block = diff & (~cand | (forced & mt & ~mo) | ~near)
    bad_row = bad_block.any(-1) | out_of_range | dup
    ties = rows_diff & ~bad_row
    metrics.update({"topk_disagree": int(bad_row.sum()), "topk_ties": int(ties.sum()),
                    "topk_noncausal": int((diff & mo & ~cand).any(-1).sum())})
    if bad_row.any():
        first = bad_row.nonzero()[0].tolist()
        metrics["worst_index"] = [first[0], int(pos[first[1]]), first[2]]
        b, i, h = first
        metrics["first_disagreement"] = {"truth": sorted(mt[b, i, h].nonzero().flatten().tolist()),
                                         "oracle": sorted(mo[b, i, h].nonzero().flatten().tolist())}
        return Verdict("topk_idx", "FAIL",
                       f"top-n selection differs beyond ties for {int(bad_row.sum())} of {B * TQ * H} (query, kv head) rows",
                       metrics, tol)
    return Verdict("topk_idx", "PASS", f"{int(ties.sum())} rows differ only by ties", metrics, tol)


def judge(ct: CaseTruth, oracle: str, layer: str, branches: tuple[str, ...], outputs: dict[str, Any],
          table: ToleranceTable, needs_block_indices: bool = False) -> list[Verdict]:
    """Verdicts for every declared branch that the case has (the caller SKIPs the others)."""
    case, dtype = ct.case, ct.case.dtype
    verdicts: list[Verdict] = []
    truth, base = ct.truth, ct.baseline
    sel_truth, sel_base, recomputed = truth, base, False
    alt_idx: Optional[torch.Tensor] = None
    order = sorted(branches, key=lambda b: b != "topk_idx")
    for br in order:
        rule = table.rule_for(oracle, layer, br, dtype)
        if br in GRAD_BRANCHES:
            if br not in outputs:
                verdicts.append(Verdict(br, "ERROR", f"oracle {oracle!r} declared branch {br!r} but did not return it", {}, rule_dict(rule)))
                continue
            try:
                gt, gb = ct.grads() if alt_idx is None else ct.grads_with_indices(alt_idx)
            except Exception as e:  # noqa: BLE001 - reported per gradient cell
                verdicts.append(Verdict(br, "ERROR", f"gradient truth failed: {type(e).__name__}: {e}", {}, rule_dict(rule)))
                continue
            if br not in gt:
                verdicts.append(Verdict(br, "ERROR", f"no gradient truth for {br!r} on this case", {}, rule_dict(rule)))
                continue
            v = compare_numeric(case, br, outputs[br], gt[br], gb[br], rule, dtype)
            if alt_idx is not None:
                v.metrics["truth_with_oracle_indices"] = True
            verdicts.append(v)
            continue
        if br not in truth:
            verdicts.append(Verdict(br, "ERROR", f"no truth for branch {br!r}", {}, rule_dict(rule)))
            continue
        if br not in outputs:
            verdicts.append(Verdict(br, "ERROR", f"oracle {oracle!r} declared branch {br!r} but did not return it", {}, rule_dict(rule)))
            continue
        if br == "topk_idx":
            tie_tol = topk_tie_tolerance(truth["importance"], base["importance"], rule, dtype)
            v = compare_topk(case, outputs[br], truth["topk_idx"], truth["importance"], tie_tol, rule)
            # the oracle's own selection drives its slc_o only for block_indices="topk" cases
            if (v.status == "PASS" and v.metrics.get("topk_ties", 0) > 0 and not needs_block_indices
                    and case.block_indices == "topk"):
                idx = canonical_order(outputs[br].detach().cpu().long())
                if idx.shape[-1] < case.top_n:
                    idx = torch.cat([idx, idx.new_full(idx.shape[:-1] + (case.top_n - idx.shape[-1],), -1)], -1)
                sel_truth, sel_base = ct.with_indices(idx)
                recomputed, alt_idx = True, idx
            verdicts.append(v)
            continue
        t, b = (sel_truth[br], sel_base[br]) if br in SELECTION_DEPENDENT else (truth[br], base[br])
        v = compare_numeric(case, br, outputs[br], t, b, rule, dtype)
        if br == "cmp_o":
            v = check_empty_cmp_o(outputs[br], truth["cmp_lse"], v)
        if br in SELECTION_DEPENDENT and recomputed:
            v.metrics["truth_with_oracle_indices"] = True
        verdicts.append(v)
    return verdicts
