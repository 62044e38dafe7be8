"""``nsaconf.check`` / ``assert_conforms``: a plain callable judged like an oracle, in this process."""
from __future__ import annotations

import json

import pytest

import nsaconf
from nsaconf.cases.model import CaseError
from nsaconf.harness.check import resolve_cases
from nsaconf.oracles.base import OracleError, registry
from nsaconf.oracles.reference import nsa_reference

SMALL = nsaconf.Case(seq_len=64, heads_q=16, heads_kv=1, head_dim=16, head_dim_v=16, cmp_block=16, cmp_stride=16,
                     block_size=16, top_n=3, window=16, dtype="float32", seed=3)


def good_nsa(case, inputs):
    out = nsa_reference(case, inputs, dtype=None)
    return {"o": out["o"], "swa_o": out["swa_o"]} if "swa_o" in out else {"o": out["o"]}


def window_plus_one(case, inputs):
    """The sliding window one key too long; the other branches right."""
    out = nsa_reference(case, inputs, dtype=None)
    wide = nsa_reference(case.replace(window=case.window + 1), inputs, dtype=None)
    return {"cmp_o": out["cmp_o"], "swa_o": wide["swa_o"]}


def test_a_correct_callable_conforms_on_the_branches_it_returns():
    result = nsaconf.check(good_nsa, cases=[SMALL, SMALL.replace(window=0)])
    assert result.ok, result.message()
    assert result.oracle == "good_nsa"
    assert {(c.case_id, c.branch, c.status) for c in result.cells} == {
        (SMALL.id, "o", "PASS"), (SMALL.id, "swa_o", "PASS"),
        (SMALL.replace(window=0).id, "o", "PASS"), (SMALL.replace(window=0).id, "swa_o", "SKIP")}
    df = result.frame()
    assert len(df) == 4 and {"case_id", "branch", "status", "metric.err_ratio", "case.seq_len"} <= set(df.columns)
    assert not any(c.startswith("metrics.") for c in df.columns)  # results.csv's names
    assert "good_nsa" not in registry()  # the ad-hoc oracle lives for the check only


def test_assert_conforms_lists_each_bad_cell_with_its_reason_and_rerun_lines():
    cases = [SMALL, SMALL.replace(seed=4, dtype="bfloat16")]
    with pytest.raises(AssertionError) as e:
        nsaconf.assert_conforms(window_plus_one, cases=cases)
    msg = str(e.value)
    assert msg.startswith("nsaconf.check: window_plus_one: 2 of 4 cells bad on cpu (FAIL=2 PASS=2)")
    for case in cases:
        assert (f"FAIL window_plus_one.swa_o on {case.id} — matches the reference with window_keys=w_plus_1 (r "
                in msg)  # the diagnosis is the headline, the comparison follows
        assert "\n  Mismatched elements: " in msg
        assert f"nsaconf repro {case.id} --oracles window_plus_one --plugin FILE" in msg
        assert f"rerun: nsaconf.check(fn, cases='{case.id}', branches='swa_o')" in msg
    assert "cmp_o on" not in msg  # passing cells are not listed


def test_a_selection_kernel_is_given_the_cases_block_indices():
    seen = []

    def my_selection(case, inputs, block_indices):
        seen.append(tuple(block_indices.shape))
        return {"slc_o": nsa_reference(case, inputs, dtype=None, block_indices=block_indices)["slc_o"]}

    result = nsaconf.check(my_selection, cases=SMALL, branches="slc_o")
    assert result.ok, result.message()
    assert [c.layer for c in result.cells] == ["kernel"]
    assert seen == [(1, 64, 1, 3)]


def test_all_skipped_does_not_conform():
    with pytest.raises(AssertionError, match=r"no cell passed on cpu \(SKIP=1\): case has window=0"):
        nsaconf.assert_conforms(good_nsa, cases=SMALL.replace(window=0), branches=["swa_o"])


def test_exceptions_and_missing_branches_are_error_cells():
    def broken(case, inputs):
        raise RuntimeError("kernel launch failed")

    result = nsaconf.check(broken, cases=SMALL, branches="o", name="broken_kernel")
    assert [(c.oracle, c.status, c.reason) for c in result.cells] == [
        ("broken_kernel", "ERROR", "RuntimeError: kernel launch failed")]
    assert not result.ok and result.failures == result.cells


def test_no_canonical_branch_and_a_taken_name_are_user_errors():
    with pytest.raises(ValueError, match="fn returned no canonical branch \\(keys: out\\)"):
        nsaconf.check(lambda case, inputs: {"out": inputs.q}, cases=SMALL)
    with pytest.raises(OracleError, match="'reference' is the name of a registered oracle"):
        nsaconf.check(good_nsa, cases=SMALL, name="reference")
    with pytest.raises(ValueError, match="unknown branch 'out'"):
        nsaconf.check(good_nsa, cases=SMALL, branches="out")


def test_cases_take_a_profile_a_file_a_case_id_and_dtypes(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([SMALL.to_dict()]))
    smoke = nsaconf.profile_cases("smoke")
    assert resolve_cases("smoke") == smoke
    assert resolve_cases(str(path)) == [SMALL] == resolve_cases(path) == resolve_cases(SMALL.id)
    assert [c.dtype for c in resolve_cases([SMALL, SMALL.id], dtype="fp16,bf16")] == ["float16", "bfloat16"]
    assert resolve_cases(path, seed=9) == [SMALL.replace(seed=9)]
    with pytest.raises(CaseError, match="'smok' is neither a profile"):
        resolve_cases("smok")
    with pytest.raises(CaseError, match="unknown dtype 'fp8'"):
        resolve_cases(SMALL, dtype="fp8")


def test_device_must_be_usable():
    import torch

    with pytest.raises(ValueError, match="device must be one of cpu, cuda, got 'tpu'"):
        nsaconf.check(good_nsa, cases=SMALL, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            nsaconf.check(good_nsa, cases=SMALL, device="cuda")
