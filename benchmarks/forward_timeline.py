"""Where the in-house forward's wall time goes on the GPU timeline (issue 6): kernel by kernel, with the idle gaps
between them, at the paper configuration.

    source .device/env.sh
    PYTHONPATH=. python benchmarks/forward_timeline.py --T 16384 [--window 0] [--set NAME=VALUE ...] [--calls 3]

For each profiled call (torch.profiler / CUPTI, after warm-up, one call per trace) it prints every GPU kernel in
launch order: start offset from the first kernel's start, duration, and the idle time since the previous kernel
ended; then the call's totals (GPU span, busy time, idle time). Before that, without a profiler: the median host
time of the call (the Python launch path: what the GPU waits for whenever a kernel ends before the host queued the
next) and, per cuTile launch, when it was issued after the call began and how long ``ct.launch`` itself took
(medians). The profiler slows the host down, so its idle times are upper bounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench_paper import gpu_inputs, paper_case  # noqa: E402  (benchmarks/ is sys.path[0])


def kernel_rows(prof) -> list[tuple[str, float, float]]:
    """[(kernel name, start, end)] in microseconds of the profiled GPU kernels, in start order."""
    gpu = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
           if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "nsa_forward"]
    return sorted(gpu, key=lambda r: r[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--window", type=int, default=0, help="0: the forward without window (default), else w")
    ap.add_argument("--calls", type=int, default=3, help="profiled calls (one trace each)")
    ap.add_argument("--reps", type=int, default=20, help="calls timed on the host without the profiler")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="forward flag (Python literal)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("forward_timeline: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    from nsaconf.oracles.inhouse_cutile import forward as F
    try:
        F.set_flags(**F.parse_flags(args.set))
    except ValueError as e:
        print(f"forward_timeline: error: {e}", file=sys.stderr)
        return 2
    case = paper_case(args.T, window=args.window)
    x = gpu_inputs(case, seed=args.T)
    call = lambda: F.nsa_forward(case, x, branches=("o",))  # noqa: E731
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    host = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        call()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    print(f"T={args.T} window={args.window} flags={args.set}: host time of one call (no profiler), median of "
          f"{args.reps}: {statistics.median(host):.3f} ms")
    launches: list[list[tuple[str, float, float]]] = []
    plain = F._launch

    def timed_launch(kernel, grid, kargs):
        t = time.perf_counter()
        plain(kernel, grid, kargs)
        launches[-1].append((kernel._annotated_function.pyfunc.__name__, t, time.perf_counter()))

    F._launch = timed_launch
    try:
        for _ in range(args.reps):
            launches.append([("call", time.perf_counter(), 0.0)])
            call()
            torch.cuda.synchronize()
    finally:
        F._launch = plain
    print("| cuTile launch | issued (us after the call began) | inside ct.launch (us) |\n|---|---|---|")
    for k in range(1, len(launches[0])):
        name = launches[0][k][0]
        issued = statistics.median((ls[k][1] - ls[0][1]) * 1e6 for ls in launches)
        inside = statistics.median((ls[k][2] - ls[k][1]) * 1e6 for ls in launches)
        print(f"| {name} | {issued:.1f} | {inside:.1f} |")
    for n in range(args.calls):
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.profiler.record_function("nsa_forward"):
                call()
            torch.cuda.synchronize()
        rows = kernel_rows(prof)
        if not rows:
            print(f"call {n + 1}: the profiler saw no GPU kernel")
            continue
        t0 = rows[0][1]
        print(f"\ncall {n + 1}: {len(rows)} GPU kernels")
        print("| kernel | start (us after the first kernel's) | ms | idle before (us) |\n|---|---|---|---|")
        prev = t0
        busy = 0.0
        for name, s, e in rows:
            print(f"| {name[:60]} | {s - t0:9.1f} | {(e - s) / 1e3:7.3f} | {max(0.0, s - prev):7.1f} |")
            busy += e - s
            prev = max(prev, e)
        span = prev - t0
        print(f"call {n + 1}: from the first kernel's start to the last one's end {span / 1e3:.3f} ms, kernels "
              f"{busy / 1e3:.3f} ms, idle {(span - busy) / 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
