"""Hostile use of the command line: a run folder has one owner at a time and keeps every earlier result;
a bad --out, --timeout, record, case selection or device is one line and exit 2, never a traceback; the
verdict of `nsaconf run` comes from the cells, as the reports read them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsaconf.cases.model import Case, dump_cases
from nsaconf.cases.vocabulary import ALL_BRANCHES
from nsaconf.harness.cli import main
from nsaconf.harness.results import CellResult

SMALL = Case(seq_len=40, heads_q=4, heads_kv=2, head_dim=8, block_size=16, top_n=3, window=8, dtype="float32", seed=2)
#: holds DIR's lock in another process until its stdin closes
HOLDER = ("import sys\nfrom nsaconf.harness.results import owned_run_folder\n"
          "with owned_run_folder(sys.argv[1], 'nsaconf run --the-other-one'):\n"
          "    print('held', flush=True)\n    sys.stdin.read()\n")


@pytest.fixture
def case_file(tmp_path: Path) -> Path:
    p = tmp_path / "case.json"
    dump_cases([SMALL], p)
    return p


def _bad(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("nsaconf: error: "), (rc, err)
    return err[0]


def _record(status: str = "PASS", branch: str = "o", **kw) -> dict:
    rec = json.loads(CellResult(case_id=SMALL.id, case=SMALL.to_dict(), oracle="reference", layer="reference",
                                branch=branch, dtype=SMALL.dtype, device="cpu", status="PASS").to_json())
    return {**rec, "status": status, **kw}


def _write_done_run(out: Path, extra: list = ()) -> None:
    """DIR/results.jsonl with every cell of SMALL x reference PASSed, then the ``extra`` lines."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(_record(branch=b)) for b in ALL_BRANCHES] + [json.dumps(x) for x in extra]
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")


def _resume(case_file: Path, out: Path) -> list[str]:
    return ["run", "--case", str(case_file), "--oracles", "reference", "--out", str(out), "--resume",
            "--no-report", "--no-progress"]


# ---------------------------------------------------------------------------------------- run folders
@pytest.mark.parametrize("command", ["resume", "merge"])
def test_a_run_folder_in_use_is_refused_naming_the_other_run(command, capsys, tmp_path, case_file):
    out = tmp_path / "out"
    _write_done_run(out)
    _write_done_run(tmp_path / "shard")
    before = (out / "results.jsonl").read_bytes()
    argv = _resume(case_file, out) if command == "resume" else ["merge", str(out), str(tmp_path / "shard")]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        msg = _bad(capsys, argv)
        assert "is in use by another nsaconf run" in msg and f"pid {holder.pid} " in msg and "--the-other-one" in msg
        assert (out / "results.jsonl").read_bytes() == before
    finally:
        holder.kill()  # a killed owner releases the folder
        holder.wait()
    assert main(argv) == 0
    assert not (out / ".nsaconf.lock").exists()


def test_fresh_runs_and_merges_keep_every_earlier_result(tmp_path, case_file):
    out = tmp_path / "out"
    _write_done_run(out)
    (out / "results.jsonl.prev").write_text("older\n")
    (out / "run.json").write_text('{"command": "old"}\n')
    (out / "conventions.jsonl").write_text('{"oracle": "old"}\n')
    old = {f: (out / f).read_text() for f in ("results.jsonl", "run.json", "conventions.jsonl")}
    main(["run", "--case", str(case_file), "--oracles", "reference", "--out", str(out), "--no-report", "--no-progress"])
    assert (out / "results.jsonl.prev").read_text() == "older\n"
    assert {f: (out / (f + ".prev2")).read_text() for f in old} == old  # the run's files, moved together
    assert not (out / "conventions.jsonl").exists()  # the new run has no probe: no stale one beside its results
    assert json.loads((out / "run.json").read_text())["command"] != "old"

    shard, merged = tmp_path / "shard", tmp_path / "merged"
    _write_done_run(shard)
    assert main(["merge", str(merged), str(shard)]) == 0
    first = (merged / "results.jsonl").read_text()
    assert main(["merge", str(merged), str(shard), str(merged)]) == 0  # OUT is also an input
    assert (merged / "results.jsonl.prev").read_text() == first


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_bad_out_is_one_line_before_anything_is_written(where, capsys, tmp_path, case_file):
    f = tmp_path / "f"
    f.write_text("keep me")
    out = {"a file": f, "under a file": f / "sub", "unwritable": Path("/sys")}[where]
    if where == "unwritable" and not out.is_dir():
        pytest.skip("needs a directory this user cannot write")
    _bad(capsys, ["run", "--case", str(case_file), "--oracles", "reference", "--out", str(out), "--no-progress"])
    assert f.read_text() == "keep me"


# ---------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("value", ["inf", "nan"])
@pytest.mark.parametrize("command", ["run", "repro", "masks"])
def test_timeout_must_be_finite(command, value, capsys, tmp_path, case_file):
    empty = tmp_path / "probe.jsonl"
    empty.write_text("")
    argv = {"run": ["run", "--case", str(case_file), "--oracles", "reference", "--out", str(tmp_path / "out")],
            "repro": ["repro", str(case_file), "--oracles", "reference"],
            "masks": ["masks", "--from-json", str(empty)]}[command]
    assert "--timeout" in _bad(capsys, argv + ["--timeout", value])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["[]", '{"cases": []}', "shard"])
def test_an_empty_case_selection_is_exit_2(content, capsys, tmp_path, case_file):
    argv = ["run", "--oracles", "reference", "--out", str(tmp_path / "out"), "--no-progress"]
    if content == "shard":
        argv += ["--case", str(case_file), "--shard", "1/2"]
    else:
        (tmp_path / "empty.json").write_text(content)
        argv += ["--case", str(tmp_path / "empty.json")]
    assert "case" in _bad(capsys, argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["run", "repro"])
def test_device_cuda_without_cuda_is_refused_up_front(command, capsys, tmp_path, case_file):
    argv = {"run": ["run", "--case", str(case_file), "--out", str(tmp_path / "out")],
            "repro": ["repro", str(case_file)]}[command]
    msg = _bad(capsys, argv + ["--oracles", "reference", "--device", "cuda"])
    assert msg == "nsaconf: error: --device cuda but torch sees no CUDA device"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- records
NOT_RECORDS = [None, [], 5, "text", {"oracle": "reference", "branch": "o", "status": "PASS"},
               {"case_id": None, "oracle": "reference", "status": "PASS"}]


def test_merge_and_resume_skip_lines_that_are_not_records(capsys, tmp_path, case_file):
    out = tmp_path / "out"
    _write_done_run(out, NOT_RECORDS)
    assert main(["merge", str(tmp_path / "merged"), str(out)]) == 0
    err = capsys.readouterr().err
    assert f"skipped {len(NOT_RECORDS)} line(s)" in err
    assert len((tmp_path / "merged" / "results.jsonl").read_text().splitlines()) == len(ALL_BRANCHES)
    assert main(_resume(case_file, out)) == 0
    assert f"{len(NOT_RECORDS)} malformed line(s) not counted" in capsys.readouterr().out


@pytest.mark.parametrize("statuses, rc", [(["FAIL", "PASS"], 0), (["PASS", "WEIRD"], 1)])
def test_run_verdict_counts_cells_the_last_record_winning(statuses, rc, capsys, tmp_path, case_file):
    """A cell recorded twice (a resumed run) is judged by its last record, and an unknown status is bad."""
    out = tmp_path / "out"
    _write_done_run(out, [_record(s, branch="o") for s in statuses])
    assert main(_resume(case_file, out)) == rc


def _probe_record(**change) -> dict:
    from nsaconf.harness.probe import ProbeResult

    m = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    rec = ProbeResult("x", "swa_o", m, {"causal": m}, 1e-6, 1e-9, 10).to_record()
    rec.update(change)
    return {k: v for k, v in rec.items() if v != "DROP"}


@pytest.mark.parametrize("change", [{"convention": "DROP"}, {"finding": "DROP"}, {"threshold": "big"},
                                    {"matrix": 5}, {"leaks": 2, "first_leak": "DROP"}])
@pytest.mark.parametrize("output", ["text", "md"])
def test_masks_from_json_names_the_line_of_a_record_without_its_fields(change, output, capsys, tmp_path):
    f = tmp_path / "probe.jsonl"
    f.write_text(json.dumps(_probe_record()) + "\n" + json.dumps(_probe_record(**change)) + "\n")
    argv = ["masks", "--from-json", str(f)] + (["--md", str(tmp_path / "c.md"), "--json"] if output == "md" else [])
    assert f"{f}:2: not a probe record" in _bad(capsys, argv)
    assert not (tmp_path / "c.md").exists()
