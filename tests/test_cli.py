"""The command line: bad input exits 2 with one line; list, repro, report, --save-tensors, the
README's plugin example."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsaconf.cases.model import Case, dump_cases
from nsaconf.harness.cli import main

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).parent / "plugins"
SMALL = Case(seq_len=40, heads_q=4, heads_kv=2, head_dim=8, block_size=16, top_n=3, window=8, dtype="bfloat16", seed=2)


@pytest.fixture
def case_file(tmp_path):
    p = tmp_path / "case.json"
    dump_cases([SMALL], p)
    return p


def _bad(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("nsaconf: error: "), err
    return err[0]


def test_bad_inputs_exit_2_with_one_line(capsys, tmp_path, case_file):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"seq_len": 10, ')
    assert "malformed case JSON" in _bad(capsys, ["run", "--case", str(bad_json), "--out", str(tmp_path / "o")])
    bad_field = tmp_path / "field.json"
    bad_field.write_text(json.dumps({"seq_len": 10, "heads_q": 3, "heads_kv": 2}))
    assert "heads_kv" in _bad(capsys, ["run", "--case", str(bad_field), "--out", str(tmp_path / "o")])
    assert "No such file" in _bad(capsys, ["run", "--case", str(tmp_path / "nope.json")])
    assert "unknown oracle 'nope'" in _bad(capsys, ["run", "--case", str(case_file), "--oracles", "nope"])
    assert "failed to import" in _bad(capsys, ["run", "--case", str(case_file), "--plugin", str(PLUGINS / "broken_plugin.py")])
    assert "failed to import" in _bad(capsys, ["list", "--plugin", str(PLUGINS / "broken_plugin.py")])
    assert "tolerance" in _bad(capsys, ["run", "--case", str(case_file), "--tol", "bogus=1"])
    assert "unknown dtype" in _bad(capsys, ["run", "--case", str(case_file), "--dtype", "fp8"])
    assert "profile" in _bad(capsys, ["run", "--profile", "huge"])
    assert "--device" in _bad(capsys, ["run", "--case", str(case_file), "--device", "tpu"])
    assert "not a case id" in _bad(capsys, ["repro", "not-a-case", "--oracles", "reference"])
    assert _bad(capsys, ["frobnicate"])


def test_exit_code_2_from_the_console(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    p = subprocess.run([sys.executable, "-m", "nsaconf", "run", "--case", str(bad)], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2 and p.stderr.strip().startswith("nsaconf: error:") and len(p.stderr.strip().splitlines()) == 1


def test_list_shows_availability_and_plugins(capsys):
    assert main(["list", "--plugin", str(ROOT / "oracles" / "plugin_example.py")]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "my_sdpa_window" in out and "available" in out
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for r in rows:
        assert r["available"] or r["unavailable_reason"]


def test_run_save_tensors_report_rebuild_and_repro(tmp_path, case_file, capsys):
    out = tmp_path / "out"
    rc = main(["run", "--case", str(case_file), "--oracles", "reference", "--out", str(out), "--save-tensors", "--no-progress"])
    assert rc == 0
    t = out / "tensors" / SMALL.id
    assert (t / "inputs.pt").exists() and (t / "reference.pt").exists() and (t / "oracles" / "reference.pt").exists()
    truth = torch.load(t / "reference.pt")
    assert truth["o"].dtype == torch.float64 and set(truth) >= {"cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o"}
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["tolerance"]["defaults"]["k"] == 2.0
    # report rebuild from results.jsonl is identical
    produced = {p.name: p.read_bytes() for p in out.iterdir() if p.name in ("summary.md", "results.csv", "report.html")}
    assert set(produced) == {"summary.md", "results.csv", "report.html"}
    for p in produced:
        (out / p).unlink()
    assert main(["report", str(out)]) == 0
    assert {p: (out / p).read_bytes() for p in produced} == produced
    # repro by id
    capsys.readouterr()
    assert main(["repro", SMALL.id, "--oracles", "reference"]) == 0
    text = capsys.readouterr().out
    assert SMALL.id in text and "PASS" in text and "slc_o" in text
    assert main(["repro", SMALL.id, "--oracles", "bug_window", "--plugin", str(PLUGINS / "planted_bugs.py")]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_tol_override_is_recorded_and_changes_the_verdict(tmp_path, case_file):
    out = tmp_path / "o2"
    argv = ["run", "--case", str(case_file), "--oracles", "bug_window", "--plugin", str(PLUGINS / "planted_bugs.py"),
            "--out", str(out), "--no-progress", "--no-report"]
    assert main(argv) == 1
    assert main(argv + ["--tol", "bug_window.swa_o.floor_add=10", "--tol", "bug_window.nontrivial=1e9"]) == 0
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert "cli" in rec["tolerance"]["source"] and rec["tolerance"]["floor_add"] == 10


def test_plugin_example_loads_and_passes(tmp_path):
    rc = main(["run", "--plugin", str(ROOT / "oracles" / "plugin_example.py"), "--oracles", "my_sdpa_window",
               "--case", str(ROOT / "examples" / "case.json"), "--out", str(tmp_path / "pe"), "--no-progress", "--no-report"])
    assert rc == 0
    rec = json.loads((tmp_path / "pe" / "results.jsonl").read_text().splitlines()[0])
    assert rec["oracle"] == "my_sdpa_window" and rec["branch"] == "swa_o" and rec["status"] == "PASS"


def test_dtype_and_seed_expand_cases(tmp_path, case_file):
    from nsaconf.harness.cli import build_parser
    from nsaconf.harness.cli.common import select_cases as _select_cases

    args = build_parser().parse_args(["run", "--case", str(case_file), "--dtype", "fp16,fp32", "--seed", "9"])
    cs = _select_cases(args)
    assert [(c.dtype, c.seed) for c in cs] == [("float16", 9), ("float32", 9)]
    args = build_parser().parse_args(["run", "--profile", "smoke", "--seed", "3"])
    assert [c.seed for c in _select_cases(args)][:2] == [3, 4]


def test_new_plugin_writes_the_shipped_example_and_it_runs(tmp_path, capsys):
    target = tmp_path / "mine.py"
    assert main(["new-plugin", str(target)]) == 0
    assert target.read_text() == (ROOT / "oracles" / "plugin_example.py").read_text()
    assert main(["new-plugin", str(target)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
    assert main(["list", "--plugin", str(target)]) == 0
    assert "my_sdpa_window" in capsys.readouterr().out


def test_version_and_one_line_usage_errors(capsys):
    import nsaconf

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"nsaconf {nsaconf.__version__}"
    for argv in (["run", "--device", "tpu"], ["run", "--bogus"], ["repro", "x"], ["masks", "--branch", "nope"],
                 ["run", "--oracles", "no_such_oracle"], ["report", "/nonexistent/dir"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("nsaconf: error: ") and err.count("\n") == 1, (argv, err)


def test_python_api_run_and_evaluate(tmp_path):
    import nsaconf

    case = nsaconf.Case(seq_len=40, heads_q=4, heads_kv=1, head_dim=8, block_size=8, top_n=3, window=8, dtype="float64")
    cells = nsaconf.evaluate(case, ["reference", "dense"])
    assert {c.status for c in cells} == {"PASS"} and {c.oracle for c in cells} == {"reference", "dense"}
    summary = nsaconf.run([case], ["dense"], out=tmp_path / "r")
    assert summary.ok and summary.counts == {"PASS": 6}
    assert [c.status for c in nsaconf.load_results(tmp_path / "r")] == ["PASS"] * 6
    assert nsaconf.write_reports(tmp_path / "r")["html"].exists()
