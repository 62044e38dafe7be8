"""The ``group_importance`` and ``gates`` convention fields: rules, case ids, the two references on hand-worked
numbers, and every registered oracle SKIPping the values it does not compute.

Group hand case (one kv head, G = 2 query heads, D = 2, DV = 1, l = d = l' = 1, scale 1, top-1, nothing
forced): compressed block c is key c; the query at p = 2 sees blocks 0, 1, 2; q_A = (1, 0), q_B = (0, 1) and
k_0 = (ln 6, -ln 6), k_1 = (0, ln 2), k_2 = (0, 0) give the logits a = (ln 6, 0, 0), b = (-ln 6, ln 2, 0):
  sum_probs:   p_A = (6, 1, 1)/8, p_B = (1/6, 2, 1)/(19/6) = (1, 12, 6)/19
               imp = (6/8 + 1/19, 1/8 + 12/19, 1/8 + 6/19) -> block 0
  mean_logits: mean = (0, ln2/2, 0) -> imp = (1, sqrt 2, 1)/(2 + sqrt 2) -> block 1
With v = (10, 20, 30) the one-key selection gives slc_o = 10 (sum_probs) or 20 (mean_logits) for both heads.
"""
import math

import pytest
import torch

from nsaconf.cases import vocabulary as V
from nsaconf.cases.conventions import GATE_RULES, GROUP_IMPORTANCE_RULES, gate_sigmoid, masked_softmax, mean_logits, sum_probs
from nsaconf.cases.generator import profile_cases
from nsaconf.cases.model import Case, CaseError
from nsaconf.cases.tensors import Inputs, materialize
from nsaconf.oracles.base import CONVENTION_BRANCHES, convention_support, registry
from nsaconf.oracles.dense import nsa_dense
from nsaconf.oracles.reference import nsa_reference, nsa_reference_grads

LN2, LN3, LN6 = math.log(2.0), math.log(3.0), math.log(6.0)
F64 = torch.float64


def test_rule_functions_by_hand():
    logits = torch.tensor([[LN6, 0.0, 0.0], [-LN6, LN2, 0.0]], dtype=F64)  # [G=2, NC=3]
    vis = torch.tensor([True, True, True])
    prob = masked_softmax(logits, vis)
    torch.testing.assert_close(prob[0], torch.tensor([6, 1, 1], dtype=F64) / 8)
    torch.testing.assert_close(prob[1], torch.tensor([1, 12, 6], dtype=F64) / 19)
    torch.testing.assert_close(sum_probs(prob, logits, vis), torch.tensor([6 / 8 + 1 / 19, 1 / 8 + 12 / 19, 1 / 8 + 6 / 19], dtype=F64))
    r2 = math.sqrt(2.0)
    torch.testing.assert_close(mean_logits(prob, logits, vis), torch.tensor([1, r2, 1], dtype=F64) / (2 + r2))
    # invisible blocks get 0 whatever their logit; a row with no visible block is all 0 (not NaN)
    vis = torch.tensor([False, True, True])
    torch.testing.assert_close(mean_logits(None, logits, vis), torch.tensor([0, r2, 1], dtype=F64) / (1 + r2))
    assert mean_logits(None, torch.full((2, 3), float("-inf"), dtype=F64), torch.zeros(3, dtype=torch.bool)).tolist() == [0, 0, 0]
    # gates: sigmoid(ln 3) = 3/4, sigmoid(0) = 1/2, sigmoid(-ln 3) = 1/4; raw is the identity
    g = torch.tensor([LN3, 0.0, -LN3], dtype=F64)
    torch.testing.assert_close(gate_sigmoid(g), torch.tensor([0.75, 0.5, 0.25], dtype=F64))
    assert GATE_RULES["raw"](g) is g
    assert tuple(GROUP_IMPORTANCE_RULES) == V.GROUP_IMPORTANCE and tuple(GATE_RULES) == V.GATES


def group_case(**kw) -> Case:
    base = dict(seq_len=3, q_len=1, heads_q=2, heads_kv=1, head_dim=2, head_dim_v=1, block_size=1, top_n=1,
                window=0, forced_blocks="none", scale=1.0, dtype="float64")
    base.update(kw)
    return Case(**base)


def group_inputs(tq: int = 1) -> Inputs:
    k = torch.tensor([[LN6, -LN6], [0.0, LN2], [0.0, 0.0]], dtype=F64).view(1, 3, 1, 2)
    v = torch.tensor([10.0, 20.0, 30.0], dtype=F64).view(1, 3, 1, 1)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64).view(1, 1, 2, 2).expand(1, tq, 2, 2).contiguous()
    g = torch.ones(1, tq, 2, dtype=F64)
    return Inputs(q=q, k=k, v=v, g_cmp=g, g_slc=g, g_swa=g)


@pytest.mark.parametrize("impl", [nsa_reference, nsa_dense])
@pytest.mark.parametrize("rule, block, slc", [("sum_probs", 0, 10.0), ("mean_logits", 1, 20.0)])
def test_group_importance_by_hand(impl, rule, block, slc):
    case = group_case(group_importance=rule)
    out = impl(case, group_inputs())
    assert out["topk_idx"].flatten().tolist() == [block]
    torch.testing.assert_close(out["slc_o"].flatten(), torch.tensor([slc, slc], dtype=F64))
    # the compression branch itself does not depend on the rule: head A's o_cmp = (6*10 + 20 + 30)/8
    assert out["cmp_o"].flatten()[0].item() == pytest.approx(110 / 8, abs=1e-12)


def test_group_importance_values_and_empty_rows_by_hand():
    r2 = math.sqrt(2.0)
    out = nsa_reference(group_case(group_importance="mean_logits"), group_inputs(), return_importance=True)
    torch.testing.assert_close(out["importance"].flatten(), torch.tensor([1, r2, 1], dtype=F64) / (2 + r2))
    out = nsa_reference(group_case(), group_inputs(), return_importance=True)
    torch.testing.assert_close(out["importance"].flatten(), torch.tensor([6 / 8 + 1 / 19, 1 / 8 + 12 / 19, 1 / 8 + 6 / 19], dtype=F64))
    # end_exclusive, all three positions: p = 0 sees no block (importance 0, no selection, slc_o 0);
    # p = 1 sees block 0 only (importance 1 under mean_logits); p = 2 sees blocks 0, 1 (mean logits 0, ln2/2)
    case = group_case(group_importance="mean_logits", q_len=3, cmp_mask="end_exclusive")
    x = group_inputs(3)
    for impl in (nsa_reference, nsa_dense):
        out = impl(case, x)
        assert out["topk_idx"].flatten().tolist() == [-1, 0, 1]
        assert out["slc_o"][0, :, 0, 0].tolist() == [0.0, 10.0, 20.0]
    imp = nsa_reference(case, x, return_importance=True)["importance"][0, :, 0]
    torch.testing.assert_close(imp, torch.tensor([[0, 0, 0], [1, 0, 0], [1 / (1 + r2), r2 / (1 + r2), 0]], dtype=F64))


@pytest.mark.parametrize("impl", [nsa_reference, nsa_dense])
def test_sigmoid_gates_by_hand(impl):
    # the hand case of test_reference_hand: at p = 3 o_cmp = 5.2, o_slc = 6, o_swa = 6
    from tests.test_reference_hand import hand_case, hand_inputs

    case = hand_case(gates="sigmoid")
    x = hand_inputs(case)
    g = lambda v: torch.full((1, 4, 1), v, dtype=F64)  # noqa: E731
    x = Inputs(q=x.q, k=x.k, v=x.v, g_cmp=g(LN3), g_slc=g(0.0), g_swa=g(-LN3))
    out = impl(case, x)
    assert out["o"].flatten()[3].item() == pytest.approx(0.75 * 5.2 + 0.5 * 6.0 + 0.25 * 6.0, abs=1e-12)
    # raw reads the same numbers as multipliers
    raw = impl(hand_case(), x)
    assert raw["o"].flatten()[3].item() == pytest.approx(LN3 * 5.2 + 0.0 * 6.0 - LN3 * 6.0, abs=1e-12)
    for b in ("cmp_o", "slc_o", "swa_o", "topk_idx"):
        assert torch.equal(out[b], raw[b])


def test_sigmoid_gate_gradients_are_the_chain_rule():
    # dL/dg = sum(o_branch * dO) * sigmoid'(g) under sigmoid, sum(o_branch * dO) under raw
    case = Case(seq_len=40, heads_q=4, heads_kv=2, head_dim=8, block_size=8, top_n=3, window=8, dtype="float64")
    x = materialize(case, "cpu")
    raw = nsa_reference_grads(case, x)
    sig = nsa_reference_grads(case.replace(gates="sigmoid"), x)
    for b, f in (("dg_cmp", "g_cmp"), ("dg_slc", "g_slc"), ("dg_swa", "g_swa")):
        s = torch.sigmoid(getattr(x, f))
        torch.testing.assert_close(sig[b], raw[b] * s * (1 - s))
    assert not torch.allclose(sig["dq"], raw["dq"])


@pytest.mark.parametrize("kw", [dict(group_importance="mean_logits"), dict(gates="sigmoid"),
                                dict(group_importance="mean_logits", gates="sigmoid", q_len=9, cmp_block=32, cmp_stride=16,
                                     block_size=32, cu_seqlens=None)])
def test_reference_and_dense_agree(kw):
    case = Case(**{**dict(seq_len=200, heads_q=8, heads_kv=2, head_dim=16, block_size=16, top_n=4, window=16,
                          forced_blocks="none", dtype="float32"), **kw})
    x = materialize(case, "cpu")
    r, d = nsa_reference(case, x), nsa_dense(case, x)
    assert torch.equal(r["topk_idx"], d["topk_idx"])
    for b in ("cmp_o", "slc_o", "swa_o", "o"):
        torch.testing.assert_close(r[b], d[b], rtol=1e-12, atol=1e-12)


def test_mean_logits_changes_the_selection():
    # the field is not a no-op on the inputs the profiles draw: G = 16, T = 300 picks other blocks on many rows
    case = Case(seq_len=300, heads_q=16, heads_kv=1, head_dim=16, block_size=16, top_n=4, forced_blocks="none")
    x = materialize(case, "cpu")
    a = nsa_reference(case, x)["topk_idx"]
    b = nsa_reference(case.replace(group_importance="mean_logits"), x)["topk_idx"]
    assert (a != b).any(-1).float().mean() > 0.2


def test_case_ids_and_validation():
    # the defaults keep the ids of cases written before the fields existed
    assert Case().id == "fp32-B1-T128-TQ128-HQ16-H1-D32-DV32-l16d16ls16-n4-w0-end_inclusive-s0"
    assert Case(seq_len=100, block_indices="random", scale=0.5, seed=3).id == \
        "fp32-B1-T100-TQ100-HQ16-H1-D32-DV32-l16d16ls16-n4-w0-end_inclusive-rand-sc0.5-s3"
    for c in profile_cases("gpu") + profile_cases("paper"):
        assert "-gmean" not in c.id and "-gsig" not in c.id
    c = Case(group_importance="mean_logits", gates="sigmoid", block_indices="random", scale=0.5)
    assert c.id == "fp32-B1-T128-TQ128-HQ16-H1-D32-DV32-l16d16ls16-n4-w0-end_inclusive-rand-gmean-gsig-sc0.5-s0"
    assert Case.from_id(c.id) == c and Case.from_json(c.to_json()) == c
    assert Case.from_id(Case(gates="sigmoid").id).gates == "sigmoid"
    assert Case.from_dict({"seq_len": 64}).group_importance == "sum_probs"  # old case files still load
    for field, bad in (("group_importance", "mean_probs"), ("gates", "softmax"), ("gates", 1)):
        with pytest.raises(CaseError, match=f"field '{field}' must be one of"):
            Case(**{field: bad})


def test_ci_profile_covers_the_new_values():
    cs = profile_cases("ci")
    assert {c.group_importance for c in cs} == set(V.GROUP_IMPORTANCE)
    assert {c.gates for c in cs} == set(V.GATES)
    # each non-default value meets G > 1 (the group rule), both compression layouts and a window
    for field, value in (("group_importance", "mean_logits"), ("gates", "sigmoid")):
        hit = [c for c in cs if getattr(c, field) == value]
        assert any(c.group > 1 for c in hit) and any(c.window > 0 for c in hit)
        assert any(c.cmp_block == c.cmp_stride == c.block_size for c in hit)
        assert any(not c.cmp_block == c.cmp_stride == c.block_size for c in hit)


NON_DEFAULT = [(f, v) for f, vals in (("group_importance", V.GROUP_IMPORTANCE), ("gates", V.GATES))
               for v in vals if v != V.CONVENTION_DEFAULTS[f]]


@pytest.mark.parametrize("field, value", NON_DEFAULT)
def test_every_registered_oracle_skips_what_it_does_not_compute(field, value):
    case = Case(seq_len=64, heads_q=16, heads_kv=1, head_dim=16, window=16, **{field: value})
    for name, cls in sorted(registry().items()):
        o = cls()
        if value in o.supported_conventions.get(field, ()):
            continue
        exempt = field == "group_importance" and o.needs_block_indices  # given the truth's blocks
        for b in o.branches:
            why = convention_support(o, case, b)
            if b in CONVENTION_BRANCHES[field] and not exempt:
                assert why and field in why and value in why, (name, b)
            else:
                assert why is None, (name, b)
        whole = convention_support(o, case)
        assert (whole is not None) == (not exempt and set(o.branches) <= set(CONVENTION_BRANCHES[field])), name
        if whole is not None and o.availability() is None and case.dtype in o.dtypes and "cpu" in o.devices:
            assert o.check_support(case, "cpu") == whole, name
    # the in-house references compute every value
    for name in ("reference", "dense"):
        assert value in registry()[name].supported_conventions[field]


def test_the_runner_skips_unsupported_branches_with_the_reason():
    # fla_naive computes raw gates: under sigmoid its o and gradients SKIP, its other branches are judged
    from nsaconf.harness.runner import evaluate

    case = Case(seq_len=48, heads_q=16, heads_kv=1, head_dim=16, block_size=16, top_n=3, window=8, gates="sigmoid")
    cells = {(c.oracle, c.branch): c for c in evaluate(case, ["reference", "fla_naive"])}
    bad = [(k, c.status, c.reason) for k, c in cells.items() if k[0] == "reference" and c.status != "PASS"]
    assert not bad
    fla = {b: c for (o, b), c in cells.items() if o == "fla_naive"}
    why = registry()["fla_naive"]().availability()
    if why:
        pytest.skip(f"fla_naive is not usable here: {why}")
    for b, c in fla.items():
        if b in CONVENTION_BRANCHES["gates"]:
            assert c.status == "SKIP" and "gates raw, not the case's sigmoid" in c.reason, (b, c.status, c.reason)
        else:
            assert c.status == "PASS", (b, c.status, c.reason)
