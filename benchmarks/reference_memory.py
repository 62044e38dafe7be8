"""Time and peak memory of the float64 reference on the CPU, alone and inside a harness run (a benchmark, not a test).

    python benchmarks/reference_memory.py [--seq-lens 4096,8192,16384,32768,65536] [--no-run]   (or: make bench-memory)

Configuration: HQ=16, H=1, D=64, n=16, l=d=l'=64, w=512, float64. For each T:

* reference alone: ``nsa_reference`` in a fresh subprocess; its peak RSS (ru_maxrss, inputs included);
* harness run: ``nsaconf run --case <that case> --oracles reference`` (truth in the parent, the oracle in its
  worker process, the comparison): the peak of the summed RSS of the parent and its worker, sampled from
  /proc every 20 ms, and each process's own peak. At these sizes the run judges with a streamed truth
  (``comparator.StreamedTruth``): the worker's reply first, then the truth window by window against it.

Prints a markdown table: T, seconds and peak RSS of each, the run's peak as a multiple of the reference's,
and the statuses of the run's cells.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def bench_case(seq_len: int):
    from nsaconf.cases.model import Case

    return Case(seq_len=seq_len, heads_q=16, heads_kv=1, head_dim=64, block_size=64, top_n=16, window=512, dtype="float64")


def one(seq_len: int) -> dict:
    import torch

    from nsaconf.cases.tensors import materialize
    from nsaconf.oracles.reference import default_chunk, nsa_reference

    case = bench_case(seq_len)
    x = materialize(case)
    t0 = time.perf_counter()
    out = nsa_reference(case, x)
    secs = time.perf_counter() - t0
    assert all(bool(torch.isfinite(out[k]).all()) for k in ("cmp_o", "slc_o", "swa_o", "o"))
    return {"T": seq_len, "seconds": secs, "chunk": default_chunk(case), "threads": torch.get_num_threads(),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "torch": torch.__version__}


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


def harness_run(seq_len: int) -> dict:
    """``nsaconf run --case FILE --oracles reference`` in a subprocess, its process tree's RSS sampled."""
    from nsaconf.cases.model import dump_cases

    with tempfile.TemporaryDirectory() as tmp:
        dump_cases([bench_case(seq_len)], Path(tmp) / "case.json")
        argv = [sys.executable, "-m", "nsaconf", "run", "--case", str(Path(tmp) / "case.json"), "--oracles", "reference",
                "--out", str(Path(tmp) / "out"), "--timeout", "100000", "--no-report", "--no-progress", "--no-probe"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = parent = child = 0
        while proc.poll() is None:
            pids = _tree(proc.pid)
            sizes = [_rss(p) for p in pids]
            peak, parent = max(peak, sum(sizes)), max(parent, sizes[0])
            child = max([child] + sizes[1:])
            time.sleep(0.02)
        secs = time.perf_counter() - t0
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"nsaconf run exited {proc.returncode}: {err.strip()[-500:]}")
        cells = [json.loads(x) for x in (Path(tmp) / "out" / "results.jsonl").read_text().splitlines()]
    return {"T": seq_len, "seconds": secs, "peak_gb": peak / 2**30, "parent_gb": parent / 2**30, "worker_gb": child / 2**30,
            "statuses": sorted({c["status"] for c in cells})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="4096,8192,16384,32768,65536")
    ap.add_argument("--no-run", action="store_true", help="the reference alone (no harness run)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return 0
    print(f"# nsa_reference float64, HQ=16 H=1 D=64 n=16 l=d=l'=64 w=512 ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores)")
    print("| T | reference alone: time (s) | peak RSS (GB) | chunk | `nsaconf run`: time (s) | peak RSS parent + worker (GB) "
          "| parent (GB) | worker (GB) | run / reference | cells |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in (int(x) for x in args.seq_lens.split(",")):
        r = subprocess.run([sys.executable, __file__, "--one", str(t)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"| {t} | failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode} | | | | | | | | |")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        row = f"| {t:,} | {d['seconds']:.1f} | {d['peak_rss_gb']:.2f} | {d['chunk']} |"
        if args.no_run:
            print(row + " | | | | | |", flush=True)
            continue
        h = harness_run(t)
        print(row + f" {h['seconds']:.1f} | {h['peak_gb']:.2f} | {h['parent_gb']:.2f} | {h['worker_gb']:.2f} | "
              f"{h['peak_gb'] / d['peak_rss_gb']:.2f}x | {' '.join(h['statuses'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
