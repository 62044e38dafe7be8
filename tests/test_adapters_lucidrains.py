"""lucidrains native-sparse-attention-pytorch 0.2.3 (``lucidrains``, ``lucidrains_sel``) against the reference (CPU)."""
import pytest
import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import materialize
from nsaconf.oracles.base import get_oracle
from nsaconf.oracles.reference import nsa_reference
from tests.adapters_util import check_against_reference

LUC = get_oracle("lucidrains")
SEL = get_oracle("lucidrains_sel")
pytestmark = pytest.mark.skipif(LUC.availability() is not None, reason=str(LUC.availability()))
#: lucidrains' own conventions: end_exclusive compression, w+1-key window, the current block added,
#: importance by softmax of the group-mean logits, sigmoid gates
NATIVE = dict(seq_len=100, heads_q=8, heads_kv=2, head_dim=16, block_size=16, top_n=4, window=16, dtype="float64",
              cmp_mask="end_exclusive", window_keys="w_plus_1", forced_blocks="current",
              group_importance="mean_logits", gates="sigmoid")


class _Supported:
    """The oracle with only the branches it supports for the case (the runner SKIPs the others)."""

    def __init__(self, oracle, case):
        self.o, self.case = oracle, case
        self.name, self.needs_block_indices = oracle.name, oracle.needs_block_indices
        self.branches = tuple(b for b in oracle.branches if oracle.branch_supports(case, b) is None)

    def run(self, case, x, device, block_indices=None):
        return {b: t for b, t in self.o.run(case, x, device, block_indices).items() if b in self.branches}


def check(oracle, case, **kw):
    assert oracle.check_support(case, "cpu") is None
    wrapped = _Supported(oracle, case)
    return wrapped.branches, check_against_reference(wrapped, case, **kw)


@pytest.mark.parametrize("kw", [{}, dict(heads_q=16, heads_kv=1), dict(q_len=7), dict(cu_seqlens=(0, 37, 100), heads_q=4),
                                dict(head_dim_v=24), dict(scale=0.1), dict(window=0), dict(window_keys="w", window=9),
                                dict(gates="raw"), dict(batch=2, seq_len=70), dict(top_n=1), dict(top_n=9),
                                dict(seq_len=12), dict(seq_len=33, q_len=1)])
def test_e2e_on_its_conventions(kw):
    case = Case(**{**NATIVE, **kw})
    branches, errs = check(LUC, case, atol=1e-12)
    want = {"cmp_o", "topk_idx", "slc_o", "o"} | ({"swa_o"} if case.window else set())
    assert set(branches) == want, branches
    assert errs["topk_rows_differ"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_e2e_low_precision(dtype):
    check(LUC, Case(**{**NATIVE, "dtype": dtype, "seed": 3}), k=2.0, atol=2e-3 if dtype != "float32" else 1e-6,
          topk_rows=0.05)


def test_group_of_one_is_either_importance_rule():
    """For G = 1, softmax of the mean logits is the probabilities: a sum_probs case is judged too."""
    case = Case(**{**NATIVE, "heads_q": 2, "heads_kv": 2, "group_importance": "sum_probs"})
    branches, _ = check(LUC, case, atol=1e-12)
    assert "o" in branches


def test_what_it_cannot_compute_is_skipped_with_the_reason():
    c = Case(**{**NATIVE, "cmp_mask": "end_inclusive"})
    assert "end_exclusive" in LUC.branch_supports(c, "cmp_o") and LUC.branch_supports(c, "swa_o") is None
    assert "end_exclusive" in LUC.branch_supports(c, "o")
    assert "current" in LUC.branch_supports(Case(**{**NATIVE, "forced_blocks": "initial_local"}), "topk_idx")
    assert "mean_logits" in LUC.branch_supports(Case(**{**NATIVE, "group_importance": "sum_probs"}), "slc_o")
    assert "l != d" in LUC.branch_supports(Case(**{**NATIVE, "cmp_block": 32, "cmp_stride": 16, "block_size": 32}), "cmp_o")
    assert "d != l'" in LUC.branch_supports(Case(**{**NATIVE, "cmp_block": 16, "block_size": 32}), "topk_idx")
    assert LUC.branch_supports(Case(**{**NATIVE, "cmp_block": 16, "block_size": 32}), "cmp_o") is None
    assert "lucidrains_sel" in LUC.branch_supports(Case(**{**NATIVE, "block_indices": "random"}), "o")
    assert "1-key" in LUC.branch_supports(Case(**{**NATIVE, "window": 1, "window_keys": "w"}), "swa_o")
    # every branch unsupported: the whole case SKIPs with the first reason
    assert "end_exclusive" in LUC.supports(Case(**{**NATIVE, "cmp_mask": "end_inclusive", "window": 0}), "cpu")


def test_its_conventions_differ_from_the_papers():
    """What the adapter does not translate is visible: on a paper case (end_inclusive, w keys, sum of the
    group's probabilities) its compression, window and top-k differ from the truth."""
    native = Case(**{**NATIVE, "heads_q": 16, "heads_kv": 1, "seq_len": 200})
    x = materialize(native)
    got = LUC.run(native, x, "cpu")
    paper = nsa_reference(native.replace(cmp_mask="end_inclusive", window_keys="w", group_importance="sum_probs"), x)
    assert (got["cmp_o"] - paper["cmp_o"]).abs().max() > 0.1
    assert (got["swa_o"] - paper["swa_o"]).abs().max() > 1e-3
    truth = nsa_reference(native.replace(cmp_mask="end_exclusive", group_importance="sum_probs"), x)
    assert (got["topk_idx"] != truth["topk_idx"]).any()


def test_memory_kv_is_neutralised_not_absent():
    """Its memory key/value is a sink of logit 0 at its zero init; with it the compression output shrinks by
    Z / (1 + Z). The adapter's extra channel removes it: rows with a visible block match the truth, rows
    without one return its zero value (the case model's empty row)."""
    from nsaconf.oracles import lucidrains as L
    case = Case(**NATIVE)
    x = materialize(case)
    truth = nsa_reference(case, x)
    got = LUC.run(case, x, "cpu")["cmp_o"]
    assert got[0, :16].abs().max() == 0 and truth["cmp_o"][0, :16].abs().max() == 0  # p < 16: no block visible
    assert (got - truth["cmp_o"]).abs().max() < 1e-12
    orig = L.MEM_LOGIT
    try:
        L.MEM_LOGIT = 0.0  # the memory key at logit 0: the sink is back
        sink = LUC.run(case, x, "cpu")["cmp_o"]
    finally:
        L.MEM_LOGIT = orig
    assert (sink[0, 20:] - truth["cmp_o"][0, 20:]).abs().max() > 1e-2


def test_o_is_its_gated_sum_of_the_recorded_branches():
    case = Case(**{**NATIVE, "gates": "raw"})
    x = materialize(case)
    got = LUC.run(case, x, "cpu")
    mix = sum(got[b] * g[..., None] for b, g in (("cmp_o", x.g_cmp), ("slc_o", x.g_slc), ("swa_o", x.g_swa)))
    assert (got["o"] - mix).abs().max() < 1e-12


@pytest.mark.parametrize("kw", [dict(block_indices="random"), dict(block_indices="random", forced_blocks="initial_local"),
                                dict(forced_blocks="initial_local", cmp_mask="end_inclusive"),
                                dict(block_indices="random", cu_seqlens=(0, 37, 100)),
                                dict(block_indices="random", q_len=9, head_dim_v=8), dict(block_indices="random", seq_len=12),
                                dict(block_indices="random", top_n=1), dict(block_indices="random", heads_q=2, heads_kv=2),
                                dict(cmp_block=32, cmp_stride=16, block_size=32, seq_len=130, forced_blocks="initial_local")])
def test_selection_on_given_indices(kw):
    branches, errs = check(SEL, Case(**{**NATIVE, **kw}), atol=1e-12)
    assert branches == ("slc_o",) and "slc_o" in errs


def test_selection_low_precision():
    check(SEL, Case(**{**NATIVE, "dtype": "bfloat16", "block_indices": "random"}), k=2.0, atol=2e-3)


def test_selection_steering_picks_exactly_the_given_blocks():
    """Dropping one given block changes its output: the steered top-k takes the given set, nothing more."""
    case = Case(**{**NATIVE, "block_indices": "random", "seq_len": 128})
    x = materialize(case)
    idx = x.block_indices.clone()
    cur = (torch.arange(128) // 16).view(1, 128, 1, 1)
    drop = (idx >= 0) & (idx != cur)
    first = drop.long().argmax(-1, keepdim=True)
    fewer = idx.scatter(-1, first, torch.where(drop.any(-1, keepdim=True), -1, idx.gather(-1, first)))
    got = SEL.run(case, x, "cpu", block_indices=fewer)["slc_o"]
    assert (got - nsa_reference(case, x, block_indices=fewer)["slc_o"]).abs().max() < 1e-12
    assert (got - nsa_reference(case, x, block_indices=idx)["slc_o"]).abs().max() > 1e-3


def test_selection_without_the_current_block_is_skipped():
    assert "current block" in SEL.supports(Case(**{**NATIVE, "forced_blocks": "none"}), "cpu")
    assert SEL.supports(Case(**{**NATIVE, "forced_blocks": "none", "block_indices": "random"}), "cpu") is None


def test_probe_measures_its_conventions():
    """``nsaconf masks``: from behaviour, compression end_exclusive and a window of w + 1 keys."""
    from nsaconf.harness.probe import ProbeConfig, probe_oracle
    got = {r.branch: r.convention for r in probe_oracle(LUC, "cpu", ProbeConfig(seq_len=64), branches=("cmp_o", "swa_o"))}
    assert got == {"cmp_o": "end_exclusive", "swa_o": "w_plus_1"}


def test_probe_of_a_configured_window_claims_the_case():
    """``nsaconf masks --window-keys w``: the adapter translates the case (sliding_window_size = w - 1), so the
    claim is the configured convention, measured as such."""
    from nsaconf.harness.probe import ProbeConfig, probe_oracle
    (r,) = probe_oracle(LUC, "cpu", ProbeConfig(seq_len=64), branches=("swa_o",), window_keys="w")
    assert (r.convention, r.claimed_convention) == ("w", "w")


def test_native_plugin_on_a_paper_case_is_the_reference_under_its_conventions():
    """``tests/plugins/lucidrains_native.py`` runs every case with lucidrains' own conventions: on a case with
    the paper's (end_inclusive, w keys, initial_local, sum_probs) its branches are the reference's under
    end_exclusive, w + 1 keys, the current block forced and mean_logits -- the causes the diagnosis must name."""
    from pathlib import Path
    from nsaconf.oracles.base import load_plugin
    load_plugin(Path(__file__).parent / "plugins" / "lucidrains_native.py", check_timeout=None)
    paper = Case(seq_len=100, heads_q=16, heads_kv=1, head_dim=16, block_size=16, top_n=4, window=16, dtype="float64")
    x = materialize(paper)
    got = get_oracle("lucidrains_native").run(paper, x, "cpu")
    theirs = nsa_reference(paper.replace(cmp_mask="end_exclusive", window_keys="w_plus_1", forced_blocks="current",
                                         group_importance="mean_logits"), x)
    for b in ("cmp_o", "slc_o", "swa_o", "o"):
        assert (got[b] - theirs[b]).abs().max() < 1e-12, b
        assert (got[b] - nsa_reference(paper, x)[b]).abs().max() > 1e-2, b
    assert torch.equal(got["topk_idx"], theirs["topk_idx"])
