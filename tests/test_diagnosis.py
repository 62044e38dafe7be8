"""Differential diagnosis: every planted convention difference is named as exactly that convention; a
correct oracle gets none; a bug that is no convention is said to match nothing, with the nearest variant."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsaconf.cases.model import Case
from nsaconf.harness.diagnosis import alternatives
from nsaconf.harness.runner import console_line, evaluate
from nsaconf.oracles.base import load_plugin

PLUGINS = Path(__file__).parent / "plugins"
#: every diagnosis below gets 120 s (its variants take about a second on an idle machine): a loaded machine
#: must not cut the search short
#: tiny: 8 selection blocks, top-4 (3 forced + 1 scored), window 8, GQA group 2; early queries have empty
#: compression rows and -1 padded top-n
CASE = Case(seq_len=64, heads_q=4, heads_kv=2, head_dim=16, block_size=8, top_n=4, window=8, dtype="float32", seed=3)


#: each planted oracle of tests/plugins/planted_conventions.py and the diagnosis it must get
PLANTED = {**{f"conv_cmp_{m}": f"cmp_mask={m}" for m in ("current_block", "anti_causal", "end_exclusive")},
           "conv_window_w_plus_1": "window_keys=w_plus_1",
           **{f"conv_forced_{f}": f"forced_blocks={f}" for f in ("none", "current")},
           "conv_lse_base2": "lse=base2", "conv_scale_swa": "scale=ignored_in_swa", "conv_gates_sigmoid": "gates=sigmoid",
           "conv_group_mean_logits": "group_importance=mean_logits", "conv_empty_nan": "empty_rows=nan",
           "conv_empty_finite_lse": "empty_rows=finite_lse", "conv_slc_no_causal_cut": "selection=no_causal_cut",
           "conv_slc_pad_block0": "padding=block0", "conv_topk_repeats": "topk_padding=repeats",
           "conv_grads_window": "window_keys=w_plus_1", "conv_grads_scale_swa": "scale=ignored_in_swa"}


@pytest.fixture(scope="module")
def planted() -> dict[str, str]:
    from nsaconf.oracles.base import registry

    load_plugin(PLUGINS / "planted_conventions.py")
    load_plugin(PLUGINS / "planted_bugs.py")
    declared = {n: c.description.split(": ", 1)[1] for n, c in registry().items() if n.startswith("conv_")}
    assert declared == PLANTED  # the plugin and this table name the same conventions
    return PLANTED


def _case_for(key: str) -> Case:
    return CASE.replace(scale=0.1) if key.startswith("scale=") else CASE  # scale: one a branch can ignore


@pytest.mark.parametrize("oracle", sorted(PLANTED))
def test_each_planted_convention_is_diagnosed_as_exactly_that(planted, oracle):
    key = planted[oracle]
    field = key.split("=")[0]
    if field in ("gates", "group_importance") and not hasattr(Case(), field):
        pytest.skip(f"the case model has no {field!r} field yet")
    cells = evaluate(_case_for(key), [oracle], diagnosis_budget=120)  # the budget of a loaded machine
    fails = [c for c in cells if c.status == "FAIL"]
    assert fails, f"{oracle} did not fail: {[(c.branch, c.status, c.reason) for c in cells]}"
    for c in fails:
        d = c.diagnosis
        assert d is not None and d["matched"], console_line(c)
        assert d["key"] == key, console_line(c)
        assert d["variants"][0]["name"] == key and d["nearest"] is None
        assert d["text"].startswith(f"matches the reference with {key} (") and key in console_line(c)


@pytest.mark.parametrize("oracle", ["reference", "dense"])
def test_a_correct_oracle_gets_no_diagnosis(oracle):
    cells = evaluate(CASE.replace(scale=0.1), [oracle])
    assert cells and all(c.status in ("PASS", "SKIP") for c in cells)
    assert all(c.diagnosis is None for c in cells)


def test_a_bug_that_is_no_convention_matches_nothing(planted):
    cells = [c for c in evaluate(CASE, ["bug_scale"], diagnosis_budget=120) if c.status == "FAIL"]  # scale * 1.25: no convention
    assert cells
    for c in cells:
        d = c.diagnosis
        assert d is not None and d["matched"] is False and d["key"] == "" and d["variants"] == []
        assert d["nearest"]["name"] and d["text"].startswith("no alternative convention matches")


def test_no_budget_no_diagnosis(planted):
    cells = evaluate(CASE, ["conv_window_w_plus_1"], diagnosis_budget=0)
    assert [c.status for c in cells] == ["FAIL"] and cells[0].diagnosis is None


def test_pairs_are_tried_when_no_single_knob_matches(planted):
    from nsaconf.oracles.base import Oracle, register_oracle, unregister_oracle
    from nsaconf.oracles.reference import nsa_reference

    class Lucid(Oracle):  # window w+1 and end_exclusive together: e2e o needs both knobs
        name, layer, branches, devices = "conv_pair_lucid", "e2e", ("o",), ("cpu",)

        def run(self, case, inputs, device, block_indices=None):
            return {"o": nsa_reference(case.replace(window_keys="w_plus_1", cmp_mask="end_exclusive"), inputs, dtype=None)["o"]}

    register_oracle(Lucid)
    try:
        (cell,) = evaluate(CASE, ["conv_pair_lucid"], diagnosis_budget=120)  # a loaded machine: the pairs get time
    finally:
        unregister_oracle("conv_pair_lucid")
    assert cell.status == "FAIL" and cell.diagnosis["matched"], console_line(cell)
    assert set(cell.diagnosis["key"].split(" + ")) == {"cmp_mask=end_exclusive", "window_keys=w_plus_1"}


def test_alternatives_cheapest_first_and_only_those_that_apply():
    alts = alternatives(CASE)
    assert [a.cost for a in alts] == sorted(a.cost for a in alts)
    names = {a.name for a in alts}
    assert "window_keys=w_plus_1" in names and "cmp_mask=end_inclusive" not in names
    assert not any(n.startswith("scale=") for n in names)  # no custom scale: nothing to ignore
    assert "window_keys=w_plus_1" not in {a.name for a in alternatives(CASE.replace(window=0))}
    assert {"scale=ignored_in_swa", "scale=ignored_in_slc", "scale=ignored_in_cmp"} <= {a.name for a in alternatives(CASE.replace(scale=0.1))}


def test_a_run_groups_its_failures_by_cause_on_the_console_and_in_summary_md(tmp_path, planted):
    from nsaconf.harness.cli.run import cause_lines
    from nsaconf.harness.results import ResultWriter
    from nsaconf.reports import write_reports

    with ResultWriter(tmp_path) as w:  # the records a run writes (judged in this process: quicker)
        for case in (CASE, CASE.replace(seed=4)):
            for cell in evaluate(case, ["conv_window_w_plus_1", "bug_scale", "reference"], diagnosis_budget=120):
                w.write(cell)
    lines = cause_lines(tmp_path)
    assert lines[0] == "nsaconf: 6 FAILs, 1 cause (window_keys=w_plus_1), 4 unexplained:"
    assert lines[1] == "  conv_window_w_plus_1: window_keys=w_plus_1 — 2 cells (swa_o)"
    assert lines[2] == "  bug_scale: no alternative convention matches — 4 cells (cmp_o, cmp_lse)"
    md = write_reports(tmp_path)["summary"].read_text()
    assert "6 FAILs, 1 cause (window_keys=w_plus_1), 4 unexplained; grouped by diagnosis" in md
    assert "### ❌ conv\\_window\\_w\\_plus\\_1 · window\\_keys=w\\_plus\\_1 — 2 cells (swa\\_o), 2 cases" in md
    assert md.index("window\\_keys=w\\_plus\\_1 — 2 cells") < md.index("no alternative convention matches — 4 cells")
    assert "matches the reference with window\\_keys=w\\_plus\\_1 (r " in md
    # the convention probe's finding for the oracle joins its cause
    probe = {"oracle": "conv_window_w_plus_1", "branch": "swa_o", "convention": "w_plus_1", "expected_convention": "w",
             "finding": "mismatch"}
    ok = {"oracle": "bug_scale", "branch": "cmp_o", "convention": "end_inclusive", "finding": "ok"}
    (tmp_path / "conventions.jsonl").write_text("\n".join(json.dumps(r) for r in (probe, ok)) + "\n")
    assert cause_lines(tmp_path)[1:3] == [
        "  conv_window_w_plus_1: window_keys=w_plus_1 — 2 cells (swa_o); probe: swa_o: w_plus_1 where w is expected "
        "(mismatch), agrees",
        "  bug_scale: no alternative convention matches — 4 cells (cmp_o, cmp_lse); probe: cmp_o: end_inclusive (ok)"]
    assert "- convention probe: swa\\_o: w\\_plus\\_1 where w is expected (mismatch), agrees" in \
        write_reports(tmp_path)["summary"].read_text()


def test_three_knobs_are_named_from_the_causes_of_the_other_branches(planted):
    """lucidrains' conventions on a paper case: o needs window, compression mask and group importance at once."""
    from nsaconf.oracles.base import Oracle, register_oracle, unregister_oracle
    from nsaconf.oracles.reference import nsa_reference

    lucid = dict(window_keys="w_plus_1", cmp_mask="end_exclusive", group_importance="mean_logits")

    class Triple(Oracle):
        name, layer, branches, devices = "conv_triple", "e2e", ("cmp_o", "swa_o", "slc_o", "o"), ("cpu",)

        def run(self, case, inputs, device, block_indices=None):
            return nsa_reference(case.replace(**lucid), inputs, dtype=None)

    register_oracle(Triple)
    try:
        cells = {c.branch: c for c in evaluate(CASE.replace(forced_blocks="current"), ["conv_triple"], diagnosis_budget=120)}
    finally:
        unregister_oracle("conv_triple")
    assert {b: c.diagnosis["key"] for b, c in cells.items()} == {
        "cmp_o": "cmp_mask=end_exclusive", "swa_o": "window_keys=w_plus_1", "slc_o": "group_importance=mean_logits",
        "o": "cmp_mask=end_exclusive + group_importance=mean_logits + window_keys=w_plus_1"}, \
        "\n".join(console_line(c) for c in cells.values())


def test_lucidrains_as_it_is_reads_as_its_real_causes():
    """lucidrains' module on a paper case (tests/plugins/lucidrains_native.py): the diagnosis names its window of
    w+1 keys, its end_exclusive compression, its forced current block and its group-mean importance."""
    import importlib.util

    from nsaconf.oracles.base import registry

    if importlib.util.find_spec("native_sparse_attention_pytorch") is None:
        pytest.skip("native-sparse-attention-pytorch is not installed (pip install native-sparse-attention-pytorch==0.2.3)")
    if "lucidrains_native" not in registry():
        load_plugin(PLUGINS / "lucidrains_native.py")
    paper = Case(seq_len=96, heads_q=8, heads_kv=2, head_dim=16, block_size=16, top_n=4, window=16, dtype="float32", seed=2)
    cells = {c.branch: c for c in evaluate(paper, ["lucidrains_native"], diagnosis_budget=120)}
    keys = {b: set(c.diagnosis["key"].split(" + ")) for b, c in cells.items() if c.status == "FAIL"}
    assert keys["cmp_o"] == {"cmp_mask=end_exclusive"}, console_line(cells["cmp_o"])
    assert keys["swa_o"] == {"window_keys=w_plus_1"}, console_line(cells["swa_o"])
    assert keys["slc_o"] == {"cmp_mask=end_exclusive", "forced_blocks=current", "group_importance=mean_logits"}, \
        console_line(cells["slc_o"])
    # its one free top-n slot: a pair against the compression mask measured on cmp_o also fits within ties
    assert keys["topk_idx"] == keys["slc_o"], console_line(cells["topk_idx"])
    assert keys["o"] == {"cmp_mask=end_exclusive", "window_keys=w_plus_1", "forced_blocks=current",
                         "group_importance=mean_logits"}, console_line(cells["o"])
