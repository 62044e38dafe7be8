"""The engine under hostile input (issue #21): an oracle's output is never executed in the main process, a
plugin's import that crashes or hangs is one line, oracle names cannot write outside ``--out``, oracles get
private copies of what they are given, ``--timeout`` covers the truth, identical runs give identical
numbers, a float64 case computes its truth once (tests/plugins/hostile.py, hostile_import.py)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nsaconf.cases.model import Case, dump_cases
from nsaconf.harness.cli import main
from nsaconf.harness.runner import evaluate, run
from nsaconf.oracles import base
from nsaconf.oracles.base import OracleError, load_plugin, register_oracle
from nsaconf.oracles.reference_oracles import ReferenceOracle

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).parent / "plugins"
HOSTILE = PLUGINS / "hostile.py"
HOSTILE_IMPORT = PLUGINS / "hostile_import.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
CASE = Case(seq_len=64, heads_q=4, heads_kv=2, head_dim=16, block_size=16, top_n=3, window=8, dtype="float32", seed=1)
#: a truth of about half a second (more on a loaded machine)
SLOW = Case(seq_len=512, heads_q=16, heads_kv=1, head_dim=64, block_size=64, top_n=16, window=512, dtype="float32")


def nsaconf(*argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsaconf", *argv], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _cells(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["oracle"], r["branch"]): r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


# ------------------------------------------------------------------------------ defect 2: replies are data
def test_oracle_output_objects_never_run_in_the_main_process(tmp_path):
    """Objects whose unpickling would end the process, create a file or sleep: ERROR cells naming the
    type (found in the worker), or the forged pickle on the worker's connection: an ERROR, never run."""
    marker = tmp_path / "marker"
    dump_cases([CASE], tmp_path / "case.json")
    t0 = time.monotonic()
    p = nsaconf("run", "--case", str(tmp_path / "case.json"), "--plugin", str(HOSTILE), "--out", str(tmp_path / "out"),
                "--oracles", "reference,hostile_exit,hostile_file,hostile_sleep,hostile_forge", "--timeout", "100",
                "--no-report", "--no-progress", env={"NSACONF_HOSTILE_MARKER": str(marker)}, timeout=900)
    assert p.returncode == 1, p.stderr[-2000:]
    assert time.monotonic() - t0 < 600 and not marker.exists()  # hostile_sleep's object would sleep an hour
    cells = _cells(tmp_path / "out")
    for name, evil in (("hostile_exit", "EvilExit"), ("hostile_file", "EvilFile"), ("hostile_sleep", "EvilSleep")):
        r = cells[(name, "cmp_o")]
        assert r["status"] == "ERROR" and f"returned {evil} for branch 'cmp_o', not a torch.Tensor" in r["reason"], r
    forged = cells[("hostile_forge", "cmp_o")]
    assert forged["status"] == "ERROR" and "cannot decode the worker's reply" in forged["reason"], forged
    assert {r["status"] for (o, _), r in cells.items() if o == "reference"} == {"PASS"}


def test_in_process_outputs_are_checked_the_same_way():
    load_plugin(HOSTILE)
    [cell] = evaluate(CASE, ["hostile_file"])
    assert cell.status == "ERROR" and "returned EvilFile for branch 'cmp_o'" in cell.reason


def _pipe_roundtrip(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    from nsaconf.harness.worker import recv_message, send_message

    import multiprocessing as mp

    a, b = mp.get_context("spawn").Pipe()
    writer = threading.Thread(target=send_message, args=(a, {"kind": "ok"}, dict(tensors)))
    writer.start()
    try:
        return recv_message(b, time.monotonic() + 60)
    finally:
        b.close()  # a writer still blocked on the pipe gets an error and ends
        writer.join(30)
        a.close()


def test_wire_format_carries_tensors_exactly_and_nothing_else():
    from nsaconf.harness.worker import WireError, recv_message

    import multiprocessing as mp

    sent = {"bf16": torch.randn(3, 5).bfloat16(), "flag": torch.tensor([True, False, True]),
            "scalar": torch.tensor(7), "empty": torch.zeros(0, 4), "strided": torch.randn(64, 300, dtype=torch.float64).t(),
            "half": torch.randn(2, 2, 2).half(), "idx": torch.arange(-1, 2_000_000)}
    header, got = _pipe_roundtrip(sent)
    assert header["kind"] == "ok" and list(got) == list(sent)
    for k, v in sent.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    for payload in (pickle.dumps({"kind": "ok", "tensors": []}), json.dumps({"kind": "ok", "tensors": [
            {"key": "o", "dtype": "object", "shape": [1]}]}).encode(), b"[1, 2]"):
        a, b = mp.get_context("spawn").Pipe()
        a.send_bytes(payload)
        with pytest.raises(WireError):
            recv_message(b, time.monotonic() + 5)
        a.close()
        b.close()


def test_a_reply_that_came_in_time_is_read_whole_after_its_deadline():
    """The header came before the deadline; its tensors (more than a pipe holds) are read afterwards."""
    from nsaconf.harness.worker import recv_message, send_message

    import multiprocessing as mp

    a, b = mp.get_context("spawn").Pipe()
    big = torch.arange(4_000_000, dtype=torch.float64)
    writer = threading.Thread(target=send_message, args=(a, {"kind": "ok"}, {"o": big}))
    writer.start()
    time.sleep(0.5)
    try:
        header, got = recv_message(b, time.monotonic() - 1.0)
    finally:
        b.close()  # a writer still blocked on the pipe gets an error and ends
        writer.join(30)
        a.close()
    assert torch.equal(got["o"], big)


# ------------------------------------------------------------------------------ plugin import
@pytest.mark.parametrize("how,why", [("exit", "exited with code 7"), ("segv", "killed by SIGSEGV")])
def test_plugin_import_crash_is_one_line_exit_2(how, why):
    p = nsaconf("list", "--plugin", str(HOSTILE_IMPORT), env={"NSACONF_HOSTILE_IMPORT": how}, timeout=200)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-2000:]
    assert err[0].startswith(f"nsaconf: error: plugin '{HOSTILE_IMPORT}' crashed while importing") and why in err[0]


def test_plugin_import_hang_is_bounded(monkeypatch):
    monkeypatch.setenv("NSACONF_HOSTILE_IMPORT", "hang")
    t0 = time.monotonic()
    with pytest.raises(OracleError, match=r"hung while importing \(no return within 3s\)"):
        load_plugin(HOSTILE_IMPORT, check_timeout=3)
    assert time.monotonic() - t0 < 25
    assert "hostile_import_ok" not in base._REGISTRY


# ------------------------------------------------------------------------------ defect 3: names and paths
@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "a..b", "x" * 65, "has space", "back`tick", "-lead",
                                  ".hidden", "new\nline", 7])
def test_oracle_names_must_be_safe_identifiers(name, monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    cls = type("Named", (ReferenceOracle,), {"name": name})
    with pytest.raises(OracleError, match="is not a safe identifier") as e:
        register_oracle(cls)
    assert "\n" not in str(e.value)


def test_safe_names_register(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    for name in ("ok", "a.b-c_1", "_x", "x" * 64):
        assert register_oracle(type("Named", (ReferenceOracle,), {"name": name})).name == name


def test_save_tensors_never_writes_outside_out(tmp_path, monkeypatch):
    """An oracle whose name escapes the registration check: its tensors are refused with one line, its
    cells are still recorded."""
    name = "../../../../escaped"
    monkeypatch.setattr(base, "_REGISTRY", {**base._REGISTRY, name: type("Escaped", (ReferenceOracle,), {"name": name})})
    out = tmp_path / "a" / "out"
    cells = evaluate(CASE, [name], out=out, save_tensors=True)
    assert cells and {c.status for c in cells} == {"PASS"}
    assert not list(tmp_path.rglob("escaped*"))
    assert (out / "tensors" / CASE.id / "reference.pt").is_file() and (out / "tensors" / CASE.id / "inputs.pt").is_file()


def test_tensor_paths_stay_inside_out(tmp_path):
    from nsaconf.harness.tensors_io import tensor_path

    out = tmp_path / "out"
    p = tensor_path(out, "case", "oracles", "mine.pt")
    assert p.parent.is_dir() and p.parent == (out / "tensors" / "case" / "oracles").resolve()
    for parts in (("..", "..", "x.pt"), ("/tmp/x.pt",), ("case", "oracles", "../../../../y.pt")):
        with pytest.raises(ValueError, match="not inside the output folder"):
            tensor_path(out, *parts)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "tensors").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not inside the output folder"):
        tensor_path(tmp_path / "out2", "case", "x.pt")


# ------------------------------------------------------------------------------ defect 4: private copies
def test_in_process_oracles_get_their_own_block_indices(tmp_path):
    """``hostile_idx_writer`` scrambles the indices it is given: the truth (and ``reference``, gradients
    included) is unaffected in repro, pytest (a shared truth cache) and ``evaluate`` mode."""
    load_plugin(HOSTILE)
    cells = evaluate(CASE, ["hostile_idx_writer", "reference"])
    assert {(c.oracle, c.status) for c in cells} == {("hostile_idx_writer", "PASS"), ("reference", "PASS")}, \
        [(c.oracle, c.branch, c.reason) for c in cells if c.status != "PASS"]
    assert {"topk_idx", "dk"} <= {c.branch for c in cells if c.oracle == "reference"}
    cache: dict = {}
    assert [c.status for c in evaluate(CASE, ["hostile_idx_writer"], truth_cache=cache)] == ["PASS"]
    assert {c.status for c in evaluate(CASE, ["reference"], truth_cache=cache)} == {"PASS"}
    dump_cases([CASE], tmp_path / "case.json")
    assert main(["repro", str(tmp_path / "case.json"), "--oracles", "hostile_idx_writer,reference",
                 "--plugin", str(HOSTILE)]) == 0


# ------------------------------------------------------------------------------ defect 6: the timeout
@pytest.mark.parametrize("isolate", [False, True])
def test_a_truth_slower_than_the_timeout_is_timeout(isolate):
    cells = [c for c in evaluate(SLOW, ["reference"], isolate=isolate, timeout=0.2) if c.status != "SKIP"]  # no gradient truth
    assert len(cells) == 6 and all(c.status == "TIMEOUT" for c in cells), [(c.status, c.reason) for c in cells]
    assert "in the main process, over the 0.2s timeout" in cells[0].reason and "the truth took" in cells[0].reason


@pytest.mark.parametrize("isolate", [False, True])
def test_a_reply_late_for_the_cell_is_timeout(isolate):
    """``hostile_slow_sel`` takes 2 s, under the 2.1 s timeout, but the cell (truth + oracle) does not."""
    load_plugin(HOSTILE)
    [cell] = evaluate(SLOW, ["hostile_slow_sel"], isolate=isolate, timeout=2.1, plugins=[str(HOSTILE)])
    assert cell.status == "TIMEOUT", cell.reason
    assert "in the main process" in cell.reason


# ------------------------------------------------------------------------------ defect 11: determinism
def test_identical_runs_give_identical_results(tmp_path):
    """Forward and gradient cells of two identical runs: the same records apart from timing fields."""
    base_case = Case(seq_len=256, heads_q=16, heads_kv=1, head_dim=32, block_size=16, top_n=4, window=32, dtype="float32")
    cases = [base_case.replace(seed=s) for s in range(3)] + [base_case.replace(heads_q=8, heads_kv=2, seed=3)]

    def records(out: Path) -> list[dict]:
        run(cases, ["reference", "fla_naive"], out=out, timeout=300)
        recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        for r in recs:
            del r["seconds"], r["timestamp"]
        return recs

    first, second = records(tmp_path / "a"), records(tmp_path / "b")
    assert {(r["branch"], r["status"]) for r in first if r["oracle"] == "reference"} >= {("dk", "PASS"), ("dv", "PASS")}
    assert first == second


# ------------------------------------------------------------------------------ defect 13: memory
def test_a_float64_truth_is_computed_once(monkeypatch):
    from nsaconf.harness import comparator

    calls = []
    for fn in ("nsa_reference", "nsa_reference_grads"):
        real = getattr(comparator, fn)
        monkeypatch.setattr(comparator, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(_fn) or _real(*a, **k))
    ct = comparator.CaseTruth.compute(CASE.replace(dtype="float64"))
    assert ct.baseline is ct.truth
    truth, baseline = ct.grads()
    assert baseline is truth and calls == ["nsa_reference", "nsa_reference_grads"]
