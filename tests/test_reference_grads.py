"""Gradients of the reference (``nsa_reference_grads``): finite differences, the dense twin, causality.

Loss ``L = sum(o * dO)`` with ``dO = output_cotangent(case)`` (cases/tensors.py). Selection is piecewise
constant, so finite differences run with fixed block indices.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsaconf.cases.conventions import CAUSAL_CMP_MASKS
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import GRAD_INPUTS, Inputs, grad_branches, materialize, output_cotangent, query_positions
from nsaconf.oracles.dense import nsa_dense_grads
from nsaconf.oracles.reference import _forward, nsa_reference, nsa_reference_grads
from tests.strategies import small_cases

FIELDS = ("q", "k", "v", "g_cmp", "g_slc", "g_swa")

TINY = [
    Case(batch=1, seq_len=13, q_len=13, heads_q=2, heads_kv=1, head_dim=4, head_dim_v=3, dtype="float64",
         block_size=4, cmp_block=4, cmp_stride=2, top_n=3, window=3),
    Case(batch=2, seq_len=11, q_len=4, heads_q=4, heads_kv=2, head_dim=4, dtype="float64", block_size=2,
         top_n=3, window=2, window_keys="w_plus_1", cmp_mask="current_block", scale=0.7),
    Case(batch=1, seq_len=12, heads_q=2, heads_kv=2, head_dim=4, dtype="float64", block_size=2, cmp_block=4,
         cmp_stride=2, top_n=3, window=0, cu_seqlens=(0, 5, 12), block_indices="random", forced_blocks="none"),
]


def test_cotangent_is_deterministic_and_differs_from_inputs():
    c = TINY[0]
    a, b = output_cotangent(c), output_cotangent(c, dtype=torch.float32)
    assert a.shape == (c.batch, c.q_len, c.heads_q, c.head_dim_v) and a.dtype == torch.float64
    assert torch.equal(a, output_cotangent(c)) and torch.equal(a.float(), b)
    assert not torch.allclose(a, materialize(c).q[..., : c.head_dim_v])
    assert float(a.std()) > 0.5


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.id)
def test_gradcheck_every_input_with_fixed_indices(case):
    """torch.autograd.gradcheck (central finite differences) w.r.t. q, k, v and the three gates."""
    x = materialize(case)
    idx = nsa_reference(case, x)["topk_idx"] if case.block_indices == "topk" else x.block_indices

    def f(*ts):
        return _forward(case, Inputs(*ts, block_indices=x.block_indices), None, idx, False)["o"]

    leaves = [getattr(x, n).detach().clone().requires_grad_(True) for n in FIELDS]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.id)
def test_grads_equal_vector_jacobian_of_the_loss(case):
    """``nsa_reference_grads`` is the gradient of ``sum(o * dO)``: checked by a directional finite
    difference ``(L(x + e u) - L(x - e u)) / 2e == <grad, u>`` for a random direction per input."""
    x = materialize(case)
    idx = nsa_reference(case, x)["topk_idx"] if case.block_indices == "topk" else x.block_indices
    g = nsa_reference_grads(case, x, block_indices=idx)
    assert set(g) == set(grad_branches(case))
    d_o = output_cotangent(case)
    gen = torch.Generator().manual_seed(7)
    eps = 1e-6
    for br in grad_branches(case):
        name = GRAD_INPUTS[br]
        u = torch.randn(getattr(x, name).shape, generator=gen, dtype=torch.float64)

        def loss(sign: float) -> float:
            y = Inputs(**{**x.as_dict(), name: getattr(x, name) + sign * eps * u})
            y.block_indices = x.block_indices
            return float((nsa_reference(case, y, block_indices=idx)["o"] * d_o).sum())

        fd = (loss(1) - loss(-1)) / (2 * eps)
        an = float((g[br] * u).sum())
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (br, fd, an)
        assert g[br].abs().max() > 0, f"{br} is identically zero"


def test_window_zero_has_no_dg_swa_and_forward_is_returned_unchanged():
    case = TINY[2]
    x = materialize(case)
    g = nsa_reference_grads(case, x, return_forward=True)
    assert "dg_swa" not in g
    f = nsa_reference(case, x)
    for k in ("cmp_o", "slc_o", "o"):
        assert torch.equal(g[k], f[k])
    assert not f["o"].requires_grad and not g["dq"].requires_grad


def test_grads_in_the_inputs_dtype_when_dtype_is_none():
    case = Case(batch=1, seq_len=16, heads_q=2, heads_kv=1, head_dim=8, dtype="bfloat16", block_size=4, top_n=3, window=4)
    x = materialize(case)
    base = nsa_reference_grads(case, x, dtype=None)
    truth = nsa_reference_grads(case, x)
    for br, t in truth.items():
        assert base[br].dtype == torch.bfloat16 and t.dtype == torch.float64
        err = float((base[br].double() - t).abs().max())
        assert 0 < err < 0.1 * float(t.abs().max()) + 0.05, (br, err)


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(small_cases(max_t=40))
def test_dense_twin_gradients_agree(case):
    """Autograd through the brute-force dense forward == autograd through the chunked reference, on the
    same (reference top-n or given random) selection."""
    x = materialize(case)
    idx = nsa_reference(case, x)["topk_idx"] if case.block_indices == "topk" else None
    ref = nsa_reference_grads(case, x, block_indices=idx)
    den = nsa_dense_grads(case, x, block_indices=idx)
    assert set(ref) == set(den) == set(grad_branches(case))
    for br in ref:
        assert torch.isfinite(ref[br]).all(), br
        torch.testing.assert_close(ref[br], den[br], rtol=1e-9, atol=1e-10, msg=lambda m: f"{br}: {m}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_cases(varlen=False, max_t=40), st.data())
def test_gradient_of_one_query_never_reaches_the_future_or_other_queries(case, data):
    """With ``dO`` nonzero only in query row i (position p), under causal conventions: ``dk``/``dv`` are
    exactly 0 at key positions > p, and ``dq``/``dg_*`` are exactly 0 in every other row."""
    case = case.replace(cmp_mask=data.draw(st.sampled_from(CAUSAL_CMP_MASKS)))
    x = materialize(case)
    i = data.draw(st.integers(0, case.q_len - 1))
    p = int(query_positions(case)[i])
    leaves = {n: getattr(x, n).detach().clone().requires_grad_(True) for n in FIELDS}
    o = _forward(case, Inputs(**leaves, block_indices=x.block_indices), None, None, False)["o"]
    d_o = torch.zeros_like(o)
    d_o[:, i] = output_cotangent(case)[:, i]
    gq, gk, gv, g1, g2, g3 = torch.autograd.grad(o, [leaves[n] for n in FIELDS], d_o, allow_unused=True)
    assert torch.count_nonzero(gk[:, p + 1:]) == 0 and torch.count_nonzero(gv[:, p + 1:]) == 0
    for g in (gq, g1, g2) + ((g3,) if case.window > 0 else ()):
        rest = torch.cat([g[:, :i], g[:, i + 1:]], 1)
        assert torch.count_nonzero(rest) == 0
    if o[:, i].abs().max() > 0:  # a query that sees something carries a gradient to the values
        assert torch.count_nonzero(gv[:, : p + 1]) > 0
