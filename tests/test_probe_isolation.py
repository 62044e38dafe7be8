"""Probe isolation: the convention probe runs each oracle in a worker process, so an oracle that
segfaults or hangs only in the probe (tests/plugins/probe_segfault.py: correct on the matrix's batch-1
cases, misbehaving on the probe's batched calls) costs only its probe records, recorded as ``error``
findings; ``nsaconf run`` keeps results.jsonl and report.html, ``nsaconf masks`` probes the others.
The CLI runs as a subprocess: without the isolation the segfault would kill it (and not pytest)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nsaconf.cases.vocabulary import PROBE_BRANCHES
from nsaconf.harness.probe import leak_check_records

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).parent / "plugins" / "probe_segfault.py"
PLANTED = Path(__file__).parent / "plugins" / "probe_planted.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
SMALL = ["--seq-len", "40", "--block-size", "8", "--window", "8"]
SEGV = "probe crashed: worker process killed by SIGSEGV (exit -11)"


def nsaconf(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsaconf", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def run_argv(out: Path, oracles: str, *more: str) -> list[str]:
    return ["run", "--profile", "smoke", "--oracles", oracles, "--plugin", str(PLUGIN), "--out", str(out), "--no-progress", *more]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_keeps_results_and_report_when_the_probe_segfaults(tmp_path):
    out = tmp_path / "out"
    p = nsaconf(*run_argv(out, "reference,probe_segfault"))
    assert p.returncode == 0, p.stderr[-2000:]  # what the matrix says: every cell PASSes
    cells = _jsonl(out / "results.jsonl")
    keys = {(c["case_id"], c["branch"]) for c in cells if c["oracle"] == "reference"}
    assert len({k[0] for k in keys}) == 6
    assert {(c["case_id"], c["branch"]) for c in cells if c["oracle"] == "probe_segfault"} == keys
    assert len(cells) == 2 * len(keys) and {c["status"] for c in cells} <= {"PASS", "SKIP"}
    conv = _jsonl(out / "conventions.jsonl")
    bad = [r for r in conv if r["oracle"] == "probe_segfault"]
    assert [r["branch"] for r in bad] == list(PROBE_BRANCHES)
    assert all(r["finding"] == "error" and r["skipped"] == SEGV for r in bad)
    ref = {r["branch"]: r for r in conv if r["oracle"] == "reference"}
    assert set(ref) == set(PROBE_BRANCHES) and all(r["finding"] == "ok" and not r["skipped"] for r in ref.values())
    html = (out / "report.html").read_text()
    assert SEGV in html and "probe_segfault" in html


def test_hanging_probe_is_a_recorded_timeout(tmp_path):
    out = tmp_path / "out"
    p = nsaconf(*run_argv(out, "probe_hang", "--timeout", "4"), timeout=150)  # the hang (600 s) is cut off
    assert p.returncode == 0, p.stderr[-2000:]
    assert _jsonl(out / "results.jsonl") and all(c["status"] in ("PASS", "SKIP") for c in _jsonl(out / "results.jsonl"))
    conv = _jsonl(out / "conventions.jsonl")
    why = "probe timed out: no result within 4s (worker killed)"
    assert len(conv) == len(PROBE_BRANCHES) and all(r["finding"] == "error" and r["skipped"] == why for r in conv)
    assert why in (out / "report.html").read_text()


def test_reports_are_written_before_the_probe(tmp_path):
    """A run cut off during the probe (here: killed while the probe hangs) keeps complete reports."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "nsaconf", *run_argv(out, "reference,probe_hang")], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "report.html").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)  # the report is complete once the probe has started (it hangs for 300 s)
        assert proc.poll() is None, "the run ended: the probe did not hang"
        assert (out / "report.html").exists(), "no report.html while the probe runs"
        assert not (out / "conventions.jsonl").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes (their own session)
        proc.wait()
    cells = _jsonl(out / "results.jsonl")
    assert len({c["case_id"] for c in cells}) == 6 and {c["oracle"] for c in cells} == {"reference", "probe_hang"}
    html = (out / "report.html").read_text()
    assert html.rstrip().endswith("</html>") and "probe_hang" in html


def test_masks_reports_the_crash_and_probes_the_others():
    p = nsaconf("masks", "--plugin", str(PLUGIN), "--oracles", "probe_segfault,reference", "--summary", *SMALL)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    errors = [line for line in lines if line.startswith("probe_segfault")]
    assert len(errors) == len(PROBE_BRANCHES) and all(line.endswith(f"ERROR: {SEGV}") for line in errors)
    ok = [line for line in lines if line.startswith("reference")]
    assert len(ok) == len(PROBE_BRANCHES) and all(" OK " in line for line in ok)
    p = nsaconf("masks", "--plugin", str(PLUGIN), "--oracles", "probe_segfault", "--branch", "cmp", "--summary",
                "--fail-on-leak", *SMALL)
    assert p.returncode == 1 and p.stdout.strip() == f"probe_segfault cmp_o  ERROR: {SEGV}"


def test_worker_set_up_failure_is_recorded():
    """The worker loads only the plugins it is given: an oracle registered in this process alone fails
    the worker's set-up, which is that oracle's error records (never an exception)."""
    from nsaconf.oracles.base import load_plugin

    load_plugin(PLANTED)
    recs = leak_check_records(["probe_bug_block_causal"], "cpu", plugins=(), timeout=60)
    assert [r["branch"] for r in recs] == ["cmp_o"] and recs[0]["finding"] == "error"
    assert recs[0]["skipped"].startswith("probe failed: worker set-up failed: OracleError: unknown oracle 'probe_bug_block_causal'")
