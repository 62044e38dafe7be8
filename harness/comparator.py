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

Forward branches are judged window by window (``query_windows``: a few thousand query rows at a time),
from the held truth (``CaseTruth``) or from one computed per window and dropped (``StreamedTruth``, for a
large case: the memory of one window instead of the whole truth). Both give the same windows bit for bit,
so the same verdicts and metrics; ``judge_many`` judges several oracles' replies in one pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch

from nsaconf.cases.conventions import is_forced, selection_candidate
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import TORCH_DTYPES, Inputs, canonical_order, materialize, query_positions
from nsaconf.harness.error_map import ErrorMapBuilder
from nsaconf.harness.tolerance import TORCH_DEFAULT_TOLS, Rule, ToleranceTable, rule_dict
from nsaconf.oracles.base import GRAD_BRANCHES
from nsaconf.oracles.reference import (grad_truth_skip_reason, nsa_reference, nsa_reference_grads,  # noqa: F401 (re-exported)
                                       output_shapes, query_windows)

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


class TruthFailed(Exception):
    """The truth of a case could not be computed (its message is the cells' reason)."""


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

    @property
    def keys(self) -> set[str]:
        """The truth's branches (and ``importance``)."""
        return set(self.truth)

    def windows(self, idx: Optional[torch.Tensor] = None) -> Iterator[tuple[tuple[slice, slice], dict, dict]]:
        """``(rows, truth, baseline)`` per ``query_windows`` window, ``rows`` = ``(batch slice, query slice)``
        of the ``[B,TQ,...]`` tensors, ``truth``/``baseline`` their rows (views); with the selection ``idx``:
        of ``with_indices(idx)``."""
        truth, base = (self.truth, self.baseline) if idx is None else self.with_indices(idx)
        for b, r0, r1 in query_windows(self.case):
            rows = (slice(b, b + 1), slice(r0, r1))
            yield rows, {k: v[rows] for k, v in truth.items()}, {k: v[rows] for k, v in base.items()}

    def _pair(self, fn, idx: Optional[torch.Tensor]) -> tuple[dict, dict]:
        return _pair(self.case, self.inputs, fn, idx)

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


def _pair(case: Case, x: Inputs, fn, idx: Optional[torch.Tensor]) -> tuple[dict, dict]:
    """(float64 truth, case-dtype baseline) of ``fn`` (``nsa_reference`` or ``nsa_reference_grads``) on ``x``
    with the selection ``idx`` (None: the case's own rule), computed on the inputs' device, kept on the CPU;
    one computation when the case dtype is float64."""
    d = None if idx is None else idx.to(x.q.device)
    truth = _cpu(fn(case, x, dtype=torch.float64, block_indices=d))
    return truth, truth if _baseline_is_truth(case) else _cpu(fn(case, x, dtype=None, block_indices=d))


#: bytes of a case's held truth and baseline (``held_truth_bytes``) above which ``nsaconf run`` streams
#: the truth (``StreamedTruth``)
HELD_TRUTH_LIMIT = 1 << 26


def held_truth_bytes(case: Case) -> int:
    """Bytes that ``CaseTruth.compute`` keeps: every output of the float64 truth with its importance, twice
    when the baseline is a second computation."""
    n = sum(math.prod(s) for s in output_shapes(case, return_importance=True).values())
    return 8 * n * (1 if _baseline_is_truth(case) else 2)


@dataclass
class StreamedTruth:
    """The truth and baseline of one case computed window by window (``query_windows``) while the oracles'
    outputs are judged, never held whole: ``judge_many`` asks for them once for all the oracles of the case.
    Each window holds the rows that ``CaseTruth.compute`` gives, bit for bit, so verdicts and metrics are
    the same; memory is one window instead of the whole truth. ``threads``: torch's CPU threads for the
    truth's computation (0: as set)."""

    case: Case
    device: str = "cpu"
    threads: int = 0
    _topk: Optional[torch.Tensor] = None   # the truth's top-n, filled by each window of a pass
    _complete: bool = False
    _grads: Optional[tuple[dict, dict]] = None
    _alt_grads: dict[bytes, tuple[dict, dict]] = field(default_factory=dict)
    _held: Optional[CaseTruth] = None
    _inputs: Optional[Inputs] = None  # never kept (``inputs`` materializes them again), as for a ``CaseTruth``

    @property
    def inputs(self) -> Inputs:
        return materialize(self.case, self.device)

    @property
    def keys(self) -> set[str]:
        return set(output_shapes(self.case, return_importance=True))

    @property
    def given_indices(self) -> Optional[torch.Tensor]:
        """The selection that ``slc_o`` uses: the truth's top-n (one pass over the windows, if none has run
        yet) or the case's random indices."""
        if self.case.block_indices != "topk":
            return materialize(self.case, "cpu").block_indices
        if not self._complete:
            for _ in self.windows():
                pass
        return self._topk

    def windows(self, idx: Optional[torch.Tensor] = None) -> Iterator[tuple[tuple[slice, slice], dict, dict]]:
        """As ``CaseTruth.windows``, each window computed when it is asked for (``TruthFailed`` if it cannot be)."""
        case = self.case
        try:
            x = materialize(case, self.device)
            x64 = x.to(dtype=torch.float64)
            d = None if idx is None else idx.to(x.q.device)
            if idx is None and case.block_indices == "topk" and self._topk is None:
                self._topk = torch.empty(output_shapes(case)["topk_idx"], dtype=torch.long)
        except Exception as e:  # noqa: BLE001
            raise TruthFailed(f"truth failed: {type(e).__name__}: {e}") from e
        for w in query_windows(case):
            rows = (slice(w[0], w[0] + 1), slice(w[1], w[2]))
            threads = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                truth = _cpu(nsa_reference(case, x64, dtype=None, block_indices=d, window=w, return_importance=idx is None))
                given = d
                if idx is None and case.block_indices == "topk":
                    self._topk[rows] = truth["topk_idx"]
                    given = self._topk.to(x.q.device)
                base = truth if _baseline_is_truth(case) else _cpu(nsa_reference(
                    case, x, dtype=None, block_indices=given, window=w, return_importance=idx is None))
            except Exception as e:  # noqa: BLE001
                raise TruthFailed(f"truth failed: {type(e).__name__}: {e}") from e
            finally:
                torch.set_num_threads(threads)
            yield rows, truth, base
            del truth, base
        if idx is None:
            self._complete = True

    def held(self) -> CaseTruth:
        """The whole truth (``CaseTruth.compute``), for the uses that need it all at once (a FAIL's
        diagnosis: ``harness.diagnosis``)."""
        if self._held is None:
            self._held = CaseTruth.compute(self.case, device=self.device)
        return self._held

    @property
    def truth(self) -> dict[str, torch.Tensor]:
        return self.held().truth

    @property
    def baseline(self) -> dict[str, torch.Tensor]:
        return self.held().baseline

    def with_indices(self, idx: torch.Tensor) -> tuple[dict, dict]:
        return self.held().with_indices(idx)

    def grads(self) -> tuple[dict, dict]:
        if self._grads is None:
            self._grads = _pair(self.case, self.inputs, nsa_reference_grads, self.given_indices)
        return self._grads

    def grads_with_indices(self, idx: torch.Tensor) -> tuple[dict, dict]:
        key = idx.cpu().numpy().tobytes()
        if key not in self._alt_grads:
            self._alt_grads[key] = _pair(self.case, self.inputs, nsa_reference_grads, idx)
        return self._alt_grads[key]


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


def _nanmax(a: float, b: float) -> float:
    """``max`` that keeps a NaN, as one ``Tensor.max`` over both would."""
    return a if a != a or not (b > a or b != b) else b


class NumericCheck:
    """``compare_numeric`` fed piece by piece: ``feed`` the flat elements of consecutive parts of the
    tensors (in memory order, at their flat ``offset``), then ``verdict``. Each piece is judged
    ``COMPARE_CHUNK`` elements at a time: maxima, counts and sums of squares carry over, and
    ``rule.floor``, a maximum over elements, is the maximum of the pieces' floors."""

    def __init__(self, case: Case, branch: str, out: Any, shape: tuple[int, ...], rule: Rule, dtype: str) -> None:
        self.case, self.branch, self.shape, self.rule, self.dtype = case, branch, tuple(shape), rule, dtype
        tol = rule_dict(rule)
        self.early: Optional[Verdict] = None
        if not isinstance(out, torch.Tensor):
            self.early = Verdict(branch, "FAIL", f"{branch}: expected a tensor, got {type(out).__name__}", {}, tol)
        elif tuple(out.shape) != self.shape:
            self.early = Verdict(branch, "FAIL", f"{branch}: shape {list(out.shape)} != canonical {list(self.shape)}", {}, tol)
        elif not out.is_floating_point():
            self.early = Verdict(branch, "FAIL", f"{branch}: dtype {out.dtype} is not floating point", {}, tol)
        self.out_dtype = None if self.early else str(out.dtype).replace("torch.", "")
        self.rtol, self.atol = TORCH_DEFAULT_TOLS[dtype]
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.err = self.base_err = self.scale = self.sum_t2 = self.sum_d2 = 0.0
        self.floor = rule.floor(torch.zeros(0, dtype=torch.float64), self.torch_dtype)
        self.n_empty = self.n_empty_bad = self.n_nonfinite = self.n_finite = self.n_both = self.n_mism = 0
        self.worst, self.worst_at = -1.0, -1
        self.over = 0
        self.emap = ErrorMapBuilder(case, self.shape, keys=branch in KEY_LAYOUT)

    def feed(self, flat_o: torch.Tensor, flat_t: torch.Tensor, flat_b: torch.Tensor, offset: int) -> None:
        """Elements ``offset : offset + len`` of the oracle's output, the truth and the baseline (1-D)."""
        if self.early is not None:
            return
        branch, rule, rtol, atol = self.branch, self.rule, self.rtol, self.atol
        for s0 in range(0, flat_t.numel(), COMPARE_CHUNK):
            rows = slice(s0, s0 + COMPARE_CHUNK)
            o, t, bl = flat_o[rows].double(), flat_t[rows].double(), flat_b[rows].double()
            tfin = torch.isfinite(t)
            if branch == "cmp_lse":  # rows with no visible key: truth -inf (cmp_o: check_empty_cmp_o)
                empty = torch.isneginf(t)
                self.n_empty += int(empty.sum())
                self.n_empty_bad += int((empty & ~torch.isneginf(o)).sum())
                del empty
            nonfinite = tfin & ~torch.isfinite(o)
            self.n_nonfinite += int(nonfinite.sum())
            m = tfin & torch.isfinite(o)
            diff = torch.where(m, (o - t).abs(), 0.0)
            self.err = max(self.err, float(diff.max()))
            self.base_err = max(self.base_err, float(torch.where(tfin & torch.isfinite(bl), (bl - t).abs(), 0.0).max()))
            tf = t[tfin]
            if tf.numel():
                self.scale = max(self.scale, float(tf.abs().max()))
                self.floor = max(self.floor, rule.floor(tf, self.torch_dtype))
                self.sum_t2 += float(tf.pow(2).sum())
                self.n_finite += tf.numel()
            del tf
            d_f = (o - t)[m]
            self.sum_d2 += float(d_f.pow(2).sum())
            self.n_both += d_f.numel()
            del d_f
            self.n_mism += int(((diff > atol + rtol * t.abs().nan_to_num(posinf=0.0, neginf=0.0)) | nonfinite).sum())
            src = torch.where(nonfinite, math.inf, diff)
            self.emap.add(offset + s0, src)
            at = int(src.argmax())
            if float(src[at]) > self.worst:  # the first largest, as one argmax over the whole tensor
                self.worst, self.worst_at = float(src[at]), offset + s0 + at
            del o, t, bl, tfin, nonfinite, m, diff, src

    @property
    def bound(self) -> float:
        """The error bound from what was fed so far (final once every piece was fed)."""
        return self.rule.bound(self.base_err, self.floor, self.scale)

    @property
    def needs_count(self) -> bool:
        """The error is over the bound: ``verdict`` needs the count of elements over it (``count``, a second
        pass over the same pieces)."""
        return self.early is None and self.err > self.bound

    def count(self, flat_o: torch.Tensor, flat_t: torch.Tensor) -> None:
        """Second pass, once every piece was fed: elements over the final bound (``_count_over``)."""
        self.over += _count_over(flat_o, flat_t, self.bound)

    def verdict(self) -> Verdict:
        if self.early is not None:
            return self.early
        branch, rule = self.branch, self.rule
        metrics: dict[str, Any] = {"out_dtype": self.out_dtype}
        problems: list[str] = []
        if branch == "cmp_lse":
            metrics["empty_rows"], metrics["empty_rows_bad"] = self.n_empty, self.n_empty_bad
            if self.n_empty_bad:
                problems.append(f"{self.n_empty_bad} of {self.n_empty} empty rows (no visible block) have cmp_lse != -inf")
        metrics["nonfinite"] = self.n_nonfinite
        if self.n_nonfinite:
            problems.append(f"{self.n_nonfinite} NaN/Inf values where the truth is finite")
        err, base_err, floor, scale = self.err, self.base_err, self.floor, self.scale
        bound = self.bound
        tol = rule_dict(rule, floor)
        rms_t = math.sqrt(self.sum_t2 / self.n_finite) if self.n_finite else 0.0
        rel_rms = math.sqrt(self.sum_d2 / self.n_both) / (rms_t + 1e-8) if self.n_both else 0.0
        numel = math.prod(self.shape)
        metrics.update({
            "max_abs_err": err, "baseline_err": base_err, "floor": floor, "bound": bound,
            "err_ratio": (err / bound) if bound > 0 else (0.0 if err == 0 else math.inf),
            "rel_rms": rel_rms, "mismatch_frac": self.n_mism / numel if numel else 0.0,
            "max_abs_truth": scale,
        })
        if self.worst_at >= 0:
            metrics["worst_index"] = _worst_index(self.case, self.worst_at, self.shape, keys=branch in KEY_LAYOUT)
        if err > bound:
            over = self.over
            metrics["over_bound"] = over
            problems.append(f"Mismatched elements: {over} / {numel} ({over / numel:.1%}); greatest absolute "
                            f"difference {err:.3g} at {_unravel(self.worst_at, self.shape)} (bound {bound:.3g}: "
                            f"{rule.describe()}; baseline_err {base_err:.3g}, floor {floor:.3g})")
        # zero / constant outputs never pass (KernelBench#165); its text only when it is what fails the cell
        if scale > 0 and not (err < rule.nontrivial * scale and rel_rms < rule.nontrivial):
            metrics["constant_guard"] = True
            if not problems:
                problems.append(f"zero/constant-output guard (KernelBench#165): need err < {rule.nontrivial:g}*max|truth| and rel_rms < {rule.nontrivial:g} (err {err:.3g} vs max|truth| {scale:.3g}, rel_rms {rel_rms:.3g})")
        status = "FAIL" if problems else "PASS"
        return Verdict(branch, status, "; ".join(problems), metrics, tol, self.emap.to_dict(bound) if problems else None)


def compare_numeric(case: Case, branch: str, out: torch.Tensor, truth: torch.Tensor,
                    baseline: torch.Tensor, rule: Rule, dtype: str) -> Verdict:
    """Judge a numeric branch (see module docstring). ``truth`` float64, ``baseline`` in ``dtype``,
    ``COMPARE_CHUNK`` elements at a time (``NumericCheck``)."""
    check = NumericCheck(case, branch, out, tuple(truth.shape), rule, dtype)
    if check.early is None:
        flat_o, flat_t = out.detach().cpu().reshape(-1), truth.reshape(-1)
        check.feed(flat_o, flat_t, baseline.detach().cpu().reshape(-1), 0)
        if check.needs_count:
            check.count(flat_o, flat_t)
    return check.verdict()


def _empty_cmp_counts(out: Any, truth_lse: torch.Tensor) -> tuple[int, Optional[int]]:
    """(rows with no visible compressed block, those where ``out`` (``cmp_o``) is not exactly 0; None when
    ``out`` is not a ``[B,TQ,HQ,*]`` tensor of the truth's rows)."""
    empty = torch.isneginf(truth_lse)  # [B,TQ,HQ]
    if not isinstance(out, torch.Tensor) or tuple(out.shape[:3]) != tuple(empty.shape):
        return int(empty.sum()), None
    o = out.detach().cpu()
    bad = empty & ((o != 0) | ~torch.isfinite(o)).any(dim=-1)
    return int(empty.sum()), int(bad.sum())


def _apply_empty_cmp(verdict: Verdict, n_empty: int, n_bad: Optional[int]) -> Verdict:
    verdict.metrics["empty_rows"] = n_empty
    if n_bad is None:
        return verdict
    verdict.metrics["empty_rows_bad"] = n_bad
    if n_bad:
        msg = f"{n_bad} of {n_empty} empty rows (no visible block) have cmp_o != 0"
        verdict.reason = "; ".join(x for x in (verdict.reason, msg) if x)
        verdict.status = "FAIL"
    return verdict


def check_empty_cmp_o(out: torch.Tensor, truth_lse: torch.Tensor, verdict: Verdict) -> Verdict:
    """``cmp_o`` must be exactly 0 in rows where the truth sees no compressed block."""
    return _apply_empty_cmp(verdict, *_empty_cmp_counts(out, truth_lse))


class _TieTolerance:
    """``topk_tie_tolerance`` fed piece by piece (maxima carry over)."""

    def __init__(self, rule: Rule, dtype: str) -> None:
        self.rule, self.torch_dtype = rule, TORCH_DTYPES[dtype]
        self.scale = self.base_err = 0.0
        self.floor = rule.floor(torch.zeros(0, dtype=torch.float64), self.torch_dtype)

    def feed(self, truth_imp: torch.Tensor, base_imp: torch.Tensor) -> None:
        if not truth_imp.numel():
            return
        self.scale = _nanmax(self.scale, _nonzero_max(truth_imp))
        if self.rule.rule != "tight":
            self.base_err = _nanmax(self.base_err, float((base_imp.double() - truth_imp.double()).abs().max()))
            self.floor = _nanmax(self.floor, self.rule.floor(truth_imp.double(), self.torch_dtype))

    def value(self) -> float:
        if self.rule.rule == "tight":
            return self.rule.tight * max(1.0, self.scale)
        return self.rule.k * self.base_err + self.floor


def topk_tie_tolerance(truth_imp: torch.Tensor, base_imp: torch.Tensor, rule: Rule, dtype: str) -> float:
    """Importance tolerance for ties: the numeric rule applied to the importance tensor."""
    tie = _TieTolerance(rule, dtype)
    tie.feed(truth_imp, base_imp)
    return tie.value()


def _topk_shape_problem(out: Any, truth_shape: tuple[int, ...]) -> Optional[str]:
    if not isinstance(out, torch.Tensor) or out.is_floating_point():
        return "topk_idx: expected an integer tensor"
    if tuple(out.shape[:3]) != tuple(truth_shape[:3]) or out.dim() != 4:
        return f"topk_idx: shape {list(out.shape)} != canonical {list(truth_shape)}"
    return None


def _topk_rows(case: Case, o: torch.Tensor, truth_idx: torch.Tensor, importance: torch.Tensor,
               pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per (b, query, kv head) row, flattened: ``differ`` (the sets differ, or ids out of range or
    duplicated), ``hard`` (differs beyond any tie: out of range, duplicated, a non-candidate or a missing
    forced block), ``dist`` (max over the differing blocks of |importance - the n-th selected block's
    importance|, -inf where none differs; a row is a tie iff not ``hard`` and ``dist <= tie_tol``) and
    ``noncausal`` (the oracle picked a non-candidate block). ``o``, ``truth_idx`` ``[B,R,H,*]``, ``importance``
    ``[B,R,H,NS]``, ``pos`` ``[R]``."""
    B, R, H, _ = truth_idx.shape
    NS = importance.shape[-1]
    ls = case.block_size
    j = torch.arange(NS)

    def member(idx: torch.Tensor) -> torch.Tensor:  # [B,R,H,NS+1]: slot NS collects -1 / out-of-range ids
        m = torch.zeros(B, R, H, NS + 1, dtype=torch.bool)
        ids = torch.where((idx >= 0) & (idx < NS), idx, torch.full_like(idx, NS))
        m.scatter_(-1, ids, True)
        return m
    out_of_range = ((o >= NS) | (o < -1)).any(dim=-1)
    mo, mt = member(o)[..., :NS], member(truth_idx)[..., :NS]
    valid = (o >= 0) & (o < NS)
    dup = (valid.sum(-1) != mo.sum(-1))  # duplicated ids in the oracle's selection
    diff = mo ^ mt
    differ = diff.any(-1) | out_of_range | dup
    if not differ.any():
        none = torch.zeros(B * R * H, dtype=torch.bool)
        return {"differ": none, "hard": none, "dist": torch.full((B * R * H,), -math.inf, dtype=torch.float64),
                "noncausal": none}
    imp = importance.double()
    cand = selection_candidate(j[None, :], pos[:, None], ls)[None, :, None, :]       # [1,R,1,NS]
    forced = is_forced(case.forced_blocks, j[None, :], pos[:, None], ls)[None, :, None, :]
    # threshold: importance of the n-th selected (lowest non-forced selected) block; 0 if fewer than n
    sel_nf = mt & ~forced
    thr = torch.where(sel_nf, imp, torch.full_like(imp, math.inf)).min(-1).values
    full = mt.sum(-1) >= case.top_n
    thr = torch.where(full & torch.isfinite(thr), thr, torch.zeros_like(thr))
    hard = (diff & (~cand | (forced & mt & ~mo))).any(-1) | out_of_range | dup
    dist = torch.where(diff, (imp - thr[..., None]).abs(), torch.full_like(imp, -math.inf)).amax(-1)
    return {"differ": differ.reshape(-1), "hard": hard.reshape(-1), "dist": dist.reshape(-1),
            "noncausal": (diff & mo & ~cand).any(-1).reshape(-1)}


def _topk_verdict(case: Case, rows: dict[str, torch.Tensor], out: torch.Tensor, truth_idx: torch.Tensor, NS: int,
                  tie_tol: float, tol: dict) -> Verdict:
    """The ``topk_idx`` verdict from the rows of ``_topk_rows`` over the whole tensors (``out``,
    ``truth_idx`` ``[B,TQ,H,*]``: the first disagreement's sets)."""
    B, TQ, H, _ = truth_idx.shape
    differ = rows["differ"]
    metrics: dict[str, Any] = {"topk_rows": B * TQ * H, "topk_rows_differ": int(differ.sum())}
    if not differ.any():
        metrics.update({"topk_disagree": 0, "topk_ties": 0})
        return Verdict("topk_idx", "PASS", "", metrics, tol)
    dist = rows["dist"]
    bad_row = rows["hard"] | ((dist != -math.inf) & ~(dist <= tie_tol))
    ties = differ & ~bad_row
    metrics.update({"topk_disagree": int(bad_row.sum()), "topk_ties": int(ties.sum()),
                    "topk_noncausal": int(rows["noncausal"].sum())})
    if bad_row.any():
        f = int(bad_row.nonzero()[0])
        b, i, h = f // (TQ * H), f // H % TQ, f % H
        metrics["worst_index"] = [b, int(query_positions(case)[i]), h]

        def ids(row: torch.Tensor) -> list[int]:
            return sorted({int(x) for x in row.tolist() if 0 <= x < NS})
        metrics["first_disagreement"] = {"truth": ids(truth_idx[b, i, h]), "oracle": ids(out[b, i, h].detach().cpu().long())}
        return Verdict("topk_idx", "FAIL",
                       f"top-n selection differs beyond ties for {int(bad_row.sum())} of {B * TQ * H} (query, kv head) rows",
                       metrics, tol)
    return Verdict("topk_idx", "PASS", f"{int(ties.sum())} rows differ only by ties", metrics, tol)


def compare_topk(case: Case, out: torch.Tensor, truth_idx: torch.Tensor, importance: torch.Tensor,
                 tie_tol: float, rule: Rule) -> Verdict:
    """Set comparison of ``topk_idx`` with ties (see module docstring). ``importance`` ``[B,TQ,H,NS]``
    float64 (summed over the group)."""
    tol = rule_dict(rule)
    tol["tie_tol"] = tie_tol
    problem = _topk_shape_problem(out, tuple(truth_idx.shape))
    if problem:
        return Verdict("topk_idx", "FAIL", problem, {}, tol)
    rows = _topk_rows(case, out.detach().cpu().long(), truth_idx, importance, query_positions(case))
    return _topk_verdict(case, rows, out, truth_idx, importance.shape[-1], tie_tol, tol)


class _BranchCheck:
    """One forward branch of one oracle, fed window by window (``CaseTruth.windows``)."""

    def __init__(self, case: Case, branch: str, out: Any, shapes: dict[str, tuple[int, ...]], rule: Rule, dtype: str) -> None:
        self.case, self.branch, self.out, self.rule = case, branch, out, rule
        self.shape = shapes[branch]
        if branch == "topk_idx":
            self.tie = _TieTolerance(rule, dtype)
            self.problem = _topk_shape_problem(out, self.shape)
            self.rows: list[dict[str, torch.Tensor]] = []
            self.truth_idx: list[torch.Tensor] = []
            self.ns = shapes["importance"][-1]
        else:
            self.num = NumericCheck(case, branch, out, self.shape, rule, dtype)
            self.empty: Optional[list] = [0, 0, shapes["cmp_lse"]] if branch == "cmp_o" else None
            if self.empty is not None and not (isinstance(out, torch.Tensor) and tuple(out.shape[:3]) == tuple(self.empty[2])):
                self.empty[1] = None

    def feed(self, rows: tuple[slice, slice], truth: dict, base: dict, pos: torch.Tensor) -> None:
        br = self.branch
        if br == "topk_idx":
            self.tie.feed(truth["importance"], base["importance"])
            if self.problem is None:
                self.rows.append(_topk_rows(self.case, self.out[rows].detach().cpu().long(), truth["topk_idx"],
                                            truth["importance"], pos))
                self.truth_idx.append(truth["topk_idx"].reshape(-1, truth["topk_idx"].shape[-1]))
            return
        if self.num.early is None:
            inner = math.prod(self.shape[2:])
            offset = ((rows[0].start or 0) * self.shape[1] + (rows[1].start or 0)) * inner
            self.num.feed(self.out[rows].detach().cpu().reshape(-1), truth[br].reshape(-1),
                          base[br].detach().cpu().reshape(-1), offset)
        if self.empty is not None:
            n_empty, n_bad = _empty_cmp_counts(self.out[rows] if self.empty[1] is not None else None, truth["cmp_lse"])
            self.empty[0] += n_empty
            if self.empty[1] is not None:
                self.empty[1] += n_bad

    @property
    def needs_count(self) -> bool:
        return self.branch != "topk_idx" and self.num.needs_count

    def count(self, rows: tuple[slice, slice], truth: dict) -> None:
        """The second pass of a branch whose error is over its bound (``NumericCheck.count``)."""
        self.num.count(self.out[rows].detach().cpu().reshape(-1), truth[self.branch].reshape(-1))

    def verdict(self) -> Verdict:
        if self.branch == "topk_idx":
            tie_tol = self.tie.value()
            tol = rule_dict(self.rule)
            tol["tie_tol"] = tie_tol
            if self.problem is not None:
                return Verdict("topk_idx", "FAIL", self.problem, {}, tol)
            rows = {k: torch.cat([r[k] for r in self.rows]) for k in ("differ", "hard", "dist", "noncausal")}
            truth_idx = torch.cat(self.truth_idx).reshape(self.shape)
            return _topk_verdict(self.case, rows, self.out, truth_idx, self.ns, tie_tol, tol)
        v = self.num.verdict()
        return v if self.empty is None else _apply_empty_cmp(v, self.empty[0], self.empty[1])


@dataclass
class Job:
    """One oracle's reply to judge: its declared ``branches`` and ``outputs``."""

    oracle: str
    layer: str
    branches: tuple[str, ...]
    outputs: dict[str, Any]
    table: ToleranceTable
    needs_block_indices: bool = False


def _feed_all(ct: Union[CaseTruth, StreamedTruth], checks: list[_BranchCheck], idx: Optional[torch.Tensor] = None,
              count: bool = False) -> None:
    """One pass over the truth's windows (with the selection ``idx``), each window fed to every check (with
    ``count``: their second pass, ``_BranchCheck.count``)."""
    if not checks:
        return
    pos = query_positions(ct.case)
    for rows, truth, base in ct.windows(idx):
        for c in checks:
            if count:
                c.count(rows, truth)
            else:
                c.feed(rows, truth, base, pos[rows[1]])
        del truth, base


def judge_many(ct: Union[CaseTruth, StreamedTruth], jobs: list[Job]) -> list[list[Verdict]]:
    """``judge`` for several oracles' replies to the same case, with one pass over the truth's windows
    (``StreamedTruth``: one computation of the truth for all of them), another with an oracle's own
    selection when it differs from the truth's by ties only, and one more over the branches whose error is
    over their bound (to count the elements over it)."""
    case, dtype = ct.case, ct.case.dtype
    shapes = output_shapes(case, return_importance=True)
    keys = ct.keys
    plans = []
    for job in jobs:
        fixed: dict[str, Verdict] = {}
        checks: dict[str, _BranchCheck] = {}
        for br in job.branches:
            rule = job.table.rule_for(job.oracle, job.layer, br, dtype)
            if br in GRAD_BRANCHES:
                continue
            if br not in keys:
                fixed[br] = Verdict(br, "ERROR", f"no truth for branch {br!r}", {}, rule_dict(rule))
            elif br not in job.outputs:
                fixed[br] = Verdict(br, "ERROR", f"oracle {job.oracle!r} declared branch {br!r} but did not return it", {}, rule_dict(rule))
            else:
                checks[br] = _BranchCheck(case, br, job.outputs[br], shapes, rule, dtype)
        plans.append([job, fixed, checks, None])
    _feed_all(ct, [c for _, _, checks, _ in plans for c in checks.values()])
    for plan in plans:
        job, _, checks, _ = plan
        v = checks["topk_idx"].verdict() if "topk_idx" in checks else None
        # the oracle's own selection drives its slc_o only for block_indices="topk" cases
        if (v is not None and v.status == "PASS" and v.metrics.get("topk_ties", 0) > 0 and not job.needs_block_indices
                and case.block_indices == "topk"):
            idx = canonical_order(job.outputs["topk_idx"].detach().cpu().long())
            if idx.shape[-1] < case.top_n:
                idx = torch.cat([idx, idx.new_full(idx.shape[:-1] + (case.top_n - idx.shape[-1],), -1)], -1)
            plan[3] = idx
            again = {br: _BranchCheck(case, br, job.outputs[br], shapes, checks[br].rule, dtype)
                     for br in checks if br in SELECTION_DEPENDENT}
            _feed_all(ct, list(again.values()), idx)
            checks.update(again)
    _feed_all(ct, [c for _, _, checks, idx in plans for br, c in checks.items() if c.needs_count
                   and not (idx is not None and br in SELECTION_DEPENDENT)], count=True)
    for _, _, checks, idx in plans:
        if idx is not None:
            _feed_all(ct, [c for br, c in checks.items() if c.needs_count and br in SELECTION_DEPENDENT], idx, count=True)
    results = []
    for job, fixed, checks, alt_idx in plans:
        verdicts = {br: c.verdict() for br, c in checks.items()}
        if alt_idx is not None:
            for br in verdicts:
                if br in SELECTION_DEPENDENT:
                    verdicts[br].metrics["truth_with_oracle_indices"] = True
        out = []
        for br in sorted(job.branches, key=lambda b: b != "topk_idx"):
            if br in fixed:
                out.append(fixed[br])
            elif br in verdicts:
                out.append(verdicts[br])
            else:
                out.append(_judge_grad(ct, job, br, alt_idx))
        results.append(out)
    return results


def _judge_grad(ct: Union[CaseTruth, StreamedTruth], job: Job, br: str, alt_idx: Optional[torch.Tensor]) -> Verdict:
    case, dtype = ct.case, ct.case.dtype
    rule = job.table.rule_for(job.oracle, job.layer, br, dtype)
    if br not in job.outputs:
        return Verdict(br, "ERROR", f"oracle {job.oracle!r} declared branch {br!r} but did not return it", {}, rule_dict(rule))
    try:
        gt, gb = ct.grads() if alt_idx is None else ct.grads_with_indices(alt_idx)
    except Exception as e:  # noqa: BLE001 - reported per gradient cell
        return Verdict(br, "ERROR", f"gradient truth failed: {type(e).__name__}: {e}", {}, rule_dict(rule))
    if br not in gt:
        return Verdict(br, "ERROR", f"no gradient truth for {br!r} on this case", {}, rule_dict(rule))
    v = compare_numeric(case, br, job.outputs[br], gt[br], gb[br], rule, dtype)
    if alt_idx is not None:
        v.metrics["truth_with_oracle_indices"] = True
    return v


def judge(ct: Union[CaseTruth, StreamedTruth], oracle: str, layer: str, branches: tuple[str, ...], outputs: dict[str, Any],
          table: ToleranceTable, needs_block_indices: bool = False) -> list[Verdict]:
    """Verdicts for every declared branch that the case has (the caller SKIPs the others)."""
    return judge_many(ct, [Job(oracle, layer, tuple(branches), outputs, table, needs_block_indices)])[0]
