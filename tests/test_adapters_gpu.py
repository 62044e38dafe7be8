"""GPU adapters against the float64 reference on the GPU (marked ``gpu``; skipped without CUDA).

Needs the GPU packages (fla-core + triton, tilelang) and the checkouts; an unavailable adapter is
skipped with its availability() reason. nsa_impl's compression branch must FAIL (anti-causal mask)."""
import pytest
import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import materialize
from nsaconf.oracles.base import get_oracle
from nsaconf.oracles.reference import nsa_reference
from tests.adapters_util import check_against_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [
    Case(dtype="float16", seq_len=256, heads_q=16, heads_kv=1, head_dim=64, block_size=32, top_n=4, window=32, seed=11),
    Case(dtype="bfloat16", seq_len=200, q_len=50, heads_q=32, heads_kv=2, head_dim=64, block_size=32, top_n=8, window=40,
         window_keys="w_plus_1", seed=12),
    Case(dtype="float16", seq_len=192, cu_seqlens=(0, 70, 192), heads_q=16, heads_kv=1, head_dim=64, block_size=16,
         top_n=4, window=16, seed=13),
]
ORACLES = ["fla_naive", "fla_parallel", "fla_parallel_sel", "tilelang_ref", "tilelang_fwd", "flash_window", "flex"]


@pytest.mark.parametrize("name", ORACLES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gpu_adapter_matches_reference(name, case):
    oracle = get_oracle(name)
    why = oracle.check_support(case, "cuda")
    if why:
        pytest.skip(why)
    check_against_reference(oracle, case, device="cuda", k=2.0, atol=1e-3, topk_rows=0.02)


def test_nsa_impl_compression_is_anti_causal():
    oracle = get_oracle("nsa_impl")
    case = Case(dtype="float16", seq_len=256, heads_q=16, heads_kv=1, head_dim=64, block_size=32, top_n=4, window=32, seed=14)
    why = oracle.check_support(case, "cuda")
    if why:
        pytest.skip(why)
    x = materialize(case, "cuda")
    got = oracle.run(case, x, "cuda")
    truth = nsa_reference(case, x)
    assert (got["cmp_o"].double() - truth["cmp_o"]).abs().max() > 0.1  # end_inclusive truth: FAIL
    anti = nsa_reference(case.replace(cmp_mask="anti_causal"), x)
    assert (got["cmp_o"].double() - anti["cmp_o"]).abs().max() < 1e-2  # it is the anti-causal mask
    assert (got["swa_o"].double() - truth["swa_o"]).abs().max() < 1e-2  # its window is right
