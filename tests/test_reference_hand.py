"""Conventions and the reference on tiny cases whose expected numbers are written by hand.

Hand case (T = 4, one head, D = DV = 1, l = d = l' = 2, scale 1):
  k = [0, 0, 2 ln2, 2 ln2], v = [1, 3, 5, 7], q = 1 at every position
  -> compressed K = [0, 2 ln2], V = [2, 6]; softmax weights exp(q*K) = [1, 4].
"""
import math

import pytest
import torch

from nsaconf.cases.conventions import (CMP_MASKS, WINDOW_KEYS, anti_causal, current_block, end_exclusive, end_inclusive,
                               eq9_weights, is_forced, window_w, window_w_plus_1)
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.oracles.dense import nsa_dense
from nsaconf.oracles.reference import nsa_reference

LN2 = math.log(2.0)
NAN = float("nan")
NEG = float("-inf")


def test_convention_functions_by_hand():
    # block c = 1 of l = 4, d = 2 covers keys 2..5
    assert [end_inclusive(1, p, 4, 2) for p in range(3, 8)] == [False, False, True, True, True]
    assert [end_exclusive(1, p, 4, 2) for p in range(3, 8)] == [False, False, False, True, True]
    assert [current_block(1, p, 4, 2) for p in range(0, 4)] == [False, False, True, True]
    assert [anti_causal(1, p, 4, 2) for p in range(3, 8)] == [True, True, True, False, False]
    # l = d = BS: end_inclusive is c < (p+1)//BS (the FLA form)
    for p in range(40):
        for c in range(6):
            assert end_inclusive(c, p, 8, 8) == (c < (p + 1) // 8)
    # window lengths: w keys vs w+1 keys
    assert [s for s in range(10) if window_w(6, s, 3)] == [4, 5, 6]
    assert [s for s in range(10) if window_w_plus_1(6, s, 3)] == [3, 4, 5, 6]
    # forced blocks
    assert [j for j in range(6) if is_forced("initial_local", j, 37, 8)] == [0, 3, 4]
    assert [j for j in range(6) if is_forced("current", j, 37, 8)] == [4]
    assert [j for j in range(6) if is_forced("none", j, 37, 8)] == []
    assert [j for j in range(6) if is_forced("initial_local", j, 3, 8)] == [0]
    assert set(CMP_MASKS) == {"end_inclusive", "current_block", "anti_causal", "end_exclusive"}
    assert set(WINDOW_KEYS) == {"w", "w_plus_1"}


def test_eq9_weights_by_hand():
    # l = d = l': identity
    assert torch.equal(eq9_weights(3, 3, 4, 4, 4), torch.eye(3, dtype=torch.float64))
    # paper-like l = 2d, l' = 4d (d = 1): block j gets c = 4j + m - n, m < 4, n < 2, i.e. each
    # compressed block [c, c+2) weighted by its overlap with [4j, 4j+4): c = -1 dropped, c = 3 straddles
    w = eq9_weights(8, 2, 2, 1, 4)
    assert w[:, 0].tolist() == [2, 2, 2, 1, 0, 0, 0, 0]
    assert w[:, 1].tolist() == [0, 0, 0, 1, 2, 2, 2, 1]


def hand_inputs(case: Case) -> Inputs:
    k = torch.tensor([0.0, 0.0, 2 * LN2, 2 * LN2], dtype=torch.float64).view(1, 4, 1, 1)
    v = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64).view(1, 4, 1, 1)
    q = torch.ones(1, 4, 1, 1, dtype=torch.float64)
    g = lambda x: torch.full((1, 4, 1), x, dtype=torch.float64)  # noqa: E731
    return Inputs(q=q, k=k, v=v, g_cmp=g(0.5), g_slc=g(0.25), g_swa=g(0.125))


def hand_case(**kw) -> Case:
    base = dict(seq_len=4, heads_q=1, heads_kv=1, head_dim=1, dtype="float64", block_size=2, top_n=1,
                window=2, forced_blocks="none", scale=1.0)
    base.update(kw)
    return Case(**base)


CMP_EXPECTED = {  # per position p = 0..3: (o_cmp, lse_cmp)
    "end_inclusive": [(0.0, NEG), (2.0, 0.0), (2.0, 0.0), (5.2, math.log(5))],
    "current_block": [(2.0, 0.0), (2.0, 0.0), (5.2, math.log(5)), (5.2, math.log(5))],
    "anti_causal": [(5.2, math.log(5)), (5.2, math.log(5)), (6.0, 2 * LN2), (6.0, 2 * LN2)],
    "end_exclusive": [(0.0, NEG), (0.0, NEG), (2.0, 0.0), (2.0, 0.0)],
}


@pytest.mark.parametrize("impl", [nsa_reference, nsa_dense])
@pytest.mark.parametrize("cmp_mask", sorted(CMP_EXPECTED))
def test_compression_by_hand(impl, cmp_mask):
    case = hand_case(cmp_mask=cmp_mask)
    out = impl(case, hand_inputs(case))
    o = [x for x, _ in CMP_EXPECTED[cmp_mask]]
    lse = [x for _, x in CMP_EXPECTED[cmp_mask]]
    torch.testing.assert_close(out["cmp_o"].flatten(), torch.tensor(o, dtype=torch.float64))
    torch.testing.assert_close(out["cmp_lse"].flatten(), torch.tensor(lse, dtype=torch.float64))


@pytest.mark.parametrize("impl", [nsa_reference, nsa_dense])
def test_selection_window_and_gates_by_hand(impl):
    case = hand_case()
    out = impl(case, hand_inputs(case))
    # top-1: p=0 no candidate (importance 0, nothing forced); p=1,2 block 0; p=3 block 1 (importance 0.8)
    assert out["topk_idx"].flatten().tolist() == [-1, 0, 0, 1]
    torch.testing.assert_close(out["slc_o"].flatten(), torch.tensor([0.0, 2.0, 2.0, 6.0], dtype=torch.float64))
    # w = 2 keys: p=2 sees keys 1,2 with weights 1,4 -> (3 + 20)/5
    torch.testing.assert_close(out["swa_o"].flatten(), torch.tensor([1.0, 2.0, 4.6, 6.0], dtype=torch.float64))
    o3 = 0.5 * 5.2 + 0.25 * 6.0 + 0.125 * 6.0
    assert out["o"].flatten()[3].item() == pytest.approx(o3, abs=1e-12)


@pytest.mark.parametrize("impl", [nsa_reference, nsa_dense])
def test_window_w_plus_1_by_hand(impl):
    case = hand_case(window_keys="w_plus_1")
    out = impl(case, hand_inputs(case))
    # p=2 sees keys 0,1,2 (weights 1,1,4): (1+3+20)/6; p=3 sees 1,2,3 (1,4,4): (3+20+28)/9
    torch.testing.assert_close(out["swa_o"].flatten(), torch.tensor([1.0, 2.0, 4.0, 51 / 9], dtype=torch.float64))


@pytest.mark.parametrize("impl", [nsa_reference, nsa_dense])
def test_forced_blocks_by_hand(impl):
    case = hand_case(top_n=3, forced_blocks="initial_local")
    out = impl(case, hand_inputs(case))
    # p=0: block 0 forced; p=1: 0; p=2: 0 (initial+prev) and 1 (current); p=3: 0, 1
    assert out["topk_idx"][0, :, 0].tolist() == [[0, -1, -1], [0, -1, -1], [0, 1, -1], [0, 1, -1]]
    # p=2 selects keys 0,1,2 (<= p): weights 1,1,4 -> 4.0
    assert out["slc_o"].flatten()[2].item() == pytest.approx(4.0, abs=1e-12)
    case = hand_case(top_n=1, forced_blocks="current")
    out = impl(case, hand_inputs(case))
    # the forced current block beats block 0's importance 1.0 at p=2
    assert out["topk_idx"].flatten().tolist() == [0, 0, 1, 1]


def test_decode_positions_by_hand():
    # TQ = 1: the single query sits at p = 3 and sees what p = 3 sees in the full case
    case = hand_case(q_len=1)
    full = hand_case()
    x = hand_inputs(full)
    x1 = Inputs(q=x.q[:, 3:], k=x.k, v=x.v, g_cmp=x.g_cmp[:, 3:], g_slc=x.g_slc[:, 3:], g_swa=x.g_swa[:, 3:])
    out = nsa_reference(case, x1)
    assert out["cmp_o"].item() == pytest.approx(5.2)
    assert out["topk_idx"].item() == 1
