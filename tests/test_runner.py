"""The runner end to end (worker processes): planted bugs FAIL on the right branch, an exception is
ERROR, a segfault is CRASH, a hang is TIMEOUT, the run continues after each, and --resume skips
recorded cells."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsaconf.cases.model import Case, dump_cases
from nsaconf.harness.cli import main

PLUGINS = Path(__file__).parent / "plugins"
ORACLES = "reference,bug_window,bug_scale,bug_kvmap,bad_raise,bad_crash,bad_abort,bad_hang,bad_zeros,bad_const"


def _cases() -> list[Case]:
    base = Case(seq_len=48, heads_q=4, heads_kv=2, head_dim=16, block_size=16, top_n=3, window=8, dtype="bfloat16")
    return [base.replace(seed=1), base.replace(seed=0, dtype="float32")]  # seed 1 first: crash/hang, then recovery


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner")
    dump_cases(_cases(), d / "cases.json")
    argv = ["run", "--case", str(d / "cases.json"), "--oracles", ORACLES, "--out", str(d / "out"), "--timeout", "20",
            "--plugin", str(PLUGINS / "planted_bugs.py"), "--plugin", str(PLUGINS / "misbehaving.py"),
            "--no-report", "--no-progress"]
    rc = main(argv)
    return d, argv, rc


def _cells(d: Path) -> dict[tuple[str, str, int], dict]:
    out = {}
    for line in (d / "out" / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["oracle"], r["branch"], r["case"]["seed"])] = r
    return out


def test_exit_code_and_self_contained_records(run_dir):
    d, _, rc = run_dir
    assert rc == 1
    cells = _cells(d)
    r = cells[("reference", "o", 0)]
    for key in ("case_id", "case", "oracle", "layer", "branch", "dtype", "device", "status", "reason", "metrics",
                "tolerance", "seconds", "versions", "timestamp"):
        assert key in r
    assert Case.from_dict(r["case"]).id == r["case_id"]
    assert {"python", "torch", "nsaconf"} <= set(r["versions"])
    assert {"max_abs_err", "baseline_err", "bound", "err_ratio", "rel_rms", "mismatch_frac", "worst_index"} <= set(r["metrics"])
    assert {"rule", "k", "floor", "source"} <= set(r["tolerance"])
    assert "error_map" not in r  # only a numeric FAIL carries one


def test_reference_passes_everything(run_dir):
    cells = _cells(run_dir[0])
    for seed in (0, 1):
        for br in ("cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o"):
            assert cells[("reference", br, seed)]["status"] == "PASS", cells[("reference", br, seed)]["reason"]


@pytest.mark.parametrize("oracle,branch", [("bug_window", "swa_o"), ("bug_scale", "cmp_o"), ("bug_scale", "cmp_lse"),
                                           ("bug_kvmap", "cmp_o"), ("bug_kvmap", "swa_o"), ("bad_zeros", "cmp_o"),
                                           ("bad_const", "cmp_o")])
def test_planted_bugs_fail_on_their_branch(run_dir, oracle, branch):
    cells = _cells(run_dir[0])
    for seed in (0, 1):
        r = cells[(oracle, branch, seed)]
        assert r["status"] == "FAIL", (oracle, branch, seed, r["metrics"])
        assert r["reason"]
        m = r["error_map"]  # where the error lives: err/bound per (query-position bin, head)
        assert m["rows"] == "query position p" and len(m["values"]) == len(m["row_edges"]) - 1
        assert max(v for row in m["values"] for v in row if v is not None) == pytest.approx(r["metrics"]["err_ratio"], rel=1e-2)


def test_exception_is_error_and_run_continues(run_dir):
    cells = _cells(run_dir[0])
    for seed in (0, 1):
        r = cells[("bad_raise", "cmp_o", seed)]
        assert r["status"] == "ERROR" and "planted exception" in r["reason"]


def test_segfault_is_crash_and_worker_restarts(run_dir):
    cells = _cells(run_dir[0])
    r = cells[("bad_crash", "cmp_o", 1)]
    assert r["status"] == "CRASH" and "SIGSEGV" in r["reason"]
    assert cells[("bad_crash", "cmp_o", 0)]["status"] == "PASS"


def test_abort_is_crash_every_time(run_dir):
    cells = _cells(run_dir[0])
    for seed in (0, 1):
        r = cells[("bad_abort", "cmp_o", seed)]
        assert r["status"] == "CRASH" and "SIGABRT" in r["reason"]


def test_hang_is_timeout_and_worker_restarts(run_dir):
    cells = _cells(run_dir[0])
    r = cells[("bad_hang", "cmp_o", 1)]
    assert r["status"] == "TIMEOUT" and "20" in r["reason"]
    assert cells[("bad_hang", "cmp_o", 0)]["status"] == "PASS"


def test_resume_skips_recorded_cells(run_dir):
    d, argv, _ = run_dir
    path = d / "out" / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])  # lose 3 cells, one line half-written
    rc = main(argv + ["--resume", "--oracles", "reference,bug_window,bad_raise,bad_zeros,bad_const,bug_scale,bug_kvmap,bad_crash,bad_abort,bad_hang"])
    assert rc == 1
    new = [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{") and x.endswith("}")]
    keys = [(r["case_id"], r["oracle"], r["branch"]) for r in new]
    assert len(keys) == len(set(keys)) == len(lines)  # every cell exactly once, nothing rerun twice


def test_shards_merge_to_the_full_run(run_dir, tmp_path):
    """`--shard K/N` splits the case list; `nsaconf merge` of the shards holds exactly the full run's cells
    with the same verdicts, and writes the reports."""
    d, _, _ = run_dir
    base = ["run", "--case", str(d / "cases.json"), "--oracles", "reference,bug_window", "--timeout", "20",
            "--plugin", str(PLUGINS / "planted_bugs.py"), "--no-report", "--no-progress"]
    for k in (0, 1):
        assert main(base + ["--shard", f"{k}/2", "--out", str(tmp_path / f"s{k}")]) == 1  # bug_window FAILs
    shard_cases = [{json.loads(x)["case_id"] for x in (tmp_path / f"s{k}" / "results.jsonl").read_text().splitlines()}
                   for k in (0, 1)]
    assert len(shard_cases[0]) == len(shard_cases[1]) == 1 and not shard_cases[0] & shard_cases[1]
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0  # merge itself succeeded
    merged = {(r["case_id"], r["oracle"], r["branch"]): r["status"]
              for r in map(json.loads, (tmp_path / "m" / "results.jsonl").read_text().splitlines())}
    from nsaconf.harness.results import iter_records  # the module's run dir may hold the resume test's torn line

    full = {(r["case_id"], r["oracle"], r["branch"]): r["status"]
            for r in iter_records(d / "out") if r["oracle"] in ("reference", "bug_window")}
    assert merged == full
    assert (tmp_path / "m" / "report.html").exists()
    assert json.loads((tmp_path / "m" / "run.json").read_text())["n_cases"] == 2


@pytest.mark.parametrize("bad", ["2/2", "a/b", "1", "0/0", "-1/3"])
def test_bad_shard_is_one_line_exit_2(bad, capsys, tmp_path):
    assert main(["run", "--shard", bad, "--oracles", "reference", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shard" in err[0]


def test_merge_of_a_missing_dir_is_one_line_exit_2(capsys, tmp_path):
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "nothing")]) == 2
    assert "results.jsonl" in capsys.readouterr().err
