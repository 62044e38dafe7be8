"""The engine judges gradient branches against the float64 gradient truth (``CaseTruth.grads``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import materialize
from nsaconf.harness.comparator import CaseTruth
from nsaconf.harness.runner import branch_skip_reason, evaluate
from nsaconf.oracles.base import GRAD_BRANCHES, load_plugin
from nsaconf.oracles.reference import grad_truth_skip_reason, nsa_reference_grads



@pytest.fixture(scope="module")
def grad_bugs() -> None:
    """The planted gradient bugs, registered only for the tests that use them (not at collection)."""
    load_plugin(str(Path(__file__).parent / "plugins" / "grad_bugs.py"))

FLA_CASE = Case(batch=1, seq_len=48, q_len=7, heads_q=16, heads_kv=1, head_dim=16, dtype="bfloat16", block_size=8, top_n=3, window=8)
SMALL = [
    Case(batch=2, seq_len=40, q_len=40, heads_q=4, heads_kv=2, head_dim=16, dtype="float16", block_size=8, cmp_block=8,
         cmp_stride=4, top_n=3, window=6),
    Case(batch=1, seq_len=36, heads_q=2, heads_kv=1, head_dim=8, dtype="float32", block_size=4, top_n=3, window=0,
         cu_seqlens=(0, 14, 36), block_indices="random"),
]


def _cells(case, oracles, cache=None):
    return {(r.oracle, r.branch): r for r in evaluate(case, oracles, truth_cache=cache)}


@pytest.mark.parametrize("case", SMALL + [FLA_CASE], ids=lambda c: c.id)
def test_reference_gradients_pass_and_are_measured(case):
    cells = _cells(case, ["reference"])
    for br in GRAD_BRANCHES:
        r = cells[("reference", br)]
        if br == "dg_swa" and case.window == 0:
            assert r.status == "SKIP" and "window=0" in r.reason
            continue
        assert r.status == "PASS", (br, r.reason)
        assert r.metrics["max_abs_truth"] > 0 and r.metrics["bound"] > 0
        if case.dtype != "float32":  # reference layer fp32 uses the tight rule; fp16/bf16 the FA rule
            assert r.tolerance["k"] == 3.0 and r.metrics["baseline_err"] > 0


def test_fla_naive_gradients_pass():
    pytest.importorskip("fla", reason="fla-core is not installed (pip install -e .)")
    cells = _cells(FLA_CASE, ["fla_naive"])
    for br in GRAD_BRANCHES:
        assert cells[("fla_naive", br)].status == "PASS", (br, cells[("fla_naive", br)].reason)


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.id)
def test_planted_gradient_bugs_fail_on_their_branch(case, grad_bugs):
    cache: dict = {}
    cells = _cells(case, ["bug_grad_dq_scale", "bug_grad_dv", "bug_grad_cotangent", "bug_grad_missing"], cache)
    live = [b for b in GRAD_BRANCHES if b != "dg_swa" or case.window > 0]
    assert cells[("bug_grad_dq_scale", "dq")].status == "FAIL"
    assert cells[("bug_grad_dv", "dv")].status == "FAIL"
    for br in live:
        if br != "dq":
            assert cells[("bug_grad_dq_scale", br)].status == "PASS", br
        if br != "dv":
            assert cells[("bug_grad_dv", br)].status == "PASS", br
        assert cells[("bug_grad_cotangent", br)].status == "FAIL", br
    r = cells[("bug_grad_missing", "dk")]
    assert r.status == "ERROR" and "did not return" in r.reason
    assert cells[("bug_grad_missing", "dq")].status == "PASS"


def test_gradient_truth_is_lazy_and_follows_the_selection():
    case = SMALL[0]
    ct = CaseTruth.compute(case)
    assert ct._grads is None  # forward-only runs never pay for gradients
    t, b = ct.grads()
    assert t["dq"].dtype == torch.float64 and b["dq"].dtype == torch.float16
    assert ct.grads()[0] is t  # computed once
    idx = ct.given_indices.clone()
    idx[..., -1] = -1  # drop one selected block everywhere
    t2, _ = ct.grads_with_indices(idx)
    assert not torch.allclose(t2["dk"], t["dk"])
    assert torch.equal(t2["dg_cmp"], t["dg_cmp"])  # the compression branch does not depend on the selection
    ref = nsa_reference_grads(case, materialize(case), block_indices=idx)
    assert torch.equal(ref["dk"], t2["dk"])


def test_large_cases_skip_gradients_with_a_reason():
    big = Case(batch=1, seq_len=8192, heads_q=16, heads_kv=1, head_dim=128, dtype="bfloat16", block_size=64, top_n=16, window=512)
    why = grad_truth_skip_reason(big)
    assert why and "gradient truth is limited" in why
    assert branch_skip_reason(big, "dq") == why
    assert grad_truth_skip_reason(SMALL[0]) is None and branch_skip_reason(SMALL[0], "dq") is None
    assert "window=0" in branch_skip_reason(SMALL[1], "dg_swa")


def test_tie_only_selection_difference_rederives_the_gradient_truth():
    """An e2e oracle that picks a tied block instead of the truth's n-th block: its gradients are judged
    against the gradient truth recomputed with its own indices (PASS); the same swap without a tie FAILs."""
    from nsaconf.harness.comparator import judge
    from nsaconf.harness.tolerance import ToleranceTable
    from nsaconf.oracles.reference import nsa_reference

    case = Case(batch=1, seq_len=40, q_len=4, heads_q=2, heads_kv=1, head_dim=8, dtype="float16", block_size=4,
                top_n=3, forced_blocks="none")
    ct = CaseTruth.compute(case)
    idx = ct.given_indices.clone()
    b, i, h = 0, case.q_len - 1, 0
    imp = ct.truth["importance"][b, i, h]
    chosen = [int(j) for j in idx[b, i, h] if j >= 0]
    lowest = min(chosen, key=lambda j: float(imp[j]))
    other = max((j for j in range(imp.shape[0]) if j not in chosen and imp[j] > 0), key=lambda j: float(imp[j]))
    swapped = sorted([j for j in chosen if j != lowest] + [other])
    oidx = idx.clone()
    oidx[b, i, h] = torch.tensor(swapped)
    x = ct.inputs
    outputs = {**nsa_reference(case, x, dtype=None, block_indices=oidx),
               **nsa_reference_grads(case, x, dtype=None, block_indices=oidx), "topk_idx": oidx}
    branches = ("topk_idx", "slc_o", "dq", "dk", "dv", "dg_slc")
    no_tie = {v.branch: v for v in judge(ct, "e2e_swap", "e2e", branches, outputs, ToleranceTable())}
    assert no_tie["topk_idx"].status == "FAIL" and no_tie["dk"].status == "FAIL"
    ct.truth["importance"][b, i, h, other] = imp[lowest]  # make the swap a tie
    tie = {v.branch: v for v in judge(ct, "e2e_swap", "e2e", branches, outputs, ToleranceTable())}
    assert tie["topk_idx"].status == "PASS" and tie["topk_idx"].metrics["topk_ties"] == 1
    for br in branches[1:]:
        assert tie[br].status == "PASS", (br, tie[br].reason)
    assert tie["dk"].metrics.get("truth_with_oracle_indices") is True


def test_oracle_can_decline_a_branch_per_case():
    """``Oracle.branch_supports`` turns a declared branch into SKIP cells with the oracle's reason, and
    the oracle's other branches are still judged (fla_parallel declines gradients for TQ < T)."""
    from nsaconf.oracles.base import register_oracle
    from nsaconf.oracles.reference_oracles import ReferenceOracle

    @register_oracle
    class NoGradsWhenDecoding(ReferenceOracle):
        name = "test_no_grads_when_decoding"

        def branch_supports(self, case, branch):
            return "no gradients for TQ < T here" if branch in GRAD_BRANCHES and case.q_len < case.seq_len else None

    cells = _cells(FLA_CASE, ["test_no_grads_when_decoding"])
    for br in GRAD_BRANCHES:
        assert cells[("test_no_grads_when_decoding", br)].status == "SKIP"
        assert cells[("test_no_grads_when_decoding", br)].reason == "no gradients for TQ < T here"
    assert cells[("test_no_grads_when_decoding", "o")].status == "PASS"
    full = _cells(SMALL[0], ["test_no_grads_when_decoding"])
    assert full[("test_no_grads_when_decoding", "dq")].status == "PASS"
    from nsaconf.oracles.fla import FlaParallel

    assert "TQ < T" in FlaParallel().branch_supports(FLA_CASE, "dk") and FlaParallel().branch_supports(FLA_CASE, "o") is None
