"""flex (flex_attention compression + window) against the reference under every convention (CPU)."""
import pytest
import torch

from nsaconf.cases.conventions import CMP_MASKS
from nsaconf.cases.model import Case
from nsaconf.oracles.base import get_oracle
from nsaconf.oracles.flex import pool
from nsaconf.oracles.reference import mean_pool
from tests.adapters_util import check_against_reference

FLEX = get_oracle("flex")
pytestmark = pytest.mark.skipif(FLEX.availability() is not None, reason=str(FLEX.availability()))
BASE = dict(seq_len=72, heads_q=4, heads_kv=2, head_dim=16, block_size=16, top_n=3, dtype="float64")


@pytest.mark.parametrize("mask", sorted(CMP_MASKS))
def test_every_cmp_mask(mask):
    errs = check_against_reference(FLEX, Case(**{**BASE, "cmp_mask": mask}), atol=1e-12)
    assert set(errs) == {"cmp_o", "cmp_lse"}


@pytest.mark.parametrize("kw", [dict(window=9), dict(window=9, window_keys="w_plus_1"),
                                dict(cmp_block=16, cmp_stride=8, block_size=16, window=4),
                                dict(cmp_block=32, cmp_stride=8, block_size=32, cmp_mask="end_exclusive"),
                                dict(seq_len=70, q_len=13, window=20), dict(cu_seqlens=(0, 29, 72), window=6),
                                dict(head_dim_v=24, scale=0.25, batch=2)])
def test_translations(kw):
    check_against_reference(FLEX, Case(**{**BASE, **kw}), atol=1e-12)


def test_half_precision():
    check_against_reference(FLEX, Case(**{**BASE, "dtype": "bfloat16", "window": 8}), k=2.0, atol=1e-3)


def test_pooling_is_independent_but_equal():
    x = torch.randn(2, 37, 3, 5, dtype=torch.float64)
    for l, d in ((8, 8), (16, 8), (12, 4)):
        torch.testing.assert_close(pool(x, l, d)[0], mean_pool(x[0], l, d), rtol=0, atol=1e-12)


def test_wrong_mask_is_detected():
    """flex run under end_inclusive must not match the truth of an end_exclusive case (one position apart)."""
    from nsaconf.cases.tensors import materialize
    from nsaconf.oracles.reference import nsa_reference
    case = Case(**{**BASE, "cmp_mask": "end_exclusive"})
    x = materialize(case)
    got = FLEX.run(case.replace(cmp_mask="end_inclusive"), x, "cpu")["cmp_o"]
    assert (got - nsa_reference(case, x)["cmp_o"]).abs().max() > 1e-3
