"""CI outputs: ``nsaconf run --junit FILE`` (one testcase per cell) and ``--require ORACLE,...``."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from nsaconf.cases.model import Case, dump_cases
from nsaconf.harness.cli import main
from nsaconf.reports.junit import render_junit, unmet_requirements
from nsaconf.reports.load import load
from tests.report_fixtures import XSS, fixture_records, write_fixture

SMALL = Case(seq_len=40, heads_q=4, heads_kv=2, head_dim=8, block_size=16, top_n=3, window=8, dtype="bfloat16", seed=2)


def _fixture(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    write_fixture(out, run_json=True)  # every status, XSS and a traceback in reasons, a malformed line
    odd = dict(fixture_records()[0], oracle="odd", status="WEIRD", reason="bell \x07 and NUL \x00 inside")
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(odd) + "\n")
    return out


def test_junit_has_one_testcase_per_cell_with_failures_errors_and_skips(tmp_path):
    res = load(_fixture(tmp_path))
    text = render_junit(res)
    root = ET.fromstring(text.encode())  # well-formed XML despite control characters and XSS in reasons
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == len(res.records) + len(res.malformed)
    by_status = {s: [r for r in res.records if r.status == s] for s in ("PASS", "FAIL", "ERROR", "CRASH", "TIMEOUT", "SKIP")}
    assert all(by_status.values())
    assert [s.get("name") for s in root.findall("testsuite")] == list(dict.fromkeys(r.oracle for r in res.records)) + ["results.jsonl"]

    def case_el(r):
        (el,) = [c for c in cases if c.get("classname") == r.oracle and c.get("name") == f"{r.case_id}.{r.branch}"]
        return el

    for r in by_status["PASS"]:
        assert list(case_el(r)) == []
    for r in by_status["FAIL"]:
        (f,) = list(case_el(r))
        assert f.tag == "failure" and f.get("type") == "FAIL" and f.get("message").startswith("FAIL: ")
        assert f"repro: nsaconf repro {r.case_id} --oracles {r.oracle} --plugin 'my plugins/nsa_x.py'" in f.text
    assert any(XSS in case_el(r)[0].text for r in by_status["FAIL"])
    for s in ("ERROR", "CRASH", "TIMEOUT"):
        for r in by_status[s]:
            (e,) = list(case_el(r))
            assert e.tag == "error" and e.get("type") == s and r.one_line_reason in e.get("message")
    for r in by_status["SKIP"]:
        (sk,) = list(case_el(r))
        assert sk.tag == "skipped" and sk.get("message") == r.one_line_reason
    (odd,) = [c for c in cases if c.get("classname") == "odd"]
    assert odd[0].tag == "error" and odd[0].get("message") == "WEIRD: bell \\x07 and NUL \\x00 inside"
    (bad,) = [c for c in cases if c.get("classname") == "results.jsonl"]
    assert bad[0].tag == "error" and bad[0].get("type") == "MALFORMED"
    n = {k: sum(1 for c in cases if c.find(k) is not None) for k in ("failure", "error", "skipped")}
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == (
        str(len(cases)), str(n["failure"]), str(n["error"]), str(n["skipped"]))
    assert render_junit(load(tmp_path / "run")) == text  # rebuilt byte-identical


def test_unmet_requirements_name_the_all_skip_and_the_absent_oracles(tmp_path):
    res = load(_fixture(tmp_path))
    unmet = unmet_requirements(res, ["reference", "fla", "dense", "tilelang", "triton_nsa"])
    assert unmet == ["triton_nsa: ran no cell (not one of this run's oracles: see --oracles and --device)"]
    only_skips = unmet_requirements(load(_skips_only(tmp_path)), ["reference"])
    assert only_skips == ["reference: all 2 cells SKIPped: needs triton (pip install triton) (2)"]


def _skips_only(tmp_path: Path) -> Path:
    out = tmp_path / "skips"
    out.mkdir()
    recs = [r for r in fixture_records() if r["oracle"] == "reference"][:2]
    (out / "results.jsonl").write_text("".join(json.dumps(dict(r, status="SKIP", reason="needs triton (pip install triton)"))
                                               + "\n" for r in recs))
    return out


def test_run_writes_junit_and_reports_and_require_fails_an_all_skip_oracle(tmp_path, capsys):
    case_file = tmp_path / "case.json"
    dump_cases([SMALL], case_file)
    out, junit = tmp_path / "out", tmp_path / "junit.xml"
    argv = ["run", "--case", str(case_file), "--oracles", "reference,fla_parallel", "--out", str(out), "--no-progress",
            "--junit", str(junit)]
    assert main(argv) == 0  # today's verdict: a SKIP is no failure
    assert {p.name for p in out.iterdir()} >= {"results.jsonl", "summary.md", "report.html"}
    root = ET.parse(junit).getroot()
    assert [(s.get("name"), s.get("tests"), s.get("skipped")) for s in root.findall("testsuite")] == [
        ("reference", "12", "0"), ("fla_parallel", "12", "12")]
    capsys.readouterr()
    assert main(argv + ["--require", "reference,fla_parallel"]) == 1
    err = capsys.readouterr().err
    assert "nsaconf: required oracle fla_parallel: all 12 cells SKIPped: " in err
    assert "required oracle reference" not in err
    assert main(argv + ["--require", "reference"]) == 0


def test_require_of_an_unknown_oracle_is_a_usage_error_before_the_run(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--case", str(Path(__file__).parents[1] / "examples" / "case.json"), "--oracles", "reference",
                 "--out", str(out), "--require", "triton_nsa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nsaconf: error: unknown oracle 'triton_nsa'")
    assert not (out / "results.jsonl").exists()
