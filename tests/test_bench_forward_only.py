"""``nsaconf bench`` times forward passes (``forward_only()`` switches oracle gradients off) of the
CUDA oracles it times by default (CPU tests)."""
from __future__ import annotations

import nsaconf.harness.bench as hb
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import materialize
from nsaconf.oracles.base import GRAD_BRANCHES, forward_only, get_oracle, gradients_wanted

SMALL = Case(seq_len=48, heads_q=2, heads_kv=1, head_dim=16, block_size=16, top_n=3, window=8, dtype="float32")


def test_forward_only_switches_reference_gradients_off_and_restores():
    oracle = get_oracle("reference")
    x = materialize(SMALL, "cpu")
    assert gradients_wanted(SMALL)
    assert "dq" in oracle.run(SMALL, x, "cpu")
    with forward_only():
        assert not gradients_wanted(SMALL)
        out = oracle.run(SMALL, x, "cpu")
        assert not set(out) & set(GRAD_BRANCHES) and "o" in out
    assert gradients_wanted(SMALL)


def test_bench_times_forward_branches_inside_forward_only(monkeypatch):
    seen = []

    def fake_time_fn(fn, reps, warmup, rotate):
        seen.append(gradients_wanted(SMALL))
        out = fn()
        assert "dq" not in out
        return 1.25

    monkeypatch.setattr(hb, "measure_ceilings", lambda: hb.Ceilings(100.0, 1000.0, "test card"))
    monkeypatch.setattr(hb, "materialize", lambda case, device: materialize(case, "cpu"))
    monkeypatch.setattr(hb, "time_fn", fake_time_fn)
    oracle = get_oracle("reference")
    monkeypatch.setattr(type(oracle), "check_support", lambda self, case, device: None)
    recs = hb.bench_oracles([SMALL], ["reference"], reps=20, warmup=1, log=lambda *_: None)
    assert seen == [False]
    assert len(recs) == 1 and recs[0].ms == 1.25
    assert not set(recs[0].branches) & set(GRAD_BRANCHES) and "o" in recs[0].branches


def test_default_bench_oracles_leave_out_the_python_loop_oracles_with_a_reason():
    names, left_out = hb.default_bench_oracles()
    out = dict(left_out)
    assert {"fla_naive", "tilelang_ref"} <= set(out) and all(out.values())
    assert not set(names) & set(out)
    assert {"reference", "inhouse_cutile", "fla_parallel"} <= set(names)
    assert "dense" not in names and "dense" not in out        # CPU-only oracles are not bench candidates
