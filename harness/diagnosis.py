"""Differential diagnosis of a failing cell: which other NSA convention does the oracle compute?

For a FAIL cell the float64 reference is recomputed on the same inputs under alternative conventions,
one knob at a time, then pairs of knobs when no single one matches, and the oracle's output is judged
against each variant with the same tolerance rule (``comparator.judge`` on the variant's truth and
same-dtype baseline). The variants it passes are *matches* (best ``err_ratio`` first); when none
passes, the *nearest* variant (lowest ratio) is named.

Knobs (``KNOBS``; a knob is a family, each alternative one ``Alternative``):

* case fields, via ``Case.replace``: every other ``cmp_mask``, ``window_keys``, ``forced_blocks``
  (and ``group_importance``, ``gates`` where the case model has them);
* ``lse=base2``: ``cmp_lse`` in base 2, ``lse / ln 2``;
* ``scale=ignored_in_<cmp|slc|swa>``: one branch computed with ``1/sqrt(D)`` where the case has a
  custom ``scale`` (``o`` recombined from the branches);
* ``empty_rows=nan`` / ``empty_rows=finite_lse``: rows with no visible compressed block give NaN
  (``cmp_o``, ``cmp_lse``, ``o``), or a finite ``cmp_lse`` (any value);
* ``selection=no_causal_cut``: the selection branch attends to every key of its chosen blocks,
  ``s > p`` inside the current block included;
* ``padding=block0``: the top-n's ``-1`` padding is read as block 0 (attended once more);
  ``topk_padding=repeats``: the oracle pads ``topk_idx`` with repeated or out-of-range ids, not -1.

Cost is bounded: only failing cells, cheapest alternatives first (output transforms, then one
recomputed branch, then a whole reference), a time budget per case (``Diagnoser.budget`` seconds,
shared by the case's oracles and branches) and every variant's truth computed once per case.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from nsaconf.cases import conventions as C
from nsaconf.cases import vocabulary as V
from nsaconf.cases.model import Case, CaseError
from nsaconf.cases.tensors import Inputs, canonical_order
from nsaconf.cases.vocabulary import GRAD_BRANCHES
from nsaconf.harness.comparator import CaseTruth, judge
from nsaconf.harness.tolerance import ToleranceTable
from nsaconf.oracles.reference import _forward as _ref_forward
from nsaconf.oracles.reference import autograd_grads, nsa_reference

#: seconds of diagnosis per case (all its failing cells together); 0 turns the diagnosis off
DEFAULT_BUDGET_S = 10.0
#: the dense recompute of the selection branch (``B*TQ*HQ*T`` logits) is skipped above this many elements
DENSE_LIMIT = 1 << 25
NUMERIC = ("cmp_o", "cmp_lse", "slc_o", "swa_o", "o")

_CMP_RULE = {"end_inclusive": "blocks that end at or before p", "current_block": "blocks that start at or before p "
             "(its own unfinished block too)", "anti_causal": "blocks that end at or after p (the future)",
             "end_exclusive": "blocks that end strictly before p"}
_FORCED = {"none": "no block", "current": "the current block", "initial_local": "block 0 and the two local blocks"}
_GROUP = {"sum_probs": "the sum of the group's compressed probabilities (paper Eq. 10)",
          "mean_logits": "the softmax of the group-mean compressed logits (lucidrains)"}
_GATES = {"raw": "the given gate values as multipliers", "sigmoid": "sigmoid of the given gate values"}


# ------------------------------------------------------------------------------------------ alternatives
@dataclass(frozen=True)
class Alternative:
    """One alternative convention. ``knob``: its family (a pair takes two different knobs); ``changes``:
    Case fields to replace; ``transform``: a change of the reference's outputs (``TRANSFORMS``);
    ``cost``: 0 output transform, 1 one branch recomputed, 2 a whole reference; ``branches``: the
    branches it can change."""

    name: str
    knob: str
    text: str
    changes: tuple[tuple[str, Any], ...] = ()
    transform: Optional[str] = None
    cost: int = 2
    branches: tuple[str, ...] = NUMERIC + ("topk_idx",)


def _field_alternatives(case: Case) -> list[Alternative]:
    """Every other value of each convention field the case model has."""
    out: list[Alternative] = []
    fields = [("cmp_mask", V.CMP_MASKS), ("window_keys", V.WINDOW_KEYS), ("forced_blocks", V.FORCED_BLOCKS)]
    for name, vocab in (("group_importance", "GROUP_IMPORTANCE"), ("gates", "GATES")):
        if hasattr(V, vocab) and hasattr(case, name):
            fields.append((name, getattr(V, vocab)))
    for name, values in fields:
        have = getattr(case, name)
        for v in values:
            if v == have:
                continue
            if name == "cmp_mask":
                text = f"its compression branch sees the {_CMP_RULE[v]} ({v}); the case asks for {have} ({_CMP_RULE[have]})"
                br = ("cmp_o", "cmp_lse", "topk_idx", "slc_o", "o")
            elif name == "window_keys":
                if case.window == 0:
                    continue
                n = {"w": "w", "w_plus_1": "w+1"}
                text = f"the implementation's window has {n[v]} keys; the case asks for {n[have]}"
                br = ("swa_o", "o")
            elif name == "forced_blocks":
                if case.top_n < C.max_forced(v):
                    continue
                text = f"it forces {_FORCED[v]} into the top-n ({v}); the case asks for {_FORCED[have]} ({have})"
                br = ("topk_idx", "slc_o", "o")
            elif name == "group_importance":
                if case.group == 1:
                    continue
                text = f"it scores blocks by {_GROUP[v]}; the case asks for {_GROUP[have]}"
                br = ("topk_idx", "slc_o", "o")
            else:
                text = f"it applies {_GATES[v]}; the case asks for {_GATES[have]}"
                br = ("o",)
            out.append(Alternative(f"{name}={v}", name, text, changes=((name, v),), branches=br))
    return out


def alternatives(case: Case) -> list[Alternative]:
    """The single-knob alternatives that apply to ``case``, cheapest first."""
    alts = [Alternative("lse=base2", "lse", "its cmp_lse is a base-2 log-sum-exp; the canonical LSE is the natural log",
                        transform="lse_base2", cost=0, branches=("cmp_lse",)),
            Alternative("empty_rows=nan", "empty_rows", "rows with no visible compressed block give NaN; the canonical "
                        "output there is 0 (cmp_lse -inf)", transform="empty_nan", cost=0, branches=("cmp_o", "cmp_lse", "o")),
            Alternative("empty_rows=finite_lse", "empty_rows", "rows with no visible compressed block give a finite "
                        "cmp_lse; the canonical value is -inf", transform="empty_finite", cost=0, branches=("cmp_lse",)),
            Alternative("topk_padding=repeats", "padding", "its top-n pads with repeated or out-of-range block ids "
                        "instead of -1", transform="topk_repeats", cost=0, branches=("topk_idx",)),
            Alternative("selection=no_causal_cut", "selection", "its selection branch attends to every key of the "
                        "current block, keys after the query (s > p) included", transform="slc_no_causal", cost=1,
                        branches=("slc_o", "o")),
            Alternative("padding=block0", "padding", "its -1 top-n padding is read as block 0 (attended once more); "
                        "-1 slots must be ignored", transform="slc_pad_block0", cost=1, branches=("slc_o", "o"))]
    if case.scale is not None and not math.isclose(case.scale, case.head_dim ** -0.5):
        for br, what in (("swa", "sliding-window"), ("slc", "selection"), ("cmp", "compression")):
            alts.append(Alternative(f"scale=ignored_in_{br}", "scale", f"its {what} branch ignores the case's scale "
                                    f"{case.scale:g} and uses 1/sqrt(D) = {case.head_dim ** -0.5:.4g}",
                                    transform=f"scale_{br}", cost=1,
                                    branches=(f"{br}_o", "o") + (("cmp_lse",) if br == "cmp" else ())))
    return sorted(alts + _field_alternatives(case), key=lambda a: a.cost)


# ------------------------------------------------------------------------------------------ transforms
def _gate(case: Case, g: torch.Tensor) -> torch.Tensor:
    rules = getattr(C, "GATE_RULES", None)
    return rules[case.gates](g) if rules is not None and hasattr(case, "gates") else g


def _recombine(case: Case, x: Inputs, out: dict) -> None:
    """``o = g_cmp*o_cmp + g_slc*o_slc + g_swa*o_swa`` from ``out``'s branches (in place)."""
    o = out["cmp_o"] * _gate(case, x.g_cmp)[..., None] + out["slc_o"] * _gate(case, x.g_slc)[..., None]
    if "swa_o" in out:
        o = o + out["swa_o"] * _gate(case, x.g_swa)[..., None]
    out["o"] = o


def selection_dense(case: Case, x: Inputs, idx: torch.Tensor, causal: bool = True, pad_block0: bool = False) -> torch.Tensor:
    """The selection branch ``[B,TQ,HQ,DV]`` over the blocks ``idx`` ``[B,TQ,H,n]`` (relative to each
    sequence), computed densely: ``o = sum_s c_s e^{l_s} v_s / sum_s c_s e^{l_s}`` with ``c_s`` the number of
    chosen slots holding key s (``s <= p`` when ``causal``); ``pad_block0`` reads -1 slots as block 0."""
    B, TQ, HQ, H, G, DV = case.batch, case.q_len, case.heads_q, case.heads_kv, case.group, case.head_dim_v
    if B * TQ * HQ * case.seq_len > DENSE_LIMIT:
        raise ValueError("case too large for the dense selection recompute")
    ls = case.block_size
    out = x.q.new_zeros(B, TQ, HQ, DV)
    idx = idx.to(x.q.device).long()
    if pad_block0:
        idx = torch.where(idx < 0, torch.zeros_like(idx), idx)
    for b in range(B):
        for s0, s1 in case.sequences:
            if case.cu_seqlens is None:
                rows, pos = slice(0, TQ), torch.arange(case.q_offset, case.seq_len, device=x.q.device)
            else:
                rows, pos = slice(s0, s1), torch.arange(s1 - s0, device=x.q.device)
            Ts = s1 - s0
            ii = idx[b, rows]  # [R,H,n]
            keys = torch.arange(Ts, device=x.q.device)
            blk = keys // ls  # [Ts]
            cnt = (ii[..., None] == blk).sum(-2).to(x.q.dtype)  # [R,H,Ts]
            if causal:
                cnt = cnt * (keys[None, :] <= pos[:, None])[:, None, :]
            q = x.q[b, rows].reshape(-1, H, G, case.head_dim)
            k, v = x.k[b, s0:s1], x.v[b, s0:s1]
            logits = torch.einsum("rhgd,thd->rhgt", q, k) * case.softmax_scale + torch.log(cnt)[:, :, None, :]
            lse = torch.logsumexp(logits, -1, keepdim=True)
            p = torch.exp(logits - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse))
            out[b, rows] = torch.einsum("rhgt,thd->rhgd", p, v).reshape(-1, HQ, DV)
    return out


def _empty(truth: dict) -> torch.Tensor:
    """Rows ``[B,TQ,HQ]`` with no visible compressed block (truth ``cmp_lse = -inf``)."""
    return torch.isneginf(truth["cmp_lse"])


def _apply(name: str, case: Case, x: Inputs, out: dict, idx: Optional[torch.Tensor], empty: torch.Tensor,
           ref: Callable = nsa_reference) -> dict:
    """The reference outputs ``out`` (on ``x``'s dtype) under transform ``name``; ``ref`` computes the
    reference (a differentiable one for the gradient truth)."""
    out = dict(out)
    if name == "lse_base2":
        out["cmp_lse"] = out["cmp_lse"] / math.log(2.0)
    elif name == "empty_nan":
        nan = torch.tensor(float("nan"), dtype=out["cmp_o"].dtype)
        out["cmp_o"] = torch.where(empty[..., None], nan, out["cmp_o"])
        out["cmp_lse"] = torch.where(empty, nan, out["cmp_lse"])
        out["o"] = torch.where(empty[..., None], nan, out["o"])
    elif name == "empty_finite":  # any finite value: left unjudged here, required finite by _requirement
        out["cmp_lse"] = torch.where(empty, torch.tensor(float("nan"), dtype=out["cmp_lse"].dtype), out["cmp_lse"])
    elif name in ("slc_no_causal", "slc_pad_block0"):
        if idx is None:
            raise ValueError("no selection to recompute")
        xs = x.to("cpu")
        out["slc_o"] = selection_dense(case, xs, idx, causal=name != "slc_no_causal", pad_block0=name == "slc_pad_block0")
        _recombine(case, xs, out)
    elif name.startswith("scale_"):
        br = name.removeprefix("scale_")
        plain = ref(case.replace(scale=None), x, dtype=None, block_indices=None if idx is None else idx.to(x.q.device))
        for key in (f"{br}_o",) + (("cmp_lse",) if br == "cmp" else ()):
            out[key] = plain[key].cpu()
        _recombine(case, x.to("cpu"), out)
    elif name == "topk_repeats":
        pass  # a reading of the oracle's output, see _read_output
    else:
        raise ValueError(f"unknown transform {name!r}")
    return out


def _read_output(name: str, outputs: dict) -> dict:
    """The oracle's outputs as a transform reads them (``topk_repeats``: repeated / out-of-range ids -> -1)."""
    if name != "topk_repeats" or not isinstance(outputs.get("topk_idx"), torch.Tensor):
        return outputs
    t = outputs["topk_idx"].detach().cpu().long()
    srt, _ = t.sort(-1)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[..., 1:] = srt[..., 1:] == srt[..., :-1]
    srt = torch.where(dup | (srt < 0), torch.full_like(srt, -1), srt)
    return {**outputs, "topk_idx": canonical_order(srt)}


def _requirement(names: tuple[str, ...], branch: str, out: Any, empty: torch.Tensor) -> Optional[str]:
    """What a transform demands of the oracle beyond the numbers (None: met)."""
    if not ({"empty_nan", "empty_finite"} & set(names)):
        return None
    if not isinstance(out, torch.Tensor) or not empty.any() or tuple(out.shape[:3]) != tuple(empty.shape):
        return "no empty rows to compare"
    o = out.detach().cpu()
    rows = o[empty] if o.dim() == empty.dim() else o[empty].reshape(-1)
    if "empty_nan" in names and branch in ("cmp_o", "cmp_lse", "o") and not torch.isnan(rows).all():
        return "empty rows are not NaN"
    if "empty_finite" in names and branch == "cmp_lse" and not torch.isfinite(rows).all():
        return "empty rows have no finite cmp_lse"
    return None


# ------------------------------------------------------------------------------------------ variant truth
@dataclass
class VariantTruth(CaseTruth):
    """The truth and baseline of one variant (a tuple of alternatives); ``with_indices`` recomputes them
    with the variant's transforms too. Gradients only for case-field variants."""

    transforms: tuple[str, ...] = ()
    empty: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, ct: CaseTruth, alts: tuple[Alternative, ...], fixed_indices: bool) -> "VariantTruth":
        changes = {k: v for a in alts for k, v in a.changes}
        case = ct.case.replace(**changes) if changes else ct.case
        x = ct.inputs
        given = ct.given_indices if fixed_indices else None
        if changes:
            truth = _cpu(nsa_reference(case, x, dtype=torch.float64, return_importance=True,
                                       block_indices=None if given is None else given.to(x.q.device)))
            own = truth["topk_idx"] if case.block_indices == "topk" else x.block_indices
            given = given if given is not None else (None if own is None else own.cpu())
            base = truth if x.q.dtype == torch.float64 and case.dtype == "float64" else _cpu(
                nsa_reference(case, x, dtype=None, return_importance=True,
                              block_indices=None if given is None else given.to(x.q.device)))
        else:
            truth, base, given = ct.truth, ct.baseline, ct.given_indices
        vt = cls(case=case, truth=truth, baseline=base, given_indices=given, device=ct.device, _inputs=ct._inputs,
                 transforms=tuple(a.transform for a in alts if a.transform), empty=_empty(truth))
        vt.truth, vt.baseline = vt._transform(truth, base, given)
        return vt

    def _transform(self, truth: dict, base: dict, idx: Optional[torch.Tensor]) -> tuple[dict, dict]:
        x = self.inputs
        same = base is truth
        for name in self.transforms:
            truth = _apply(name, self.case, x.to(dtype=torch.float64), truth, idx, self.empty)
            base = truth if same else _apply(name, self.case, x, base, idx, self.empty)
        return truth, base

    def _pair(self, fn, idx):
        if self.transforms and fn is not nsa_reference:
            return self._grad_pair(idx)
        truth, base = super()._pair(fn, idx)
        if fn is nsa_reference and self.transforms:
            truth, base = self._transform(truth, base, idx)
        return truth, base


    def _grad_pair(self, idx: Optional[torch.Tensor]) -> tuple[dict, dict]:
        """Gradient truth and baseline of the transformed forward, by autograd (``autograd_grads``)."""
        if "empty_nan" in self.transforms:
            raise ValueError("no gradient truth with NaN rows")
        x = self.inputs
        d = None if idx is None else idx.to(x.q.device)

        def ref(case, xi, dtype=None, block_indices=None):
            return _ref_forward(case, xi, None, block_indices, False)

        def forward(xi: Inputs) -> dict:
            out = _ref_forward(self.case, xi, None, d, False)
            for name in self.transforms:
                out = _apply(name, self.case, xi, out, d, self.empty, ref=ref)
            return out

        truth = _cpu(autograd_grads(forward, self.case, x.to(dtype=torch.float64)))
        return truth, truth if self.case.dtype == "float64" else _cpu(autograd_grads(forward, self.case, x))


def _cpu(d: dict) -> dict:
    return {k: v.detach().cpu() for k, v in d.items()}


def explains(a: Alternative, branch: str) -> bool:
    """Can alternative ``a`` change ``branch``? A gradient follows ``o``."""
    if branch in GRAD_BRANCHES:
        return "o" in a.branches and a.transform != "empty_nan"
    return branch in a.branches


# ------------------------------------------------------------------------------------------ the diagnoser
@dataclass
class Diagnoser:
    """Diagnoses the failing cells of one case; ``budget`` seconds over all of them (variant truths
    are computed once and reused across the case's oracles and branches). ``known``: (oracle, branch) ->
    the keys that matched on earlier cases of the run (shared by the run's diagnosers): tried first, and
    when one matches again the search stops there. Where no single knob matches, the causes found on the
    oracle's other branches of the case are tried together (three knobs or more, e.g. ``o`` of an
    implementation whose window, compression mask and importance each differ), then pairs."""

    ct: CaseTruth
    table: ToleranceTable
    budget: float = DEFAULT_BUDGET_S
    known: dict = field(default_factory=dict)
    spent: float = 0.0
    _cache: dict = field(default_factory=dict)
    _found: dict = field(default_factory=dict)  # oracle -> {knob: Alternative} matched on this case

    def _truth(self, alts: tuple[Alternative, ...], fixed: bool) -> Optional[VariantTruth]:
        key = (tuple(a.name for a in alts), fixed)
        if key not in self._cache:
            try:
                self._cache[key] = VariantTruth.build(self.ct, alts, fixed)
            except (CaseError, ValueError, RuntimeError, KeyError):
                self._cache[key] = None
        return self._cache[key]

    def diagnose(self, oracle: str, layer: str, branch: str, outputs: dict, needs_block_indices: bool = False,
                 own_ratio: Optional[float] = None) -> Optional[dict]:
        """The ``diagnosis`` record of a FAIL cell (None: out of budget before any variant was judged)."""
        t0 = time.monotonic()
        singles = [a for a in alternatives(self.ct.case) if explains(a, branch)]
        tried: list[tuple[str, float, tuple[Alternative, ...], float]] = []
        matches: list[tuple[str, float, tuple[Alternative, ...], float]] = []

        def over() -> bool:
            return self.spent + (time.monotonic() - t0) > self.budget

        def attempt(alts: tuple[Alternative, ...], parts: list[dict]) -> Optional[dict]:
            vt = self._truth(alts, needs_block_indices)
            if vt is None:
                return None
            if branch in GRAD_BRANCHES:
                try:
                    mine = vt.grads()[0].get(branch)
                except Exception:  # noqa: BLE001 - no gradient truth under this variant: no candidate
                    return None
                if mine is None or any(_same(mine, p) for p in parts):
                    return None
            elif branch not in vt.truth:
                return None
            elif branch != "topk_idx":
                mine = vt.truth[branch]
                if any(_same(mine, p) for p in parts):
                    return None
            names = tuple(a.transform for a in alts if a.transform)
            outs = outputs
            for n in names:
                outs = _read_output(n, outs)
            try:
                v = judge(vt, oracle, layer, (branch,), outs, self.table, needs_block_indices=needs_block_indices)[0]
            except Exception:  # noqa: BLE001 - a variant that cannot be judged is no candidate
                return None
            if v.status not in ("PASS", "FAIL"):
                return None
            ratio = _ratio(v)
            name = " + ".join(a.name for a in alts)
            # among equal ratios the closer variant: fewer top-n rows that differ at all (ties included)
            second = float(v.metrics.get("topk_rows_differ", 0)) if branch == "topk_idx" else 0.0
            tried.append((name, ratio, alts, second))
            if v.status == "PASS" and _requirement(names, branch, outs.get(branch), vt.empty) is None:
                matches.append((name, ratio, alts, second))
            return {branch: mine} if branch in GRAD_BRANCHES else vt.truth

        base = [self.ct.truth[branch]] if branch in self.ct.truth and branch != "topk_idx" else []
        if branch in GRAD_BRANCHES:
            try:
                base = [self.ct.grads()[0][branch]]
            except Exception:  # noqa: BLE001 - judge() reported it; nothing to diagnose against
                return None
        by_name = {a.name: a for a in singles}
        seen = self.known.setdefault((oracle, branch), [])
        for key in list(seen):
            alts = tuple(by_name[n] for n in key.split(" + ") if n in by_name)
            if matches or over() or len(alts) != len(key.split(" + ")):
                continue
            attempt(alts, base)
        found = self._found.setdefault(oracle, {})  # knob -> alternative matched on this case's other branches
        union = tuple(found[k] for k in sorted(found) if explains(found[k], branch))
        for a in union:  # the causes of the oracle's other branches, one by one, then together
            if not matches and not over() and a.name not in seen:
                attempt((a,), base)
        if not matches and not over() and len(union) >= 2:
            attempt(union, base)
        single_truth: dict[str, Any] = {}
        for a in singles if not matches else ():
            if over():
                break
            if any(m[0] == a.name for m in tried):
                continue
            t = attempt((a,), base)
            if t is not None and branch in t:
                single_truth[a.name] = t[branch]
        if not matches and not over():  # pairs, those of the nearest singles first
            ratio = {name: r for name, r, alts, _ in tried if len(alts) == 1}
            ranked = sorted(singles, key=lambda a: ratio.get(a.name, math.inf))
            rank = {a.name: i for i, a in enumerate(ranked)}
            # a pair that contradicts a cause measured on another branch (cmp_o's mask, say) comes last
            contradicts = lambda a: a.knob in found and found[a.knob].name != a.name  # noqa: E731
            pairs = sorted(((a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:] if a.knob != b.knob),
                           key=lambda p: (contradicts(p[0]) or contradicts(p[1]),
                                          rank[p[0].name] + rank[p[1].name], rank[p[0].name]))
            extras = [tuple(f for f in union if f.knob not in (a.knob, b.knob)) for a, b in pairs]
            # the first matching pair ends the search: with the causes found before, every pair first
            for with_found in (True, False):
                for (a, b), extra in zip(pairs, extras):
                    if over() or matches:
                        break
                    if with_found and not extra:
                        continue
                    parts = base + [single_truth[n] for n in (a.name, b.name) if n in single_truth]
                    attempt(extra + (a, b) if with_found else (a, b), parts)
        self.spent += time.monotonic() - t0
        if not tried:
            return None
        if matches:
            best = min(matches, key=_order)
            seen[:] = [best[0]] + [k for k in seen if k != best[0]]
            for a in best[2]:
                found.setdefault(a.knob, a)
        return describe(self.ct.case, branch, matches, tried, own_ratio)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.nan_to_num(nan=0.123456789), b.nan_to_num(nan=0.123456789)))


def _order(m: tuple) -> tuple:
    """Best variant first: lower ratio, then fewer top-n rows that differ at all, then fewer knobs."""
    return (m[1], m[3], len(m[2]))


def _ratio(v) -> float:
    """The variant's err/bound (``topk_idx``: the fraction of (query, kv head) rows that differ beyond ties)."""
    m = v.metrics
    if v.branch == "topk_idx":
        rows = m.get("topk_rows") or 1
        return float(m.get("topk_disagree", 0)) / rows
    r = m.get("err_ratio")
    if isinstance(r, (int, float)) and not (m.get("nonfinite") or m.get("empty_rows_bad")):
        return float(r)
    return math.inf if v.status == "FAIL" else float(r or 0.0)


def _fmt_ratio(branch: str, r: float) -> str:
    if branch == "topk_idx":
        return f"{r:.1%} of rows differ" if r > 0 else "r 0"
    return f"r {r:.2g}"


def describe(case: Case, branch: str, matches: list, tried: list, own_ratio: Optional[float]) -> dict:
    """The diagnosis record (schema: docs/diagnosis.md)."""
    if matches:
        matches = sorted(matches, key=_order)
        name, r, alts, _ = matches[0]
        text = f"matches the reference with {name} ({_fmt_ratio(branch, r)}): " + "; ".join(a.text for a in alts)
        others = [m[0] for m in matches[1:4]]
        if others:
            text += f" (also matches {', '.join(others)})"
        return {"key": name, "matched": True,
                "variants": [{"name": m[0], "ratio": _num(m[1])} for m in matches],
                "nearest": None, "text": text}
    name, r, alts, _ = min(tried, key=_order)
    own = f"the case's own conventions (r {own_ratio:.2g})" if own_ratio is not None else "the case's own conventions"
    if own_ratio is not None and branch != "topk_idx" and not r < own_ratio:
        text = f"no alternative convention matches ({len(tried)} tried); none comes closer than {own}"
    else:
        text = f"no alternative convention matches ({len(tried)} tried); nearest: {name} ({_fmt_ratio(branch, r)}) vs {own}"
    return {"key": "", "matched": False, "variants": [], "nearest": {"name": name, "ratio": _num(r)}, "text": text}


def _num(x: float) -> Any:
    return x if math.isfinite(x) else "inf"
