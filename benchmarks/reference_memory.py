"""Time and peak memory of the float64 reference forward on the CPU (a benchmark, not a test).

    python benchmarks/reference_memory.py [--seq-lens 4096,8192,16384,32768,65536]     (or: make bench-memory)

Configuration: HQ=16, H=1, D=64, n=16, l=d=l'=64, w=512, float64. Each T runs in a fresh subprocess so that its
peak RSS (ru_maxrss, inputs included) is its own. Prints a markdown table: T, seconds, peak RSS in GB and the
query chunk the reference chose (``nsaconf.oracles.reference.default_chunk``).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(seq_len: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from nsaconf.cases.model import Case
    from nsaconf.cases.tensors import materialize
    from nsaconf.oracles.reference import default_chunk, nsa_reference

    case = Case(seq_len=seq_len, heads_q=16, heads_kv=1, head_dim=64, block_size=64, top_n=16, window=512, dtype="float64")
    x = materialize(case)
    t0 = time.perf_counter()
    out = nsa_reference(case, x)
    secs = time.perf_counter() - t0
    assert all(bool(torch.isfinite(out[k]).all()) for k in ("cmp_o", "slc_o", "swa_o", "o"))
    return {"T": seq_len, "seconds": secs, "chunk": default_chunk(case), "threads": torch.get_num_threads(),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="4096,8192,16384,32768,65536")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return 0
    print(f"# nsa_reference float64, HQ=16 H=1 D=64 n=16 l=d=l'=64 w=512 ({platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} cores)")
    print("| T | time (s) | peak RSS (GB) | chunk |")
    print("|---|---|---|---|")
    for t in (int(x) for x in args.seq_lens.split(",")):
        r = subprocess.run([sys.executable, __file__, "--one", str(t)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"| {t} | failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode} | | |")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {t:,} | {d['seconds']:.1f} | {d['peak_rss_gb']:.2f} | {d['chunk']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
