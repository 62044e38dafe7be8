"""Report writers on a fixture results.jsonl: content, escaping, determinism, bad input."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from nsaconf.reports import ReportError, write_reports
from nsaconf.reports.load import load
from nsaconf.reports.markdown import md_escape
from tests.report_fixtures import XSS, fixture_records, write_fixture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    write_fixture(tmp_path / "run")
    return tmp_path / "run"


def _expected_cells() -> dict[tuple, dict]:
    """Unique cells of the fixture (the duplicate and the truncated line excluded)."""
    return {(r["case_id"], r["oracle"], r["branch"], r["dtype"], r["device"]): r for r in fixture_records()}


def test_writes_three_files_and_rebuild_is_byte_identical(run_dir: Path, tmp_path: Path) -> None:
    paths = write_reports(run_dir)
    assert set(paths) == {"summary", "csv", "html"}
    first = {k: p.read_bytes() for k, p in paths.items()}
    assert all(first.values())
    again = write_reports(run_dir)
    assert {k: p.read_bytes() for k, p in again.items()} == first
    # another directory with the same results.jsonl: same bytes (no path, host or time of the rebuild)
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(run_dir / "results.jsonl", other / "results.jsonl")
    assert {k: p.read_bytes() for k, p in write_reports(other).items()} == first


def test_rebuild_ignores_line_order(run_dir: Path, tmp_path: Path) -> None:
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    body, dup, tail = lines[1:-1], lines[0], lines[-1]
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    (shuffled / "results.jsonl").write_text("\n".join([dup] + body[::-1] + [tail]) + "\n")
    a, b = write_reports(run_dir), write_reports(shuffled)
    for k in ("summary", "csv"):
        assert a[k].read_bytes() == b[k].read_bytes(), k
    # the HTML also names the malformed line's number, which moved; everything else is the same
    strip = lambda t: re.sub(rb"line \d+", b"line N", t)  # noqa: E731
    assert strip(a["html"].read_bytes()) == strip(b["html"].read_bytes())


def test_summary_totals_layers_failures_and_skips(run_dir: Path) -> None:
    md = write_reports(run_dir)["summary"].read_text()
    cells = list(_expected_cells().values())
    n = {s: sum(r["status"] == s for r in cells) for s in ("PASS", "FAIL", "SKIP", "ERROR", "CRASH", "TIMEOUT")}
    assert f"**Verdict: ❌ FAIL** — {len(cells)} cells, {n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP, " \
           f"{n['ERROR']} ERROR, {n['CRASH']} CRASH, {n['TIMEOUT']} TIMEOUT" in md
    for title in ("## L0 · reference", "## L1 · kernel", "## L2 · end-to-end"):
        assert title in md
    bad = [r for r in cells if r["status"] in ("FAIL", "ERROR", "CRASH", "TIMEOUT")]
    assert f"## Failures ({len(bad)})" in md
    for r in bad:
        assert f"nsaconf repro {r['case_id']} --oracles {r['oracle']}" in md
    # the traceback's last line is the one-line reason
    assert "RuntimeError: TileLang kernel needs head\\_dim % 16 == 0" in md
    # skips grouped by reason with counts
    assert "| dense | dense brute force is limited to seq\\_len \\<= 512 (got 1024) | 5 | 1 |" in md
    assert "| tilelang | needs CUDA: set --device cuda on a GPU machine | 4 | 4 |" in md
    # malformed line reported, not silently dropped
    assert "1 malformed line(s)" in md
    # the table row with the L1 fla FAIL shows the worst ratio
    assert "❌ FAIL r 7.5" in md


def test_summary_escapes_markdown_and_html(run_dir: Path) -> None:
    md = write_reports(run_dir)["summary"].read_text()
    assert "<script>" not in md
    assert "\\<script\\>alert(1)\\</script\\>" in md
    assert md_escape("a|b\nc <i>") == "a\\|b c \\<i\\>"


def test_unknown_layer_heading_and_backticks_in_names_stay_in_their_markdown(tmp_path: Path) -> None:
    rec = dict(fixture_records()[0], layer="x <img src=y> ## z", oracle="a``b`c", status="FAIL", reason="r")
    (tmp_path / "results.jsonl").write_text(json.dumps(rec) + "\n")
    md = write_reports(tmp_path)["summary"].read_text()
    assert not re.search(r"(?<!\\)<img", md)
    assert "## layer 'x \\<img src=y\\> \\#\\# z' (unknown)" in md.splitlines()
    # a code span's fence is longer than any run of backticks inside it
    assert f"  ``` nsaconf repro {rec['case_id']} --oracles 'a``b`c' ```" in md.splitlines()


def test_pipes_in_reasons_do_not_break_tables(tmp_path: Path) -> None:
    rec = dict(fixture_records()[0], status="SKIP", reason="needs a | b\nsecond line")
    (tmp_path / "results.jsonl").write_text(json.dumps(rec) + "\n")
    md = write_reports(tmp_path)["summary"].read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "needs a" in ln]
    assert rows == ["| reference | needs a \\| b … | 1 | 1 |"]
    assert len(re.findall(r"(?<!\\)\|", rows[0])) == 5


def test_csv_has_one_row_per_cell_and_flat_metrics(run_dir: Path) -> None:
    df = pd.read_csv(write_reports(run_dir)["csv"])
    cells = _expected_cells()
    assert len(df) == len(cells)
    for col in ("case_id", "oracle", "layer", "branch", "dtype", "device", "status", "reason", "group",
                "metric.err_ratio", "metric.max_abs_err", "metric.worst_index", "tolerance.rule", "case.seq_len"):
        assert col in df.columns, col
    assert df["status"].value_counts().to_dict() == pd.Series([r["status"] for r in cells.values()]).value_counts().to_dict()
    fail = df[(df.oracle == "fla") & (df.status == "FAIL")]
    assert (fail["metric.err_ratio"] == 7.5).all() and (fail["metric.worst_index"] == "0,17,3").all()
    assert (df[df.oracle == "nsa_impl"]["metric.err_ratio"] == float("inf")).any()
    assert XSS in set(df["reason"].dropna())  # the CSV keeps the raw text


def test_duplicate_cell_last_record_wins(run_dir: Path) -> None:
    res = load(run_dir)
    assert res.duplicates == 1
    first = fixture_records()[0]
    rec = next(r for r in res.records if r.case_id == first["case_id"] and r.oracle == first["oracle"]
               and r.branch == first["branch"])
    assert rec.status == "PASS"
    assert [n for n, _ in res.malformed] == [len(fixture_records()) + 2]


def test_html_escapes_every_result_string(run_dir: Path) -> None:
    html = write_reports(run_dir)["html"].read_text()
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &#34;quotes&#34; | pipes" in html
    assert "&lt;and&gt; {braces}" in html
    assert html.count("<script") == 1  # only the report's own inline script


def test_html_is_self_contained(run_dir: Path) -> None:
    html = write_reports(run_dir)["html"].read_text()
    assert not re.search(r"https?://", html)
    for attr in re.findall(r'\b(?:src|href|action|srcset|poster)\s*=\s*"([^"]*)"', html):
        assert attr.startswith("#"), attr
    assert "@import" not in html and "url(" not in html and "<link" not in html


def test_html_layers_matrices_drilldowns(run_dir: Path) -> None:
    html = write_reports(run_dir)["html"].read_text()
    for key in ("L0", "L1", "L2"):
        assert f'id="layer-{key}"' in html
    cells = _expected_cells().values()
    bad = [r for r in cells if r["status"] in ("FAIL", "ERROR", "CRASH", "TIMEOUT")]
    assert html.count('<details class="drill') == len(bad)
    for r in bad:
        assert f"nsaconf repro {r['case_id']} --oracles {r['oracle']}" in html
    assert 'data-status="FAIL"' in html and "worst (b, pos, head) (0, 17, 3)" in html
    assert 'id="support"' in html and "FLA needs HQ/H a power of 2 &gt;= 16 (got 2)" in html
    assert 'id="tolerance"' in html
    assert "err &lt;= 2*baseline_err + floor (2*noise@0.3+0)" in html and "err &lt;= 1e-05*max(1,max|truth|)" in html
    assert "override fla.slc_o.k (--tol)" in html
    assert "8.000e-03 … 1.200e-02" in html  # floor range over the cells of one rule
    assert 'id="environment"' in html and "2.13.0+cpu" in html
    # a failing matrix cell links to its first drill-down
    assert re.search(r'<td class="mx st-fail"[^>]*>\s*<a href="#cell-\d+">', html)
    # no bench.jsonl: no performance section; conventions section says why it is empty
    assert 'id="performance"' not in html
    assert "No convention-probe data in this run (conventions.jsonl is absent)." in html


def test_empty_layer_is_shown_not_hidden(tmp_path: Path) -> None:
    recs = [r for r in fixture_records() if r["layer"] == "reference"]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths = write_reports(tmp_path)
    html, md = paths["html"].read_text(), paths["summary"].read_text()
    assert "No L2 · end-to-end oracle produced results in this run." in html
    assert "No L1 · kernel oracle produced results in this run." in md
    assert "Verdict: ✅ PASS" in md
    assert 'id="verdict">PASS<' in html


@pytest.mark.parametrize("lines, verdict", [([], "NO RESULTS"), (["SKIP"], "ALL SKIPPED"),
                                            (["PASS", "SKIP"], "PASS"), (["PASS", "TIMEOUT"], "FAIL")])
def test_verdict(tmp_path: Path, lines: list[str], verdict: str) -> None:
    base = fixture_records()[:len(lines)]
    recs = [dict(r, status=s, reason="why" if s != "PASS" else None) for r, s in zip(base, lines)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = write_reports(tmp_path)["summary"].read_text()
    assert f"**Verdict: " in md and f" {verdict}** —" in md


def test_run_json_environment_and_tolerance_table(tmp_path: Path) -> None:
    write_fixture(tmp_path, run_json=True)
    html = write_reports(tmp_path)["html"].read_text()
    assert "From run.json." in html
    assert "2 cores &lt;fake&gt;" in html
    assert "Configured table (run.json)" in html and "gradients &lt;grad&gt;" in html
    assert '<td class="mono">--tol</td>' in html  # the override row
    assert "nsaconf run --profile ci --out run" in html
    assert "dense, fla, nsa_impl, reference, tilelang" in html
    assert "fla-core (from records)" in html  # versions only the records carry are still shown
    # repro commands carry the run's plugins and tolerance overrides (quoted where the shell needs it)
    assert "--oracles fla --plugin &#39;my plugins/nsa_x.py&#39; --tol fla.slc_o.k=2.0</code>" in html
    md = (tmp_path / "summary.md").read_text()
    assert "--oracles fla --plugin 'my plugins/nsa_x.py' --tol fla.slc_o.k=2.0`" in md


def test_run_json_other_tolerance_forms(tmp_path: Path) -> None:
    write_fixture(tmp_path, run_json=True)
    info = json.loads((tmp_path / "run.json").read_text())
    info["tolerance"] = [{"branch": "*_o", "k": 2}, {"branch": "d*", "k": 3, "note": "<x>"}]
    (tmp_path / "run.json").write_text(json.dumps(info))
    html = write_reports(tmp_path)["html"].read_text()
    assert "<th>branch</th><th>k</th><th>note</th>" in html and "&lt;x&gt;" in html
    info["tolerance"] = "k=2 everywhere <b>"
    (tmp_path / "run.json").write_text(json.dumps(info))
    html = write_reports(tmp_path)["html"].read_text()
    assert "&#34;k=2 everywhere &lt;b&gt;&#34;" in html


def test_side_sections_rendered_or_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fixture(tmp_path, side_files=True)
    conv = types.ModuleType("nsaconf.reports.conventions")
    conv.render_conventions_section = lambda recs: f'<div id="conv-ok">{len(recs)} convention record(s)</div>'
    monkeypatch.setitem(sys.modules, "nsaconf.reports.conventions", conv)
    monkeypatch.setitem(sys.modules, "nsaconf.reports.performance", None)  # import fails: must be said, not hidden
    html = write_reports(tmp_path)["html"].read_text()
    assert '<div id="conv-ok">2 convention record(s)</div>' in html
    assert 'id="performance"' in html
    assert "bench.jsonl holds 1 record(s), but reports/performance.py:render_performance_section is not available" in html

    def boom(recs: list) -> str:
        raise ValueError("bad <record>")
    conv.render_conventions_section = boom
    html = write_reports(tmp_path)["html"].read_text()
    assert "reports/conventions.py:render_conventions_section failed on 2 record(s) of conventions.jsonl: " \
           "ValueError: bad &lt;record&gt;" in html


def test_missing_results_is_one_line_error_exit_2(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="cannot read results file"):
        write_reports(tmp_path / "nope")
    p = subprocess.run([sys.executable, "-m", "nsaconf", "report", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("nsaconf: error: ") and "results.jsonl' does not exist" in p.stderr


def test_reports_import_is_cheap() -> None:
    code = ("import sys, nsaconf.reports, nsaconf.reports.html, nsaconf.reports.markdown; print(sorted(m for m in "
            "('torch', 'nsaconf.cases.model', 'nsaconf.oracles', 'nsaconf.harness') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"


def test_records_written_by_the_engine_writer(tmp_path: Path) -> None:
    """Schema check against the engine's own writer (strict JSON: inf/nan become strings)."""
    results = pytest.importorskip("nsaconf.harness.results", reason="the engine's harness/results.py is not in this tree")
    with results.ResultWriter(tmp_path) as w:
        for r in fixture_records():
            m = {k: (float(v) if v in ("inf", "-inf", "nan") else v) for k, v in r["metrics"].items()}
            w.write(results.CellResult.from_dict(dict(r, metrics=m, reason=r["reason"] or "")))
    res = load(tmp_path)
    assert not res.malformed and len(res.records) == len(_expected_cells())
    xss = next(r for r in res.records if r.reason == XSS)
    assert xss.err_ratio == float("inf") and xss.status == "FAIL"
    md = write_reports(tmp_path)["summary"].read_text()
    assert "❌ FAIL r inf" in md and "(r inf)" in md


def test_minimal_and_unknown_records_still_render(tmp_path: Path) -> None:
    """Only case_id/oracle/status are required; an unknown status is shown (and counts as bad)."""
    recs = [{"case_id": "c1", "oracle": "x", "status": "PASS"},
            {"case_id": "c2", "oracle": "x", "status": "WEIRD", "reason": None, "metrics": None},
            {"case_id": "c3", "oracle": "y", "layer": "custom", "status": "FAIL", "metrics": {"err_ratio": "nan"}},
            [1, 2], {"oracle": "no id", "status": "PASS"}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths = write_reports(tmp_path)
    md, html = paths["summary"].read_text(), paths["html"].read_text()
    assert "**Verdict: ❌ FAIL** — 3 cells" in md and ", 1 WEIRD" in md
    assert "line 4: a JSON list, not an object" in md and "line 5: missing field(s) case\\_id" in md
    assert "layer &#39;custom&#39; (unknown)" in html and "st-unknown" in html
    assert "❌ FAIL r nan" in md


def test_fail_drill_shows_where_the_error_lives(run_dir: Path) -> None:
    """Each numeric FAIL's error_map is drawn (inline SVG, axes named) with its one-line reading."""
    html = write_reports(run_dir)["html"].read_text()
    fails = [r for r in _expected_cells().values() if r["status"] == "FAIL"]
    assert fails and html.count("<svg class='errmap'") == len(fails)
    assert "query position p ↓</text>" in html and "head →</text>" in html
    assert "over the bound: query position p 32 … 127; all 16 heads; within it before p = 32" in html
    assert "NaN/Inf in " in html  # the nsa_impl FAIL's err/bound is inf from p = 32 on
    assert "err / bound" in html  # the legend
    assert html.count("<span class='strip'") == len(fails)  # the sparkline on each summary line
    # the picture follows the data: errors from p = 64 on read so
    from nsaconf.reports.error_map import reading
    emap = fails[0]["error_map"]
    late = dict(emap, values=[[0.2] * 16 if lo < 64 else [5.0] * 16 for lo in emap["row_edges"][:-1]])
    assert reading(late).startswith("over the bound: query position p 64 … 127; all 16 heads")
    assert reading({"values": "junk"}) == "no error map"


def test_failures_grouped_by_diagnosis_link_their_convention_finding(tmp_path: Path) -> None:
    write_fixture(tmp_path, side_files=True, diagnosis=True)
    html = write_reports(tmp_path)["html"].read_text()
    # the headline of summary.md and the console: diagnosed causes, FAILs no convention explains, other statuses
    head = re.search(r'<h3 class="causes-head">([^<]*)</h3>', html).group(1)
    assert head.startswith("4 FAILs, 1 cause") and head.endswith("1 unexplained, 1 CRASH, 2 ERROR, 1 TIMEOUT")
    assert 'id="causes"' in html
    titles = re.findall(r'<div class="cause" id="(cause-\d+)">\s*<h3>([^<]*) <span class="cause-n">· ([^ ]+) · (\d+) cell', html)
    assert [t[1:] for t in titles] == [("window_keys=w_plus_1", "fla", "3"), ("no alternative convention matches", "nsa_impl", "1"),
                                       ("not diagnosed", "tilelang", "3"), ("not diagnosed", "nsa_impl", "1")]
    # the fla cause links to the probe's heat-maps of fla swa_o (w+1 keys), which exist under that id
    assert '<a href="#conv-fla-swa_o">fla · swa_o: w_plus_1 where w is expected (mismatch), agrees</a>' in html
    # the first failure open is the first of the first cause (a fla FAIL), no other
    assert re.findall(r'<details class="drill[^>]*data-oracle="(\w+)"[^>]* open>', html) == ["fla"]
    assert "id='conv-fla-swa_o'" in html
    assert "112 extra at s = p − 16 (p 16 … 127)" in html  # the one-key difference said in words
    assert html.count("matches the reference with window_keys=w_plus_1 (r 0.08)") >= 3  # next to each failure
    assert "<script>alert(1)" not in html and html.count("<script") == 1
    assert html.count("Conventions</h2>") == 1  # one heading for the section


def test_failures_without_diagnosis_are_listed_as_before(run_dir: Path) -> None:
    html = write_reports(run_dir)["html"].read_text()
    assert 'id="causes"' not in html and '<div class="cause"' not in html
    assert "<h3>Diagnosis</h3>" not in html


def test_failure_groups_helper() -> None:
    from nsaconf.reports.load import CellRecord
    from nsaconf.reports.tables import failure_groups, join_findings

    base = {"case_id": "c", "oracle": "x", "status": "FAIL", "branch": "swa_o"}
    recs = [CellRecord.from_json(dict(base, case_id=f"c{i}", diagnosis={"key": k, "text": k}))
            for i, k in enumerate(["a", "b", "a", ""])] + [CellRecord.from_json(dict(base, status="ERROR"))]
    groups = failure_groups(recs)
    assert [(g.key, len(g.records)) for g in groups] == [("a", 2), ("b", 1), ("", 1), (None, 1)]
    assert failure_groups([recs[-1]]) == []  # nothing diagnosed: no groups
    conv = [{"oracle": "x", "branch": "cmp_o", "finding": "ok"}, {"oracle": "x", "branch": "swa_o", "finding": "mismatch"},
            {"oracle": "y", "branch": "swa_o", "finding": "leak"}]
    assert join_findings("x", ["swa_o"], conv) == [conv[1]]
    assert join_findings("x", ["slc_o"], conv) == [conv[1]]  # the oracle's other finding that is not ok
    assert join_findings("x", ["cmp_o"], conv[:1]) == conv[:1]  # only ok ones: those of the branch


def test_error_maps_are_capped_and_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_ERROR_MAPS drill-downs a map is read out, not drawn (the first of each cause still is);
    hostile axis names and values stay text."""
    from nsaconf.reports import html as report_html
    from nsaconf.reports.error_map import svg

    monkeypatch.setattr(report_html, "MAX_ERROR_MAPS", 1)
    write_fixture(tmp_path, diagnosis=True)
    html = write_reports(tmp_path)["html"].read_text()
    fails = [r for r in _expected_cells().values() if r["status"] == "FAIL"]
    # drawn: the first drill-down (a fla FAIL) and the first of the nsa_impl cause; not the other two fla FAILs
    assert len(fails) == 4 and html.count("<svg class='errmap'") == 2
    assert html.count("(drawn for the first 1 failures and the first of each cause") == 2
    assert html.count("over the bound: query position p 32 … 127") == 4  # every one is read out
    hostile = svg({"rows": XSS, "cols": "<b>", "row_edges": [0, 1, 2], "values": [[XSS, "inf"], [None, 2.0]]}, XSS)
    assert "<script" not in hostile and "<b>" not in hostile and "&lt;script&gt;" in hostile
    assert svg({"row_edges": [0], "values": []}) == "<p class='note'>(no error map recorded)</p>"
