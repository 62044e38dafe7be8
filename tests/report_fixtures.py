"""Fake but schema-faithful ``results.jsonl`` for the report tests (no oracle runs).

Covers every status, all three layers, SKIP reasons, a NaN/inf metric, HTML-special characters and a
multi-line traceback in reasons, a duplicate cell (last wins) and a truncated last line. Every numeric
FAIL carries an ``error_map`` (errors from p = 32 on); with ``diagnosis=True`` the FAILs carry a
``diagnosis`` too (one matched, one where nothing matched, its text hostile), and ``side_files`` adds a
convention-probe record of a window of w+1 keys (``window_probe_record``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nsaconf.cases.model import Case

XSS = '<script>alert(1)</script> & "quotes" | pipes'
VERSIONS = {"nsaconf": "0.1.0", "torch": "2.13.0+cpu", "python": "3.11.2", "fla-core": "0.6.0"}


def _cases() -> list[Case]:
    out = []
    for dtype in ("float32", "bfloat16", "float16"):
        for mask in ("end_inclusive", "anti_causal"):
            out.append(Case(seq_len=128, heads_q=16, heads_kv=1, head_dim=32, dtype=dtype, cmp_mask=mask,
                            window=32, seed=1))
    out.append(Case(seq_len=1024, heads_q=4, heads_kv=2, head_dim=32, dtype="float32", window=0, seed=2))
    return out


def _strict(v: Any) -> Any:
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    return v


def error_map(case: Case, ratio: float, start: int = 32) -> dict[str, Any]:
    """An ``error_map`` (harness.error_map's form): within the bound before position ``start``, ``ratio`` from it."""
    step = 4 if case.seq_len <= 128 else 2 ** (case.seq_len // 32 - 1).bit_length()
    edges = list(range(0, case.seq_len, step)) + [case.seq_len]
    heads = case.heads_q
    vals = [[_strict(ratio) if lo >= start else 0.1 for _ in range(heads)] for lo in edges[:-1]]
    return {"rows": "query position p", "cols": "head", "row_edges": edges, "values": vals}


def window_probe_record(T: int = 128, w: int = 16) -> dict[str, Any]:
    """A ``conventions.jsonl`` record (harness.probe's form) of an oracle whose window has w+1 keys."""
    def band(n: int) -> list[str]:
        return ["".join("1" if p - n < s <= p else "0" for s in range(T)) for p in range(T)]

    return {"oracle": "fla", "branch": "swa_o", "convention": "w_plus_1", "matches": ["w_plus_1"],
            "expected_convention": "w", "claimed_convention": None, "nearest": "w_plus_1", "diff_against": "w",
            "finding": "mismatch", "gated": None, "leaks": 0, "first_leak": None, "differing_cells": 0,
            "differing_vs_reference": T - w, "differences": [[p, p - w, "+"] for p in range(w, T)][:50],
            "distances": {"w": T - w, "w_plus_1": 0}, "threshold": 1.6e-12, "noise": 0.0, "min_signal": 0.003,
            "nan_rows": 0, "calls": 3, "seq_len": T, "block_size": 16, "cmp_block": 16, "cmp_stride": 16, "window": w,
            "block_indices": "random", "dtype": "float64", "case_id": "fp64-probe", "skipped": None,
            "matrix": band(w + 1), "expected_matrix": band(w), "dont_care": None}


DIAGNOSED = {"key": "window_keys=w_plus_1", "matched": True, "variants": [{"name": "window_keys=w_plus_1", "ratio": 0.08}],
             "nearest": None, "text": "matches the reference with window_keys=w_plus_1 (r 0.08): the implementation's "
                                      "window has w+1 keys; the case asks for w"}
UNDIAGNOSED = {"key": "", "matched": False, "variants": [], "nearest": {"name": XSS, "ratio": 3.1},
               "text": f"no alternative convention matches; nearest {XSS} (r 3.1)"}


def _rec(case: Case, oracle: str, layer: str, branch: str, status: str, *, reason: str | None = None,
         ratio: float | None = 0.1, device: str = "cpu", **metrics: Any) -> dict[str, Any]:
    m: dict[str, Any] = {}
    if status in ("PASS", "FAIL") and ratio is not None:
        bound = 1e-3
        m = {"max_abs_err": ratio * bound, "baseline_err": 4e-4, "bound": bound, "err_ratio": ratio,
             "rel_rms": ratio * 1e-3, "mismatch_frac": 0.0 if ratio <= 1 else 0.02,
             "worst_index": [0, 17, 3], "nonfinite": 0, "empty_rows": 2}
    # the engine writes strict JSON: non-finite floats as the strings "inf", "-inf", "nan"
    m.update(metrics)
    m = {k: _strict(v) for k, v in m.items()}
    emap = {"error_map": error_map(case, ratio)} if status == "FAIL" and ratio is not None else {}
    if layer == "reference" and case.dtype == "float32":
        tol = {"rule": "tight", "k": 2.0, "tight": 1e-5, "source": "default", "floor": None,
               "text": "err <= 1e-05*max(1,max|truth|)"}
    else:
        tol = {"rule": "fa", "k": 2.0, "floor_mult": 2.0, "floor_shift": 0.3, "floor_add": 0.0,
               "source": "default" if oracle != "fla" else "override fla.slc_o.k (--tol)",
               "floor": (1e-7 if case.dtype == "float32" else 4e-3) * (1 + len(branch) % 3),
               "text": "err <= 2*baseline_err + floor (2*noise@0.3+0)"}
    return {"case_id": case.id, "case": case.to_dict(), "oracle": oracle, "layer": layer, "branch": branch,
            "dtype": case.dtype, "device": device, "status": status, "reason": reason, "metrics": m,
            "tolerance": tol if status in ("PASS", "FAIL") else {}, "seconds": 0.25,
            "versions": VERSIONS, "timestamp": "2026-11-27T01:00:00Z", **emap}


def fixture_records() -> list[dict[str, Any]]:
    cases = _cases()
    big = cases[-1]
    recs: list[dict[str, Any]] = []
    for c in cases:
        for br in ("cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o"):
            if br == "swa_o" and c.window == 0:
                continue
            recs.append(_rec(c, "reference", "reference", br, "PASS", ratio=0.0))
            if c is big:
                recs.append(_rec(c, "dense", "reference", br, "SKIP",
                                 reason="dense brute force is limited to seq_len <= 512 (got 1024)"))
            else:
                recs.append(_rec(c, "dense", "reference", br, "PASS", ratio=0.02))
        # L1 kernel oracles
        if c.heads_q // c.heads_kv < 16:
            recs.append(_rec(c, "fla", "kernel", "slc_o", "SKIP", reason="FLA needs HQ/H a power of 2 >= 16 (got 2)"))
        elif c.cmp_mask == "anti_causal":
            recs.append(_rec(c, "fla", "kernel", "slc_o", "FAIL", ratio=7.5,
                             reason="max_abs_err 7.5e-03 > bound 1.0e-03 at (b=0, pos=17, head=3)"))
        else:
            recs.append(_rec(c, "fla", "kernel", "slc_o", "PASS", ratio=0.7))
        recs.append(_rec(c, "fla", "kernel", "cmp_o", "PASS", ratio=0.3))
        if c.dtype == "float16":
            recs.append(_rec(c, "tilelang", "kernel", "slc_o", "ERROR",
                             reason="Traceback (most recent call last):\n  File \"x.py\", line 3, in run\n"
                                    "RuntimeError: TileLang kernel needs head_dim % 16 == 0 <and> {braces}"))
        elif c.dtype == "bfloat16" and c.cmp_mask == "end_inclusive":
            recs.append(_rec(c, "tilelang", "kernel", "slc_o", "TIMEOUT", reason="cell exceeded the 60 s per-cell timeout"))
        else:
            recs.append(_rec(c, "tilelang", "kernel", "slc_o", "SKIP", device="cuda",
                             reason="needs CUDA: set --device cuda on a GPU machine"))
        # L2 end-to-end
        if c.dtype == "bfloat16" and c.cmp_mask == "anti_causal":
            recs.append(_rec(c, "nsa_impl", "e2e", "o", "FAIL", ratio=float("inf"), reason=XSS,
                             nonfinite=12, max_abs_err=float("nan")))
        elif c.dtype == "float16" and c.cmp_mask == "end_inclusive":
            recs.append(_rec(c, "nsa_impl", "e2e", "o", "CRASH", reason="worker died with signal 11 (SIGSEGV); restarted"))
        else:
            recs.append(_rec(c, "nsa_impl", "e2e", "o", "PASS", ratio=0.25))
    return recs


def write_fixture(out_dir: Path, *, malformed: bool = True, run_json: bool = False,
                  side_files: bool = False, diagnosis: bool = False) -> Path:
    """Write ``out_dir/results.jsonl`` (+ optional run.json, conventions.jsonl, bench.jsonl); ``diagnosis``:
    the fla FAILs carry ``DIAGNOSED``, the nsa_impl FAIL ``UNDIAGNOSED``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = fixture_records()
    if diagnosis:
        for r in recs:
            if r["status"] == "FAIL":
                r["diagnosis"] = DIAGNOSED if r["oracle"] == "fla" else UNDIAGNOSED
    lines = [json.dumps(r) for r in recs]
    # a duplicate cell (resume after an interrupted write): the second one (PASS) must win
    dup = dict(recs[0], status="ERROR", reason="stale record from an interrupted run")
    lines.insert(0, json.dumps(dup))
    if malformed:
        lines.append('{"case_id": "truncated-by-a-kill", "oracle": "fla", "sta')
    (out_dir / "results.jsonl").write_text("\n".join(lines) + "\n")
    if run_json:
        (out_dir / "run.json").write_text(json.dumps({  # the engine's form (harness/cli.py)
            "command": "nsaconf run --profile ci --out run", "profile": "ci", "case_files": [],
            "device": "cpu", "oracles": ["dense", "fla", "nsa_impl", "reference", "tilelang"], "n_cases": 7,
            "seed": None, "timeout_s": 60.0, "plugins": ["my plugins/nsa_x.py"],
            "tolerance": {"defaults": {"k": 2.0, "k_grad": 3.0, "floor_mult": 2.0, "tight_float32": 1e-5},
                          "doc": {"k": "forward: err <= k*baseline_err + floor", "k_grad": "gradients <grad>",
                                  "floor_mult": "floor = floor_mult*max|(truth_X+shift-shift)-truth_X|"},
                          "overrides": [{"oracle": "fla", "branch": "slc_o", "param": "k", "value": 2.0,
                                         "source": "--tol"}]},
            "versions": {"python": "3.11.2", "torch": "2.13.0+cpu", "nsaconf": "0.1.0", "cpu": "2 cores <fake>"},
            "started": "2026-11-27T01:00:00Z"}, indent=1))
    if side_files:
        (out_dir / "conventions.jsonl").write_text(json.dumps({"oracle": "fla", "branch": "o", "leaks": 0, "convention":
                                                               "ambiguous(end_inclusive/w|end_inclusive/w_plus_1|"
                                                               "end_exclusive/w|end_exclusive/w_plus_1)"}) + "\n"
                                                   + json.dumps(window_probe_record()) + "\n")
        (out_dir / "bench.jsonl").write_text(json.dumps({"oracle": "fla", "T": 1024, "ms": 1.5}) + "\n")
    return out_dir / "results.jsonl"
