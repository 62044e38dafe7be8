"""The checks that need no truth: they pass on the in-house oracles and catch the planted bugs of
tests/plugins/check_planted.py (an input-mutating oracle, a decode-inconsistent one, a batch-mixing one, a
non-deterministic one), the GQA head mapping bug and the block-causal leak; each is a cell in the reports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsaconf.cases.model import Case, dump_cases
from nsaconf.cases.vocabulary import CHECKS, RESULTS_FILE
from nsaconf.harness.checks import CheckError, parse_checks, run_checks
from nsaconf.harness.cli import main
from nsaconf.oracles.base import get_oracle, load_oracle_sources

PLUGINS = Path(__file__).parent / "plugins"
CHECK_PLANTED = PLUGINS / "check_planted.py"
CASE = Case(seq_len=24, heads_q=4, heads_kv=2, head_dim=8, block_size=8, top_n=3, window=5, dtype="float32", seed=3)
CASES = [CASE, CASE.replace(batch=2, q_len=7), CASE.replace(cu_seqlens=(0, 9, 24), dtype="bfloat16"),
         CASE.replace(dtype="float16", cmp_mask="end_exclusive", window_keys="w_plus_1", scale=0.5)]


@pytest.fixture(scope="module", autouse=True)
def _plugins():
    load_oracle_sources([str(CHECK_PLANTED), str(PLUGINS / "planted_bugs.py"), str(PLUGINS / "probe_planted.py")])


def _status(oracle: str, case: Case, names=CHECKS) -> dict[str, str]:
    return {r.check: r.status for r in run_checks(get_oracle(oracle), "cpu", case, tuple(names))}


@pytest.mark.parametrize("oracle, case", [("reference", c) for c in CASES] + [("dense", CASE)],
                         ids=lambda x: x if isinstance(x, str) else x.id)
def test_in_house_oracles_pass_every_check(oracle, case):
    res = run_checks(get_oracle(oracle), "cpu", case, CHECKS)
    assert [r.check for r in res] == list(CHECKS)
    bad = [(r.check, r.status, r.reason) for r in res if r.status not in ("PASS", "SKIP")]
    assert bad == []
    skipped = {r.check: r.reason for r in res if r.status == "SKIP"}
    if case.cu_seqlens is not None:
        assert "varlen" in skipped.pop("decode_consistency")
    assert skipped == {}


def test_input_mutation_is_caught_without_the_truth():
    res = {r.check: r for r in run_checks(get_oracle("bug_mutates_inputs"), "cpu", CASE, ("inputs_unchanged", "determinism"))}
    assert res["inputs_unchanged"].status == "FAIL" and "q, k" in res["inputs_unchanged"].reason
    assert res["determinism"].status == "PASS"  # each run gets fresh inputs: the output itself is right


def test_decode_inconsistency_is_caught_both_ways():
    assert _status("bug_decode_offset", CASE, ["decode_consistency"]) == {"decode_consistency": "FAIL"}  # full case
    assert _status("bug_decode_offset", CASE.replace(q_len=5), ["decode_consistency"]) == {"decode_consistency": "FAIL"}
    assert _status("bug_decode_offset", CASE, ["batch_independence", "causality"]) == {"batch_independence": "PASS",
                                                                                      "causality": "PASS"}


def test_decode_consistency_leaves_out_a_branch_declined_in_one_form():
    dec = CASE.replace(q_len=1)
    assert _status("decode_without_lse", CASE, ["decode_consistency"]) == {"decode_consistency": "PASS"}
    assert _status("decode_without_lse", dec, ["decode_consistency"]) == {"decode_consistency": "PASS"}
    res = run_checks(get_oracle("bug_decode_drops_lse"), "cpu", dec, ("decode_consistency",))[0]
    assert res.status == "FAIL" and "returned no cmp_lse" in res.reason


def test_batch_mixing_nondeterminism_gqa_and_leaks_are_caught():
    assert _status("bug_batch_mix", CASE, ["batch_independence"]) == {"batch_independence": "FAIL"}
    assert _status("bug_batch_mix", CASE.replace(batch=2), ["batch_independence"]) == {"batch_independence": "FAIL"}
    assert _status("bug_nondeterministic", CASE, ["determinism"]) == {"determinism": "FAIL"}
    assert _status("bug_kvmap", CASE, ["gqa_equivariance"]) == {"gqa_equivariance": "FAIL"}
    assert _status("probe_bug_block_causal", CASE, ["causality"]) == {"causality": "FAIL"}
    assert _status("reference", CASE.replace(cmp_mask="current_block"), ["causality"]) == {"causality": "SKIP"}


def test_parse_checks():
    assert parse_checks("all") == CHECKS and parse_checks("causality,determinism") == ("determinism", "causality")
    assert parse_checks(None) == ()
    with pytest.raises(CheckError, match="unknown check 'bogus'"):
        parse_checks("determinism,bogus")


def test_run_checks_option_gives_cells_in_every_report(tmp_path, capsys):
    """`nsaconf run --checks all` in worker processes: one cell per check, its status and reason in results.jsonl,
    summary.md, results.csv, report.html and the JUnit XML."""
    case_file = tmp_path / "case.json"
    dump_cases([CASE], case_file)
    out = tmp_path / "run"
    rc = main(["run", "--case", str(case_file), "--oracles", "bug_mutates_inputs,reference", "--plugin", str(CHECK_PLANTED),
               "--checks", "all", "--out", str(out), "--no-progress", "--junit", str(tmp_path / "junit.xml")])
    assert rc == 1
    recs = [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]
    cells = {(r["oracle"], r["branch"]): r for r in recs}
    bad = cells[("bug_mutates_inputs", "inputs_unchanged")]
    assert bad["status"] == "FAIL" and "wrote into its inputs" in bad["reason"]
    assert cells[("bug_mutates_inputs", "o")]["status"] == "PASS"  # the truth cannot see it
    assert all(cells[("reference", c)]["status"] in ("PASS", "SKIP") for c in CHECKS)
    for f in ("summary.md", "results.csv", "report.html"):
        text = (out / f).read_text().replace("\\", "")  # summary.md escapes the underscores
        assert "inputs_unchanged" in text and "wrote into its inputs" in text, f
    assert "inputs_unchanged" in (tmp_path / "junit.xml").read_text()
    assert main(["run", "--case", str(case_file), "--checks", "bogus", "--out", str(out)]) == 2
    assert "unknown check" in capsys.readouterr().err
