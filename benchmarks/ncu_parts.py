"""One call of each in-house forward kernel at the paper configuration, bracketed by cudaProfilerStart/Stop, for
Nsight Compute (issue 6 performance analysis):

    ncu --profile-from-start off --set basic --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python benchmarks/ncu_parts.py --T 65536

Each kernel runs once untimed first (JIT compile, warm-up), then once inside the profiled range.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench_paper import gpu_inputs, paper_case  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--parts", default="", help="comma list of the parts to profile (default: all)")
    args = ap.parse_args()
    from nsaconf.oracles.inhouse_cutile import forward as F
    case = paper_case(args.T)
    x = gpu_inputs(case, seed=args.T)
    scale = case.softmax_scale
    T = args.T
    kc, vc = F.mean_pool(x.k, x.v, 64, 64)
    cmp_o, _, imp = F.compression(x.q, kc, vc, T, 64, 64, "end_inclusive", scale, want_importance=True,
                                  importance_fill=None)
    others = F.top_n_cutile(imp, 0, 13, 64, "initial_local", canonical=False, others=True)[..., :13]

    def forced_and_others(nlocal: int) -> torch.Tensor:
        """The forward's selection blocks: the forced ones by rule (without the ``nlocal`` local blocks the window
        kernel takes) + the 13 others of the top-n."""
        fl = F.forced_list(0, T, imp.shape[-1], 64, "initial_local", "cuda", nlocal=nlocal)
        return torch.cat([fl[None, :, None, :].expand(1, T, 4, fl.shape[1]), others], -1).contiguous()
    idx, idx16 = forced_and_others(2), forced_and_others(0)     # 14 blocks (full forward), 16 (w/o window)
    o_s, lse_s = F.selection_partial(x.q, x.k, x.v, idx, 64, scale)
    gates = (x.g_cmp, x.g_slc, x.g_swa)
    parts = {
        "compression+importance": lambda: F.compression(x.q, kc, vc, T, 64, 64, "end_inclusive", scale,
                                                        want_importance=True, importance_fill=None),
        "compression": lambda: F.compression(x.q, kc, vc, T, 64, 64, "end_inclusive", scale),
        "top_n": lambda: F.top_n_cutile(imp, 0, 13, 64, "initial_local", canonical=False, others=True),
        "selection_partial": lambda: F.selection_partial(x.q, x.k, x.v, idx, 64, scale),
        "window": lambda: F.sliding_window(x.q, x.k, x.v, 512, "w", scale),
        "window_forced": lambda: F.window_forced(x.q, x.k, x.v, o_s, lse_s, cmp_o, gates, 2, 64, 512, "w", scale),
        # what the forward without window runs: 16 blocks (3 forced + 13 others) and the gates
        "selection16_gated": lambda: F.selection_chunked(x.q, x.k, x.v, idx16, 64, scale, want_slc=False,
                                                         gated=(cmp_o, None, *gates)),
    }
    wanted = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(wanted) - set(parts))
    if unknown:
        print(f"ncu_parts: error: unknown parts {unknown} (known: {', '.join(parts)})", file=sys.stderr)
        return 2
    if wanted:
        parts = {name: fn for name, fn in parts.items() if name in wanted}
    for fn in parts.values():
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in parts.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
