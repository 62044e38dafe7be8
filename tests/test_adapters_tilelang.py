"""tilelang_ref (examples/deepseek_nsa reference.py) against the reference; padding/order translation;
RNG protection. Needs the TileLang checkout (oracles.config)."""
import random

import pytest
import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import materialize
from nsaconf.oracles.base import get_oracle
from nsaconf.oracles.reference import nsa_reference
from tests.adapters_util import check_against_reference

REF = get_oracle("tilelang_ref")
_why = REF.availability()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"tilelang_ref unavailable: {_why}")

BASE = dict(seq_len=96, heads_q=4, heads_kv=2, head_dim=16, block_size=16, top_n=3, dtype="float32")


@pytest.mark.parametrize("kw", [dict(), dict(window=10), dict(window=10, window_keys="w_plus_1"),
                                dict(seq_len=90, q_len=17, window=7), dict(cu_seqlens=(0, 41, 96), window=5),
                                dict(block_indices="random", head_dim_v=24), dict(dtype="float16", window=9)])
def test_tilelang_ref_matches_reference(kw):
    case = Case(**{**BASE, **kw})
    errs = check_against_reference(REF, case, atol=2e-6)
    assert ("swa_o" in errs) == (case.window > 0) and "slc_o" in errs


def test_index_order_and_padding_do_not_matter():
    """Canonical indices are ascending with -1 last; reversing them and moving the padding first must not
    change slc_o (the adapter passes block_counts=None, so TileLang's positional counts are inactive)."""
    case = Case(**{**BASE, "block_indices": "random", "top_n": 5})
    x = materialize(case)
    a = REF.run(case, x, "cpu", block_indices=x.block_indices)["slc_o"]
    b = REF.run(case, x, "cpu", block_indices=x.block_indices.flip(-1))["slc_o"]
    assert (x.block_indices == -1).any()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_wrong_indices_are_detected():
    case = Case(**BASE)
    x = materialize(case)
    truth = nsa_reference(case, x)
    shifted = torch.where(truth["topk_idx"] > 0, truth["topk_idx"] - 1, truth["topk_idx"])
    got = REF.run(case, x, "cpu", block_indices=shifted)["slc_o"]
    assert (got.double() - truth["slc_o"]).abs().max() > 1e-2


def test_import_does_not_reseed_rngs():
    import nsaconf.oracles.tilelang as tl
    tl._MODS.clear()
    random.seed(123)
    torch.manual_seed(123)
    a = (random.random(), torch.rand(1).item())
    random.seed(123)
    torch.manual_seed(123)
    with tl._rng_guard():
        random.seed(0)
        torch.manual_seed(0)
    tl._load("nsaconf_tilelang_reference", "reference.py")
    assert (random.random(), torch.rand(1).item()) == a


def test_tilelang_fwd_declares_its_limits():
    o = get_oracle("tilelang_fwd")
    assert o.dtypes == ("float16",) and o.devices == ("cuda",)
    assert "multiple of 16" in o.supports(Case(heads_q=8, heads_kv=1, dtype="float16"), "cuda")
    assert "D <= 128" in o.supports(Case(heads_q=16, head_dim=192, dtype="float16"), "cuda")
    assert "varlen" in o.supports(Case(heads_q=16, seq_len=64, cu_seqlens=(0, 20, 64), dtype="float16"), "cuda")
