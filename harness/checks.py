"""Checks that need no truth: properties every correct NSA has, judged by running the oracle twice or more.

Each check compares the oracle with itself on related inputs, never with the reference, so it also holds
where the reference cannot be computed (a huge case) and catches bugs that a tolerance could hide:

* ``inputs_unchanged``: q, k, v, the gates and the given block indices are bitwise the same after ``run``
  (an oracle that writes into its inputs is flagged: KernelBench's input-mutation attack);
* ``determinism``: two runs on the same inputs agree (bitwise, or within the bound below);
* ``decode_consistency``: the last ``TQ'`` queries of a full run (``q_len = T``) equal a run with
  ``q_len = TQ'`` on the same keys (``TQ' = 1`` for a full case; a decode case is compared with its full run);
* ``batch_independence``: a batch of B equals B runs of batch 1 (a batch-1 case is run beside a second,
  differently seeded sequence, and each compared with its run alone); a varlen case equals its sequences run one by one;
* ``gqa_equivariance``: permuting the query heads inside each GQA group (and their gates) permutes the
  outputs the same way;
* ``causality``: perturbing the keys and values after position ``p`` leaves every query at ``<= p``
  unchanged (skipped for a case whose ``cmp_mask`` is not causal: it asks for the leak).

Outputs compared: the forward float branches the oracle returns (``*_o``, ``cmp_lse``; one that the oracle
declines in one of the two forms, by its ``branch_supports`` reason, in neither), each as
``difference`` measures them (equal infinities agree, NaN against a number is infinite). Bound of a comparison:
``CHECK_ULPS * eps(dtype) * max(1, max|a|)`` (two computations of one function may round differently: a
decode kernel is not the prefill kernel), except ``inputs_unchanged``, which is bitwise. A check that
cannot apply to a case (one query, G = 1, a case the oracle does not support in the derived form) is a
SKIP with the reason; an exception of the oracle is an ERROR. Where the oracle returns ``topk_idx``,
query rows whose selected blocks differ between the two runs (near-ties rounded apart) are left out of
the selection-dependent branches and counted in the metrics.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs, materialize
from nsaconf.cases.vocabulary import CAUSAL_CMP_MASKS, CHECKS
from nsaconf.oracles.base import Oracle

#: a comparison's bound in units of the case dtype's machine epsilon, times ``max(1, max|a|)``
CHECK_ULPS = 16.0
#: the amplitude of the causality check's perturbation of future keys and values
PERTURB = 1.0
#: branches that depend on the selected blocks (rows whose ``topk_idx`` differs are left out of them)
_SELECTION_DEPENDENT = ("slc_o", "o")
#: the outputs a check compares (``topk_idx`` only to find the rows whose selection differs)
_COMPARED = ("cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o")


class CheckError(ValueError):
    """An unknown check name (one line)."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one case: ``status`` PASS | FAIL | SKIP | ERROR, a one-line ``reason``
    and ``metrics`` (``max_abs_err``, ``bound``, ``err_ratio``, ``worst_index`` [b, position, head],
    ``branch`` where the worst difference is, ...)."""

    check: str
    status: str
    reason: str = ""
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"check": self.check, "status": self.status, "reason": self.reason, "metrics": self.metrics}


def parse_checks(text: Optional[str]) -> tuple[str, ...]:
    """``"a,b"`` or ``"all"`` -> check names in ``CHECKS`` order; ``CheckError`` for an unknown name."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if names == ["all"]:
        return CHECKS
    bad = [n for n in names if n not in CHECKS]
    if bad:
        raise CheckError(f"unknown check {bad[0]!r}; checks: all, {', '.join(CHECKS)}")
    return tuple(n for n in CHECKS if n in names)


# ------------------------------------------------------------------------------------------ running the oracle
class _Skip(Exception):
    """The check does not apply to this case (the message is the SKIP reason)."""


def _clone(x: Inputs) -> Inputs:
    return Inputs(**{k: (None if v is None else v.clone()) for k, v in vars(x).items()})


def _given(oracle: Oracle, case: Case, x: Inputs) -> Optional[torch.Tensor]:
    """The block indices a selection-only kernel is given: the case's random ones, else the float64
    reference's top-n on these inputs (as the runner gives the truth's)."""
    if not oracle.needs_block_indices:
        return None
    if case.block_indices == "random":
        return x.block_indices
    from nsaconf.oracles.reference import nsa_reference

    return nsa_reference(case, x.to("cpu"), dtype=torch.float64)["topk_idx"].to(x.q.device)


class _Caller:
    """Runs the oracle on (case, inputs) and keeps its float forward outputs on the CPU."""

    def __init__(self, oracle: Oracle, device: str) -> None:
        self.oracle, self.device = oracle, device

    def supported(self, case: Case, what: str) -> None:
        why = self.oracle.check_support(case, self.device)
        if why:
            raise _Skip(f"{self.oracle.name} does not support the {what}: {why}")

    def __call__(self, case: Case, x: Inputs) -> dict[str, torch.Tensor]:
        x = _clone(x.to(self.device))  # each run its own copy: a run that writes into it cannot change the next one
        idx = _given(self.oracle, case, x)
        out = self.oracle.run(case, x, self.device, block_indices=None if idx is None else idx.clone())
        res = {}
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and k in _COMPARED:
                res[k] = v.detach().to("cpu")
        return res


def _eps(dtype: str) -> float:
    from nsaconf.cases.tensors import TORCH_DTYPES

    return float(torch.finfo(TORCH_DTYPES[dtype]).eps)


def _rows_differ(a: dict, b: dict) -> Optional[torch.Tensor]:
    """``[B, TQ, H]`` bool: rows whose selected block sets differ (None when no topk_idx to compare)."""
    if "topk_idx" not in a or "topk_idx" not in b or a["topk_idx"].shape != b["topk_idx"].shape:
        return None
    sa, sb = a["topk_idx"].sort(-1).values, b["topk_idx"].sort(-1).values
    return (sa != sb).any(-1)


def difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b|`` in float64, 0 where both are equal (the same infinity) or both NaN, inf where one is NaN."""
    a, b = a.double(), b.double()
    d = (a - b).abs()
    d = torch.where((a == b) | (torch.isnan(a) & torch.isnan(b)), torch.zeros_like(d), d)
    return torch.nan_to_num(d, nan=float("inf"))


def compare(check: str, a: dict, b: dict, dtype: str, group: int, what: str) -> CheckResult:
    """PASS when every float branch of ``a`` equals ``b``'s within ``CHECK_ULPS`` (shapes must agree; a branch
    missing from ``b`` is a FAIL); ``what`` names the two runs in the reason."""
    worst: tuple[float, float, str, list] = (-1.0, 1.0, "", [])
    ties = _rows_differ(a, b)
    left_out = 0
    for name, ta in a.items():
        if name == "topk_idx":
            continue
        tb = b.get(name)
        if tb is None:
            return CheckResult(check, "FAIL", f"{what}: the second run returned no {name}")
        if tb.shape != ta.shape:
            return CheckResult(check, "FAIL", f"{what}: {name} has shape {tuple(tb.shape)} vs {tuple(ta.shape)}")
        if ta.dim() < 3 or ta.shape[0] * ta.shape[1] * ta.shape[2] == 0:
            continue
        B, TQ, HQ = ta.shape[:3]
        d = difference(ta, tb).reshape(B, TQ, HQ, -1).amax(-1)
        if ties is not None and name in _SELECTION_DEPENDENT and ties.any():
            tie_q = ties.repeat_interleave(group, dim=-1)
            left_out = int(tie_q.sum())
            d = torch.where(tie_q, torch.zeros_like(d), d)
        fin = ta[torch.isfinite(ta)].double()
        bound = CHECK_ULPS * _eps(dtype) * max(1.0, float(fin.abs().max()) if fin.numel() else 1.0)
        m = float(d.max()) if d.numel() else 0.0
        if m / bound > worst[0] / worst[1]:
            worst = (m, bound, name, [int(i) for i in torch.nonzero(d == d.max())[0].tolist()] if d.numel() else [])
    err, bound, branch, where = worst
    if branch == "":
        return CheckResult(check, "SKIP", "the oracle returned no float forward branch to compare")
    metrics = {"max_abs_err": err, "bound": bound, "err_ratio": err / bound, "branch": branch, "worst_index": where,
               "bitwise": err == 0.0}
    if left_out:
        metrics["rows_left_out_topk_differ"] = left_out
    if err <= bound:
        return CheckResult(check, "PASS", f"{what}: agree (worst {branch} {err:.3g} <= {bound:.3g})", metrics)
    return CheckResult(check, "FAIL", f"{what}: {branch} differs by {err:.3g} > bound {bound:.3g} at [b, q, head] {where}",
                       metrics)


# ------------------------------------------------------------------------------------------ the checks
def _inputs_unchanged(run: _Caller, case: Case, x: Inputs) -> CheckResult:
    x = x.to(run.device)
    before = _clone(x)
    idx = _given(run.oracle, case, x)
    idx_before = None if idx is None else idx.clone()
    run.oracle.run(case, x, run.device, block_indices=idx)
    changed = [k for k, v in vars(x).items() if v is not None and not torch.equal(v, getattr(before, k))]
    if idx is not None and not torch.equal(idx, idx_before):
        changed.append("block_indices (given)")
    if changed:
        return CheckResult("inputs_unchanged", "FAIL", f"run() wrote into its inputs: {', '.join(changed)}",
                           {"changed": changed})
    return CheckResult("inputs_unchanged", "PASS", "inputs bitwise unchanged")


def _determinism(run: _Caller, case: Case, x: Inputs) -> CheckResult:
    a, b = run(case, x), run(case, x)
    return compare("determinism", a, b, case.dtype, case.group, "two runs on the same inputs")


def _slice_q(x: Inputs, rows: slice) -> Inputs:
    """The query-side tensors (q, gates, block indices) of the query rows ``rows``; keys and values kept."""
    f = lambda t: None if t is None else t[:, rows].contiguous()  # noqa: E731
    return Inputs(q=f(x.q), k=x.k, v=x.v, g_cmp=f(x.g_cmp), g_slc=f(x.g_slc), g_swa=f(x.g_swa),
                  block_indices=f(x.block_indices))


def _decode_consistency(run: _Caller, case: Case, x: Inputs) -> CheckResult:
    if case.cu_seqlens is not None:
        raise _Skip("a varlen case has no decode form (varlen decode is not modelled)")
    if case.seq_len < 2:
        raise _Skip("T = 1: the full run is the decode run")
    if case.q_len < case.seq_len:  # a decode case: compare with its full run
        full, dec = case.replace(q_len=case.seq_len), case
        run.supported(full, f"full run of this decode case (q_len = {case.seq_len})")
        xf = materialize(full, "cpu")
        xf.k, xf.v = x.k.cpu(), x.v.cpu()
        xf.q[:, -case.q_len:], xf.g_cmp[:, -case.q_len:] = x.q.cpu(), x.g_cmp.cpu()
        xf.g_slc[:, -case.q_len:], xf.g_swa[:, -case.q_len:] = x.g_slc.cpu(), x.g_swa.cpu()
        if xf.block_indices is not None and x.block_indices is not None:
            xf.block_indices[:, -case.q_len:] = x.block_indices.cpu()
        xd = x
    else:
        full, dec = case, case.replace(q_len=1)
        run.supported(dec, "decode form of this case (q_len = 1)")
        xf, xd = x, _slice_q(x, slice(case.seq_len - 1, None))
    a, b = run(full, xf), run(dec, xd)
    tq = dec.q_len
    # a branch the oracle declares it does not compute in one of the two forms (its branch_supports reason,
    # e.g. a decode kernel that returns no LSE) is compared in neither
    declined = {k for k in a if run.oracle.branch_supports(dec, k) or run.oracle.branch_supports(full, k)}
    a_last = {k: v[:, -tq:] for k, v in a.items() if k not in declined}
    return compare("decode_consistency", a_last, b, case.dtype, case.group,
                   f"the last {tq} queries of the full run (q_len = {case.seq_len}) vs a run with q_len = {tq}")


def _batch_independence(run: _Caller, case: Case, x: Inputs) -> CheckResult:
    if case.cu_seqlens is not None:  # varlen vs the sequences one by one
        parts = []
        for s, e in case.sequences:
            one = case.replace(seq_len=e - s, q_len=e - s, cu_seqlens=None)
            run.supported(one, f"sequence [{s}, {e}) of this varlen case alone")
            xs = Inputs(q=x.q[:, s:e], k=x.k[:, s:e], v=x.v[:, s:e], g_cmp=x.g_cmp[:, s:e], g_slc=x.g_slc[:, s:e],
                        g_swa=x.g_swa[:, s:e], block_indices=None if x.block_indices is None else x.block_indices[:, s:e])
            parts.append(run(one, xs))
        whole = run(case, x)
        joined = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0] if all(k in p for p in parts)}
        return compare("batch_independence", whole, joined, case.dtype, case.group,
                       f"the varlen run vs its {len(parts)} sequences run one by one")
    if case.batch == 1:  # beside a second, differently seeded sequence
        two = case.replace(batch=2)
        run.supported(two, "batch-2 form of this case")
        other = materialize(case.replace(seed=(case.seed + 1) % (2**62)), "cpu").to(x.q.device)
        xb = Inputs(**{k: (None if v is None else torch.cat([v, getattr(other, k)], dim=0)) for k, v in vars(x).items()})
        a, b0, b1 = run(two, xb), run(case, x), run(case, other)
        joined = {k: torch.cat([b0[k], b1[k]], dim=0) for k in b0 if k in b1}
        return compare("batch_independence", a, joined, case.dtype, case.group,
                       "a batch-2 run (this case beside a second sequence) vs each sequence run alone")
    one = case.replace(batch=1)
    run.supported(one, "batch-1 form of this case")
    whole = run(case, x)
    parts = [run(one, Inputs(**{k: (None if v is None else v[i:i + 1]) for k, v in vars(x).items()}))
             for i in range(case.batch)]
    joined = {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0] if all(k in p for p in parts)}
    return compare("batch_independence", whole, joined, case.dtype, case.group,
                   f"the batch-{case.batch} run vs its elements run one by one")


def _gqa_equivariance(run: _Caller, case: Case, x: Inputs) -> CheckResult:
    G, H = case.group, case.heads_kv
    if G < 2:
        raise _Skip("G = 1: no two query heads share a kv head")
    perm = torch.tensor([h * G + (G - 1 - j) for h in range(H) for j in range(G)])  # reverse each group
    xp = Inputs(q=x.q[:, :, perm], k=x.k, v=x.v, g_cmp=x.g_cmp[:, :, perm], g_slc=x.g_slc[:, :, perm],
                g_swa=x.g_swa[:, :, perm], block_indices=x.block_indices)
    a, b = run(case, x), run(case, xp)
    back = {k: (v if k == "topk_idx" else v[:, :, perm]) for k, v in b.items()}
    return compare("gqa_equivariance", a, back, case.dtype, case.group,
                   "the run vs a run with the query heads of each group reversed (outputs permuted back)")


def _causality(run: _Caller, case: Case, x: Inputs) -> CheckResult:
    if case.cmp_mask not in CAUSAL_CMP_MASKS:
        raise _Skip(f"the case's cmp_mask {case.cmp_mask} is not causal (it asks for the future)")
    off, T, TQ = case.q_offset, case.seq_len, case.q_len
    p = off + max(0, TQ // 2 - 1)
    if p >= T - 1:
        raise _Skip("no query has a later key to perturb (one query at the last position)")
    gen = torch.Generator().manual_seed(case.seed + 104_729)
    dk = PERTURB * torch.randn(x.k.shape, generator=gen, dtype=torch.float64)
    dv = PERTURB * torch.randn(x.v.shape, generator=gen, dtype=torch.float64)
    after = torch.arange(T) > p
    xp = Inputs(q=x.q, k=x.k + (dk * after[None, :, None, None]).to(x.k.dtype).to(x.k.device),
                v=x.v + (dv * after[None, :, None, None]).to(x.v.dtype).to(x.v.device),
                g_cmp=x.g_cmp, g_slc=x.g_slc, g_swa=x.g_swa, block_indices=x.block_indices)
    a, b = run(case, x), run(case, xp)
    rows = p - off + 1  # queries at positions <= p (under varlen: positions of the packed sequence)
    res = compare("causality", {k: v[:, :rows] for k, v in a.items()}, {k: v[:, :rows] for k, v in b.items()},
                  case.dtype, case.group, f"queries at positions <= {p} after perturbing the keys/values after {p}")
    return res


_CHECKS: dict[str, Callable[[_Caller, Case, Inputs], CheckResult]] = {
    "inputs_unchanged": _inputs_unchanged, "determinism": _determinism, "decode_consistency": _decode_consistency,
    "batch_independence": _batch_independence, "gqa_equivariance": _gqa_equivariance, "causality": _causality}
assert tuple(_CHECKS) == CHECKS


def run_checks(oracle: Oracle, device: str, case: Case, names: tuple[str, ...]) -> list[CheckResult]:
    """Each check of ``names`` on ``case`` (in this process); a check that raises is an ERROR naming why."""
    caller = _Caller(oracle, device)
    out = []
    for name in names:
        try:
            out.append(_CHECKS[name](caller, case, materialize(case, "cpu")))
        except _Skip as e:
            out.append(CheckResult(name, "SKIP", str(e)))
        except Exception as e:  # noqa: BLE001 - foreign code: one line
            msg = str(e).splitlines()[0] if str(e) else ""
            out.append(CheckResult(name, "ERROR", f"{type(e).__name__}: {msg}"[:500]))
    return out


def serve_checks(oracle: Oracle, device: str, case_json: str, names_json: str) -> list[dict]:
    """``run_checks`` as JSON records: what an oracle's worker process runs (``Worker.submit_call``)."""
    return [r.to_dict() for r in run_checks(oracle, device, Case.from_json(case_json), tuple(json.loads(names_json)))]
