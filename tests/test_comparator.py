"""The comparator on constructed errors: at / under / over the bound, NaN, zeros, constants, empty
rows, and top-k ties (with slc_o judged against the truth recomputed with the oracle's indices)."""
from __future__ import annotations

import math

import pytest
import torch

from nsaconf.cases.model import Case
from nsaconf.harness.comparator import CaseTruth, check_empty_cmp_o, compare_numeric, compare_topk, judge
from nsaconf.harness.tolerance import ToleranceTable
from tests.comparator_util import TIE_CASE, near_tie_swap

CASE = Case(seq_len=64, heads_q=4, heads_kv=2, head_dim=16, block_size=16, top_n=3, window=8, dtype="bfloat16", seed=3)


def _rule(dtype="bfloat16", layer="kernel", branch="cmp_o"):
    return ToleranceTable().rule_for("x", layer, branch, dtype)


def _synthetic():
    """truth with exact zeros at two places: baseline error exactly 1e-3 at one, oracle error at the other."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, CASE.q_len, CASE.heads_q, 16, generator=g, dtype=torch.float64)
    t[0, 5, 1, 3] = 0.0
    t[0, 9, 2, 4] = 0.0
    base = t.clone()
    base[0, 9, 2, 4] = 1e-3
    return t, base


def _bound(t, base):
    rule = _rule()
    return rule.k * 1e-3 + rule.floor(t, torch.bfloat16)


@pytest.mark.parametrize("where,expect", [("at", "PASS"), ("under", "PASS"), ("over", "FAIL")])
def test_exactly_at_under_over_bound(where, expect):
    t, base = _synthetic()
    bound = _bound(t, base)
    val = {"at": bound, "under": math.nextafter(bound, 0.0), "over": math.nextafter(bound, math.inf)}[where]
    out = t.clone()
    out[0, 5, 1, 3] = val
    v = compare_numeric(CASE, "cmp_o", out, t, base, _rule(), "bfloat16")
    assert v.metrics["bound"] == pytest.approx(bound, rel=0, abs=0)
    assert v.metrics["max_abs_err"] == val
    assert v.status == expect, v.reason
    assert v.metrics["worst_index"] == [0, CASE.q_offset + 5, 1]


def test_nan_and_inf_fail_even_with_huge_tolerance():
    t, base = _synthetic()
    table = ToleranceTable()
    table.set("k", 1e9, "test")
    rule = table.rule_for("x", "kernel", "cmp_o", "bfloat16")
    for bad in (float("nan"), float("inf")):
        out = t.clone()
        out[0, 1, 0, 0] = bad
        v = compare_numeric(CASE, "cmp_o", out, t, base, rule, "bfloat16")
        assert v.status == "FAIL" and v.metrics["nonfinite"] == 1 and "NaN/Inf" in v.reason
        assert v.metrics["worst_index"] == [0, CASE.q_offset + 1, 0]


def test_zero_and_constant_outputs_never_pass():
    t, base = _synthetic()
    table = ToleranceTable()
    table.set("floor_add", 100.0, "test")  # a loose atol that zeros would pass (KernelBench#165)
    rule = table.rule_for("x", "kernel", "cmp_o", "bfloat16")
    for out in (torch.zeros_like(t), torch.full_like(t, float(t.mean()))):
        v = compare_numeric(CASE, "cmp_o", out, t, base, rule, "bfloat16")
        assert v.status == "FAIL" and "zero/constant-output guard" in v.reason
    v = compare_numeric(CASE, "cmp_o", t.clone(), t, base, rule, "bfloat16")
    assert v.status == "PASS"


def test_numeric_fail_reads_like_torch_testing():
    """Mismatch count over the bound, the greatest difference and its full index; no guard text when the
    bound is what failed (a large error also trips the guard)."""
    t, base = _synthetic()
    out = t.clone()
    out[0, 9, 2, 4] += 1.19
    out[0, 3, 1, 0] += 0.5
    out[0, 4, 0, 7] = 100.0  # the guard trips too: err >> max|truth|
    v = compare_numeric(CASE, "cmp_o", out, t, base, _rule(), "bfloat16")
    n = t.numel()
    assert v.status == "FAIL" and v.metrics["over_bound"] == 3 and v.metrics["constant_guard"]
    assert v.reason.startswith(f"Mismatched elements: 3 / {n} ({3 / n:.1%}); greatest absolute difference "
                               f"{100.0 - float(t[0, 4, 0, 7]):.3g} at (0, 4, 0, 7) (bound ")
    assert "zero/constant-output guard" not in v.reason


def test_shape_mismatch_fails():
    t, base = _synthetic()
    v = compare_numeric(CASE, "cmp_o", t[..., :8], t, base, _rule(), "bfloat16")
    assert v.status == "FAIL" and "shape" in v.reason


def test_empty_rows_judged_by_semantics():
    case = CASE.replace(cmp_mask="end_inclusive", dtype="float32")
    ct = CaseTruth.compute(case)
    empty = torch.isneginf(ct.truth["cmp_lse"])
    assert empty.any()  # the first l-1 positions see no complete block
    rule = _rule("float32", "kernel", "cmp_lse")
    lse = ct.truth["cmp_lse"].float()
    assert compare_numeric(case, "cmp_lse", lse, ct.truth["cmp_lse"], ct.baseline["cmp_lse"], rule, "float32").status == "PASS"
    lse0 = torch.where(empty, torch.zeros_like(lse), lse)  # an adapter that forgot to translate LSE 0 -> -inf
    v = compare_numeric(case, "cmp_lse", lse0, ct.truth["cmp_lse"], ct.baseline["cmp_lse"], rule, "float32")
    assert v.status == "FAIL" and v.metrics["empty_rows_bad"] == int(empty.sum()) and "-inf" in v.reason
    o = ct.truth["cmp_o"].float()
    o_bad = torch.where(empty[..., None], torch.full_like(o, float("nan")), o)
    v = compare_numeric(case, "cmp_o", o_bad, ct.truth["cmp_o"], ct.baseline["cmp_o"], _rule("float32"), "float32")
    v = check_empty_cmp_o(o_bad, ct.truth["cmp_lse"], v)
    assert v.status == "FAIL" and v.metrics["empty_rows_bad"] == int(empty.sum())
    v = compare_numeric(case, "cmp_o", o, ct.truth["cmp_o"], ct.baseline["cmp_o"], _rule("float32"), "float32")
    assert check_empty_cmp_o(o, ct.truth["cmp_lse"], v).status == "PASS"


def _tie_case():
    """A case and importance with an exact tie between blocks 1 and 2 for query row 63 (p = 63)."""
    case = Case(seq_len=64, heads_q=2, heads_kv=1, head_dim=8, block_size=16, top_n=3, window=0,
                forced_blocks="none", dtype="float32", seed=1)
    imp = torch.zeros(1, 64, 1, 4, dtype=torch.float64)
    imp[0, 63, 0] = torch.tensor([0.5, 0.3, 0.3, 0.9])
    truth = torch.full((1, 64, 1, 3), -1, dtype=torch.long)
    truth[0, 63, 0] = torch.tensor([0, 1, 3])
    return case, imp, truth


def test_topk_tie_passes_and_non_tie_fails():
    case, imp, truth = _tie_case()
    rule = _rule("float32", "kernel", "topk_idx")
    assert compare_topk(case, truth.clone(), truth, imp, 1e-6, rule).status == "PASS"
    tie = truth.clone()
    tie[0, 63, 0] = torch.tensor([3, 0, 2])  # order ignored, block 2 ties block 1
    v = compare_topk(case, tie, truth, imp, 1e-6, rule)
    assert v.status == "PASS" and v.metrics["topk_ties"] == 1
    worse = truth.clone()
    worse[0, 63, 0] = torch.tensor([1, 2, 3])  # drops block 0 (0.5): not a tie
    v = compare_topk(case, worse, truth, imp, 1e-6, rule)
    assert v.status == "FAIL" and v.metrics["topk_disagree"] == 1 and "1 of 64" in v.reason
    imp2 = imp.clone()
    imp2[0, 63, 0, 2] = 0.3 + 1e-3  # not within the tie tolerance any more
    assert compare_topk(case, tie, truth, imp2, 1e-6, rule).status == "FAIL"
    assert compare_topk(case, tie, truth, imp2, 1e-2, rule).status == "PASS"


def test_topk_noncausal_block_is_never_a_tie():
    case, imp, truth = _tie_case()
    rule = _rule("float32", "kernel", "topk_idx")
    bad = truth.clone()
    bad[0, 10, 0, 0] = 1  # p = 10 cannot select block 1 (starts at 16)
    v = compare_topk(case, bad, truth, imp, 1e9, rule)
    assert v.status == "FAIL" and v.metrics["topk_noncausal"] == 1


def test_tie_break_judges_slc_o_with_oracle_indices():
    """An oracle that breaks a near-tie the other way: topk PASS (tie), slc_o PASS against the truth
    recomputed with its indices; the same slc_o against the original truth would FAIL."""
    ct = CaseTruth.compute(TIE_CASE)
    # swap the n-th selected block of the last query for the best unselected candidate, then declare a
    # tie tolerance wide enough to cover that gap
    new, gap = near_tie_swap(ct)
    table = ToleranceTable()
    table.set("topk_idx.floor_add", gap * 1.01, "test")
    t2, b2 = ct.with_indices(new)
    outputs = {"topk_idx": new, "slc_o": t2["slc_o"].float()}
    verdicts = {v.branch: v for v in judge(ct, "tiebreak", "e2e", ("topk_idx", "slc_o"), outputs, table)}
    assert verdicts["topk_idx"].status == "PASS" and verdicts["topk_idx"].metrics["topk_ties"] >= 1
    assert verdicts["slc_o"].status == "PASS", verdicts["slc_o"].reason
    assert verdicts["slc_o"].metrics["truth_with_oracle_indices"] is True
    strict = {v.branch: v for v in judge(ct, "tiebreak", "e2e", ("topk_idx", "slc_o"), outputs, ToleranceTable())}
    assert strict["topk_idx"].status == "FAIL"
    assert strict["slc_o"].status == "FAIL"


def test_missing_branch_is_error():
    ct = CaseTruth.compute(CASE.replace(dtype="float32"))
    vs = judge(ct, "x", "kernel", ("cmp_o",), {}, ToleranceTable())
    assert vs[0].status == "ERROR" and "did not return" in vs[0].reason


@pytest.mark.parametrize("branch", ["cmp_o", "cmp_lse"])
def test_chunked_comparison_gives_the_whole_tensor_verdict(branch, monkeypatch):
    """``compare_numeric`` in steps of 7 elements: the same metrics as in one step (sums of squares to
    rounding), with NaN/Inf, -inf rows, exact zeros and the worst element in a later step."""
    from nsaconf.harness import comparator

    g = torch.Generator().manual_seed(4)
    t = torch.randn(1, 9, 4, 5, generator=g, dtype=torch.float64)
    if branch == "cmp_lse":
        t = t[..., 0]
        t[0, :2] = -math.inf
    base = t + 1e-3 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    out = (t + 2e-3 * torch.randn(t.shape, generator=g, dtype=torch.float64)).float()
    out.view(-1)[30] = float("nan")
    out.view(-1)[33] = 5.0
    rule = _rule("float32", "kernel", branch)
    whole = compare_numeric(CASE, branch, out, t, base, rule, "float32")
    monkeypatch.setattr(comparator, "COMPARE_CHUNK", 7)
    steps = compare_numeric(CASE, branch, out, t, base, rule, "float32")
    assert (steps.status, steps.reason, steps.tolerance) == (whole.status, whole.reason, whole.tolerance)
    assert steps.metrics.pop("rel_rms") == pytest.approx(whole.metrics.pop("rel_rms"), rel=1e-12)
    assert steps.metrics == whole.metrics and whole.metrics["nonfinite"] == 1
    assert whole.error_map is not None and steps.error_map == whole.error_map


def test_error_map_shows_where_a_window_one_key_too_long_errs():
    """``error_map`` of a FAIL: err/bound per (query-position bin, head); a window of w+1 keys errs from
    p = w on (a bin edge, as w is a power of two), never before. A PASS carries none."""
    from nsaconf.oracles.reference import nsa_reference

    case = CASE.replace(seq_len=100, q_len=100, window=16, dtype="float32", heads_q=4, heads_kv=1)
    ct = CaseTruth.compute(case)
    x = ct.inputs
    long = nsa_reference(case.replace(window=17), x, dtype=None)["swa_o"]
    rule = _rule("float32", "kernel", "swa_o")
    v = compare_numeric(case, "swa_o", long, ct.truth["swa_o"], ct.baseline["swa_o"], rule, "float32")
    assert v.status == "FAIL"
    m = v.error_map
    assert (m["rows"], m["cols"]) == ("query position p", "head") and "col_edges" not in m
    edges, vals = m["row_edges"], m["values"]
    assert edges[0] == 0 and edges[-1] == 100 and len(vals) == len(edges) - 1 <= 32 and 16 in edges
    assert all(len(row) == case.heads_q for row in vals)
    for lo, row in zip(edges, vals):
        assert (min(row) > 1) if lo >= 16 else (max(row) <= 1), (lo, row)
    assert max(max(r) for r in vals) == pytest.approx(v.metrics["err_ratio"], rel=1e-2)
    ok = compare_numeric(case, "swa_o", ct.baseline["swa_o"], ct.truth["swa_o"], ct.baseline["swa_o"], rule, "float32")
    assert ok.status == "PASS" and ok.error_map is None


def test_error_map_bins_heads_and_names_key_rows():
    """More than 16 heads are binned (``col_edges``); dk/dv rows are key positions; NaN counts as inf."""
    case = CASE.replace(seq_len=40, q_len=40, heads_q=32, heads_kv=32, dtype="float32")
    t = torch.zeros(1, 40, 32, 8, dtype=torch.float64)
    t[..., 0] = 1.0
    out = t.clone().float()
    out[0, 7, 30, 2] = float("nan")
    out[0, 20, 3, 1] = 0.5
    v = compare_numeric(case, "dk", out, t, t, _rule("float32", "kernel", "dk"), "float32")
    m = v.error_map
    assert v.status == "FAIL" and m["rows"] == "key position s"
    assert m["col_edges"] == list(range(0, 33, 2)) and len(m["values"][0]) == 16
    flat = {(r, c): val for r, row in enumerate(m["values"]) for c, val in enumerate(row)}
    bad = {k for k, val in flat.items() if val != 0}
    row_of = lambda p: max(i for i, e in enumerate(m["row_edges"][:-1]) if e <= p)  # noqa: E731
    assert bad == {(row_of(7), 15), (row_of(20), 1)}
    assert flat[(row_of(7), 15)] == math.inf and flat[(row_of(20), 1)] > 1
