"""The reference against the brute-force dense twin, and its properties (Hypothesis)."""
import json

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nsaconf.cases.conventions import CAUSAL_CMP_MASKS
from nsaconf.cases.model import Case, CaseError
from nsaconf.cases.tensors import Inputs, materialize
from nsaconf.oracles.dense import nsa_dense
from nsaconf.oracles.reference import nsa_reference
from tests.strategies import small_cases

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BRANCHES = ("cmp_o", "cmp_lse", "slc_o", "swa_o", "o")


def assert_same(a: dict, b: dict, atol: float = 1e-10) -> None:
    assert set(a) == set(b) - {"importance"} or set(b) == set(a) - {"importance"} or set(a) == set(b)
    for name in set(a) & set(b):
        x, y = a[name], b[name]
        if name == "topk_idx":
            assert torch.equal(x, y), f"topk_idx differs at {(x != y).nonzero()[:5].tolist()}"
        elif name != "importance":
            assert torch.equal(torch.isfinite(x), torch.isfinite(y)), name
            assert torch.equal(torch.isneginf(x), torch.isneginf(y)), name
            fin = torch.isfinite(y)
            err = (x[fin] - y[fin]).abs().max().item() if fin.any() else 0.0
            assert err <= atol, f"{name}: max abs err {err}"


@SETTINGS
@given(small_cases())
@example(Case(seq_len=5, heads_q=2, heads_kv=1, head_dim=4, block_size=8, top_n=1, forced_blocks="none", dtype="float64"))  # T < l'
@example(Case(seq_len=37, q_len=5, heads_q=3, heads_kv=1, head_dim=4, block_size=8, cmp_block=4, cmp_stride=2,
              top_n=3, window=5, dtype="float64", cmp_mask="current_block"))  # decode, l != d != l'
def test_reference_matches_brute_force(case):
    x = materialize(case)
    assert_same(nsa_reference(case, x), nsa_dense(case, x))


@SETTINGS
@given(small_cases(), st.integers(1, 9))
def test_chunk_size_does_not_change_results(case, chunk):
    x = materialize(case)
    assert_same(nsa_reference(case, x, chunk=chunk), nsa_reference(case, x, chunk=10_000), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(small_cases(varlen=False, max_t=64), st.data())
def test_causal_conventions_never_see_the_future(case, data):
    case = case.replace(cmp_mask=data.draw(st.sampled_from(CAUSAL_CMP_MASKS)))
    x = materialize(case)
    p0 = data.draw(st.integers(case.q_offset, case.seq_len - 1))  # last position that must not change
    y = perturb_keys_after(x, p0)
    a, b = nsa_reference(case, x), nsa_reference(case, y)
    rows = slice(0, p0 - case.q_offset + 1)
    for name in ("cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o"):
        if name in a:
            assert torch.equal(a[name][:, rows], b[name][:, rows]), f"{name} at p <= {p0} depends on keys > {p0}"


@pytest.mark.parametrize("cmp_mask", ["current_block", "anti_causal"])
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_leaky_conventions_do_see_the_future(cmp_mask, seed):
    case = Case(seq_len=64, heads_q=2, heads_kv=1, head_dim=8, block_size=8, cmp_block=8, cmp_stride=4,
                dtype="float64", cmp_mask=cmp_mask, seed=seed)
    x = materialize(case)
    p0 = 41  # mid-block: block c=10 covers 40..47 and is visible to p=41 under both conventions
    a, b = nsa_reference(case, x), nsa_reference(case, perturb_keys_after(x, p0))
    assert not torch.equal(a["cmp_o"][:, : p0 + 1], b["cmp_o"][:, : p0 + 1])


def perturb_keys_after(x: Inputs, p0: int) -> Inputs:
    k, v = x.k.clone(), x.v.clone()
    k[:, p0 + 1:] += 1.0 + torch.rand_like(k[:, p0 + 1:])
    v[:, p0 + 1:] -= 2.0
    return Inputs(q=x.q, k=k, v=v, g_cmp=x.g_cmp, g_slc=x.g_slc, g_swa=x.g_swa, block_indices=x.block_indices)


@settings(max_examples=30, deadline=None)
@given(small_cases(varlen=False))
def test_gqa_with_repeated_kv_heads_equals_mha(case):
    """Repeating each kv head G times gives an MHA case with identical cmp/swa outputs, and identical
    selection outputs when both get the same (per kv head) block indices."""
    case = case.replace(block_indices="random")
    G = case.group
    x = materialize(case)
    mha = case.replace(heads_kv=case.heads_q)
    idx = x.block_indices.repeat_interleave(G, dim=2)
    y = Inputs(q=x.q, k=x.k.repeat_interleave(G, dim=2), v=x.v.repeat_interleave(G, dim=2),
               g_cmp=x.g_cmp, g_slc=x.g_slc, g_swa=x.g_swa, block_indices=idx)
    a, b = nsa_reference(case, x), nsa_reference(mha, y)
    for name in ("cmp_o", "cmp_lse", "slc_o", "swa_o", "o"):
        if name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(small_cases(), st.floats(-3, 3), st.floats(-3, 3))
def test_output_is_linear_in_the_gates(case, alpha, beta):
    x = materialize(case)
    out = nsa_reference(case, x)

    def with_gates(scale):
        return Inputs(q=x.q, k=x.k, v=x.v, g_cmp=x.g_cmp * scale, g_slc=x.g_slc * scale,
                      g_swa=x.g_swa * scale, block_indices=x.block_indices)

    oa = nsa_reference(case, with_gates(alpha))["o"]
    ob = nsa_reference(case, with_gates(beta))["o"]
    oab = nsa_reference(case, with_gates(alpha + beta))["o"]
    torch.testing.assert_close(oa + ob, oab, rtol=0, atol=1e-12)
    # and the branches do not depend on the gates
    assert torch.equal(nsa_reference(case, with_gates(alpha))["slc_o"], out["slc_o"])


@settings(max_examples=200, deadline=None)
@given(small_cases(dtype="bfloat16") | small_cases(dtype="float16") | small_cases())
def test_json_round_trip_is_identity(case):
    back = Case.from_json(case.to_json())
    assert back == case and back.id == case.id and hash(back) == hash(case)
    assert Case.from_dict(json.loads(json.dumps(case.to_dict() | {"id": case.id}))) == case


def test_materialize_is_deterministic_and_not_degenerate():
    case = Case(seq_len=300, heads_q=4, heads_kv=2, head_dim=16, block_size=16, dtype="bfloat16", block_indices="random", seed=3)
    a, b = materialize(case), materialize(case)
    for name, t in a.as_dict().items():
        assert torch.equal(t, b.as_dict()[name])
    assert a.q.dtype == torch.bfloat16 and a.block_indices.dtype == torch.int64
    assert (a.q != 0).all() and (a.k != 0).all() and (a.v != 0).all()
    assert ((a.g_cmp > 0) & (a.g_cmp < 1)).all()
    # the low-precision inputs are the float64 inputs rounded once
    f64 = materialize(case.replace(dtype="float64"))
    assert torch.equal(f64.q.to(torch.bfloat16), a.q)
    # compression softmax is neither flat nor one-hot
    out = nsa_reference(case, a)
    p = torch.exp(nsa_reference(case, f64, return_importance=True)["importance"])
    assert p.isfinite().all()
    lse = out["cmp_lse"][:, 200:].float()
    assert lse.std() > 0.05
    assert not torch.equal(materialize(case.replace(seed=4)).q, a.q)


@pytest.mark.parametrize("bad, msg", [
    (dict(heads_q=6, heads_kv=4), "must divide heads_q"),
    (dict(q_len=10, seq_len=5), "q_len"),
    (dict(cmp_mask="causal"), "cmp_mask"),
    (dict(window_keys="w+1"), "window_keys"),
    (dict(cmp_block=12, cmp_stride=8), "multiple of cmp_stride"),
    (dict(top_n=2, forced_blocks="initial_local"), "forced"),
    (dict(cu_seqlens=(0, 5, 9), seq_len=10), "end at seq_len"),
    (dict(dtype="fp16"), "dtype"),
])
def test_invalid_cases_name_the_field(bad, msg):
    with pytest.raises(CaseError, match=msg):
        Case(**bad)


def test_malformed_json_is_a_case_error():
    with pytest.raises(CaseError, match="malformed"):
        Case.from_json("{not json")
    with pytest.raises(CaseError, match="unknown case field"):
        Case.from_dict({"seq_len": 8, "heads": 3})
    with pytest.raises(CaseError, match="does not match"):
        Case.from_dict({"seq_len": 8, "id": "nope"})
