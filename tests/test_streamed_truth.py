"""The truth computed window by window (``StreamedTruth``, ``nsa_reference(window=...)``) gives the rows of
the whole computation bit for bit, and the verdicts judged against it are those of the held truth: the same
statuses, reasons, metrics and tolerances, for correct, buggy, tie-breaking and malformed outputs; a run
that streams writes the same results as one that holds the truth."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from nsaconf.cases.model import Case, dump_cases
from nsaconf.cases.tensors import materialize
from nsaconf.harness import comparator, runner
from nsaconf.harness.cli import main
from nsaconf.harness.comparator import CaseTruth, Job, StreamedTruth, TruthFailed, judge, judge_many
from nsaconf.harness.tolerance import ToleranceTable
from nsaconf.oracles import reference
from nsaconf.oracles.reference import nsa_reference, query_windows
from tests.comparator_util import TIE_CASE, near_tie_swap

PLUGINS = Path(__file__).parent / "plugins"

CASES = [
    Case(seq_len=128, heads_q=4, heads_kv=2, head_dim=16, block_size=16, top_n=4, window=32, dtype="float32", seed=2),
    Case(seq_len=160, q_len=60, heads_q=4, heads_kv=1, head_dim=8, block_size=16, top_n=3, window=0, dtype="bfloat16", batch=3),
    Case(seq_len=300, cu_seqlens=(0, 13, 120, 121, 300), heads_q=6, heads_kv=2, head_dim=8, block_size=16, top_n=5,
         window=40, dtype="float64"),
    Case(seq_len=180, heads_q=2, heads_kv=1, head_dim=16, block_size=16, top_n=4, window=16, dtype="float16",
         block_indices="random"),
]


@pytest.fixture
def small_windows(monkeypatch):
    """Chunks of a few queries and windows of a few chunks, so that small cases have many windows."""
    monkeypatch.setattr(reference, "_ELEMENT_BUDGET", 1 << 14)
    monkeypatch.setattr(reference, "WINDOW_ELEMENTS", 1500)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_windows_are_the_whole_computation_bit_for_bit(case, small_windows):
    x = materialize(case)
    windows = query_windows(case)
    assert len(windows) >= 2 * case.batch
    assert [w[0] for w in windows] == sorted(w[0] for w in windows)
    for dtype in (torch.float64, None):
        whole = nsa_reference(case, x, dtype=dtype, return_importance=True)
        parts = [nsa_reference(case, x, dtype=dtype, return_importance=True, window=w) for w in windows]
        for key, t in whole.items():
            rows = [torch.cat([p[key] for w, p in zip(windows, parts) if w[0] == b], dim=1) for b in range(case.batch)]
            got = torch.cat(rows, dim=0)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(-1).view(torch.uint8) if got.is_floating_point() else got,
                               t.view(-1).view(torch.uint8) if t.is_floating_point() else t), (key, dtype)


def _outputs(case: Case, ct: CaseTruth) -> dict[str, dict]:
    """Oracle replies: correct (the baseline), a planted error in a few rows, NaN, a wrong shape, non-float,
    a swapped top-n choice, zeros."""
    base = {k: v.clone() for k, v in ct.baseline.items() if k != "importance"}
    off = {k: v.clone() for k, v in base.items()}
    off["slc_o"][:, -3:] *= 1.25
    off["cmp_lse"][:, 5] += 1e-3
    nan = {k: v.clone() for k, v in base.items()}
    nan["o"][0, -1, 0, 0] = math.nan
    nan["cmp_o"][:, :2] = 1.0  # rows with no visible block must be exactly 0
    bad = {"cmp_o": base["cmp_o"][:, :-1], "cmp_lse": base["cmp_lse"].long(), "slc_o": "no tensor",
           "topk_idx": base["topk_idx"].float()}
    swapped = {k: v.clone() for k, v in base.items()}
    swapped["topk_idx"] = swapped["topk_idx"].flip(-1)  # same sets: no difference
    swapped["topk_idx"][:, -1, :, 0] = 0
    zeros = {k: torch.zeros_like(v) for k, v in base.items()}
    return {"good": base, "off": off, "nan": nan, "bad": bad, "swapped": swapped, "zeros": zeros}


def _as_dict(v) -> dict:
    return {"branch": v.branch, "status": v.status, "reason": v.reason, "metrics": v.metrics, "tolerance": v.tolerance}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_streamed_verdicts_are_the_held_verdicts(case, small_windows):
    ct = CaseTruth.compute(case)
    st = StreamedTruth(case)
    branches = tuple(k for k in ct.truth if k != "importance")
    jobs = [Job(name, "kernel", branches + ("swa_o",) * (case.window == 0), out, ToleranceTable())
            for name, out in _outputs(case, ct).items()]
    held = [[_as_dict(v) for v in vs] for vs in judge_many(ct, jobs)]
    streamed = [[_as_dict(v) for v in vs] for vs in judge_many(st, jobs)]
    assert streamed == held
    statuses = {j.oracle: {v["branch"]: v["status"] for v in vs} for j, vs in zip(jobs, held)}
    assert set(statuses["good"].values()) == {"PASS"} | ({"ERROR"} if case.window == 0 else set())
    assert statuses["off"]["slc_o"] == "FAIL" and statuses["nan"]["o"] == "FAIL" and statuses["zeros"]["o"] == "FAIL"
    assert set(statuses["bad"].values()) <= {"FAIL", "ERROR"}
    if case.block_indices == "topk":
        assert st.given_indices is not None and torch.equal(st.given_indices, ct.given_indices)


def test_streamed_tie_break_recomputes_with_the_oracle_indices(small_windows):
    """As ``test_tie_break_judges_slc_o_with_oracle_indices`` (test_comparator), against the streamed truth."""
    case = TIE_CASE
    ct = CaseTruth.compute(case)
    new, gap = near_tie_swap(ct)
    table = ToleranceTable()
    table.set("topk_idx.floor_add", gap * 1.01, "test")
    t2, _ = ct.with_indices(new)
    outputs = {"topk_idx": new, "slc_o": t2["slc_o"].float(), "o": t2["o"].float()}
    for tab in (table, ToleranceTable()):
        held = [_as_dict(v) for v in judge(ct, "tiebreak", "e2e", ("topk_idx", "slc_o", "o"), outputs, tab)]
        streamed = [_as_dict(v) for v in judge(StreamedTruth(case), "tiebreak", "e2e", ("topk_idx", "slc_o", "o"), outputs, tab)]
        assert streamed == held
    assert [v["status"] for v in held] == ["FAIL", "FAIL", "FAIL"]  # the strict table: not a tie
    assert streamed[0]["metrics"]["topk_disagree"] == 1


def test_streamed_truth_failure_is_truth_failed(monkeypatch):
    case = CASES[0]

    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(comparator, "nsa_reference", boom)
    with pytest.raises(TruthFailed, match="truth failed: RuntimeError: boom"):
        judge(StreamedTruth(case), "x", "kernel", ("o",), {"o": torch.zeros(1)}, ToleranceTable())


def _records(out: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("seconds", None), r.pop("timestamp", None)
        r.pop("diagnosis", None)  # searched within a time budget: compared apart
    return recs


def test_run_that_streams_writes_the_held_results(tmp_path, monkeypatch):
    """``nsaconf run`` of planted bugs: the records (timing apart) of a run that streams every case's truth
    equal those of a run that holds it; a truth that fails is an ERROR per cell, naming it."""
    dump_cases([CASES[0].replace(seq_len=96, q_len=96), CASES[2]], tmp_path / "cases.json")

    def run(out: str, oracles: str) -> int:
        return main(["run", "--case", str(tmp_path / "cases.json"), "--oracles", oracles, "--out", str(tmp_path / out),
                     "--timeout", "120", "--plugin", str(PLUGINS / "planted_bugs.py"), "--plugin",
                     str(PLUGINS / "misbehaving.py"), "--no-report", "--no-progress", "--no-probe"])
    oracles = "reference,bug_scale,bad_raise"
    monkeypatch.setattr(reference, "WINDOW_ELEMENTS", 500)  # several windows a case, in both runs
    # a streamed truth uses every core (the workers are idle): the held truth too, as a float sum's bits may
    # depend on the thread count
    monkeypatch.setattr(runner.Runner, "_threads", lambda self: os.cpu_count() or 1)
    assert run("held", oracles) == 1
    streamed = []
    real = runner.Runner._run_streamed
    monkeypatch.setattr(runner.Runner, "_run_streamed", lambda self, case, *a: (streamed.append(case.id), real(self, case, *a)))
    monkeypatch.setattr(comparator, "HELD_TRUTH_LIMIT", -1)
    assert run("streamed", oracles) == 1
    assert len(streamed) == 2
    held = _records(tmp_path / "held")
    assert _records(tmp_path / "streamed") == held
    fails = [json.loads(x) for x in (tmp_path / "streamed" / "results.jsonl").read_text().splitlines()]
    assert all(r.get("diagnosis") for r in fails if r["status"] == "FAIL" and r["branch"] == "cmp_o")  # FAILs diagnosed too
    assert {r["status"] for r in held} == {"PASS", "FAIL", "ERROR"}

    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(comparator, "nsa_reference", boom)
    assert run("failed", "reference") == 1
    recs = _records(tmp_path / "failed")
    assert {r["status"] for r in recs} == {"ERROR"}
    assert all(r["reason"] == "truth failed: RuntimeError: boom" for r in recs)
