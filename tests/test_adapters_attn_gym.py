"""attention-gym 0.0.17 ``gather_attn`` (``attn_gym``: selection on given indices, window) against the reference (CPU)."""
import pytest
import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import materialize
from nsaconf.oracles.base import get_oracle
from nsaconf.oracles.reference import nsa_reference
from tests.adapters_util import check_against_reference

GYM = get_oracle("attn_gym")
pytestmark = pytest.mark.skipif(GYM.availability() is not None, reason=str(GYM.availability()))
BASE = dict(seq_len=90, heads_q=8, heads_kv=2, head_dim=16, block_size=16, top_n=3, window=12, dtype="float64")


@pytest.mark.parametrize("kw", [{}, dict(block_indices="random"), dict(window_keys="w_plus_1"), dict(window=1),
                                dict(window=200), dict(heads_q=16, heads_kv=1, forced_blocks="none"),
                                dict(q_len=7), dict(cu_seqlens=(0, 37, 90)), dict(cu_seqlens=(0, 5, 90), block_indices="random"),
                                dict(head_dim_v=24, scale=0.3), dict(seq_len=12), dict(batch=2, seq_len=40),
                                dict(cmp_block=32, cmp_stride=16, block_size=32, top_n=3)])
def test_branches_on_given_indices(kw):
    errs = check_against_reference(GYM, Case(**{**BASE, **kw}), atol=1e-12)
    assert set(errs) == {"slc_o", "swa_o"}


def test_no_window():
    case = Case(**{**BASE, "window": 0})
    assert GYM.branch_supports(case, "swa_o") == "no window branch (w = 0)"
    assert set(GYM.run(case, materialize(case), "cpu", block_indices=materialize(case).block_indices
                       if case.block_indices == "random" else nsa_reference(case, materialize(case))["topk_idx"])) == {"slc_o"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_low_precision(dtype):
    check_against_reference(GYM, Case(**{**BASE, "dtype": dtype, "block_indices": "random"}), k=2.0,
                            atol=2e-3 if dtype != "float32" else 1e-6)


def test_its_window_counts_w_keys():
    """``sliding_window_size = w`` attends to w keys (the current one included): passed untranslated on a
    ``w_plus_1`` case it misses the oldest key."""
    case = Case(**{**BASE, "window_keys": "w_plus_1"})
    x = materialize(case)
    idx = nsa_reference(case, x)["topk_idx"]
    as_w = GYM.run(case.replace(window_keys="w"), x, "cpu", block_indices=idx)["swa_o"]
    assert (as_w - nsa_reference(case.replace(window_keys="w"), x)["swa_o"]).abs().max() < 1e-12
    assert (as_w - nsa_reference(case, x)["swa_o"]).abs().max() > 1e-3


def test_causality_is_the_callers():
    """Keys of a selected block past the query are dropped by the adapter (gather_attn attends to every
    index it is given): with them kept, the output differs."""
    from nsaconf.oracles import attn_gym as A
    case = Case(**BASE)
    x = materialize(case)
    idx = nsa_reference(case, x)["topk_idx"]
    orig = A.expanded_keys
    try:
        A.expanded_keys = lambda c, i, pos, lens: orig(c, i, torch.full_like(pos, 10 ** 6), lens)
        leaky = GYM.run(case, x, "cpu", block_indices=idx)["slc_o"]
    finally:
        A.expanded_keys = orig
    assert (leaky - nsa_reference(case, x, block_indices=idx)["slc_o"]).abs().max() > 1e-2


def test_probe_measures_its_window():
    from nsaconf.harness.probe import ProbeConfig, probe_oracle
    got = {r.branch: r.convention for r in probe_oracle(GYM, "cpu", ProbeConfig(seq_len=64))}
    assert got == {"slc_o": "causal", "swa_o": "w"}
