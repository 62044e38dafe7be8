"""Paper-configuration benchmark: the in-house cuTile NSA forward against FLA ``parallel_nsa``, TileLang's forward
selection kernel and dense causal SDPA, on one card in one run.

    source .device/env.sh                                              # cuTile + the external oracles
    python benchmarks/bench_paper.py --T 4096,16384,65536 --out OUT    # needs a CUDA GPU
    python benchmarks/bench_paper.py --table OUT/bench.jsonl           # print the tables again (no GPU)

Configuration (the NSA paper's): B=1, HQ=64, H=4 (G=16), D=DV=128, n=16, l=d=l'=64, w=512, bf16; TileLang takes fp16
only, so that comparison runs in fp16 for both. The in-house kernels run with the default ``KernelConfig``. Inputs
are drawn on the GPU (q, v ~ N(0,1); k with neighbouring blocks alike); every selection kernel gets the same block
indices (the in-house top-n). Timing: ``nsaconf.harness.bench.time_fn`` (CUDA events, warm-up, median of --reps,
inputs rotated past L2). Prints one line per timing, then a table of all timings and one of the speed-ups; writes
OUT/bench.jsonl and OUT/performance.html.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import traceback
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL, NO_WINDOW, CMP_TOPK = "full fwd (cmp+topk+slc+swa+gates)", "fwd w/o window (cmp+topk+slc+gates)", "cmp+topk"
SELECTION, SELECTION_FP16, PARTS, DENSE = "selection on given idx (bf16)", "selection (fp16)", "part", "dense causal"
FLA_NOTE = "FLA has no window without flash-attn"
DENSE_NOTE = "layout pre-transposed to [B,H,T,D]"


def paper_case(T: int, dtype: str = "bfloat16", window: int = 512):
    from nsaconf.cases.model import Case
    return Case(batch=1, seq_len=T, heads_q=64, heads_kv=4, head_dim=128, block_size=64, top_n=16, window=window,
                dtype=dtype, forced_blocks="initial_local", cmp_mask="end_inclusive")


def gpu_inputs(case, seed: int):
    import torch
    from nsaconf.cases.tensors import Inputs
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, case.dtype)
    B, T, HQ, H, D = case.batch, case.seq_len, case.heads_q, case.heads_kv, case.head_dim
    q = torch.randn((B, T, HQ, D), device="cuda", generator=g)
    k = torch.randn((B, T, H, D), device="cuda", generator=g)
    smooth = torch.nn.functional.avg_pool1d(torch.randn((B * H * D, 1, T + 31), device="cuda", generator=g), 32, 1)
    k = 0.8 * k + 0.8 * math.sqrt(32) * smooth.view(B, H, D, T).permute(0, 3, 1, 2)
    v = torch.randn((B, T, H, D), device="cuda", generator=g)
    gates = 0.05 + 0.9 * torch.rand((3, B, T, HQ), device="cuda", generator=g)
    return Inputs(q=q.to(dt), k=k.to(dt), v=v.to(dt), g_cmp=gates[0].to(dt), g_slc=gates[1].to(dt), g_swa=gates[2].to(dt))


def dense_sdpa_fns(xs: list) -> list:
    """Causal torch SDPA with GQA (FlashAttention-2 backend first), one closure per input copy; q/k/v transposed to
    ``[B,H,T,D]`` outside the timed call."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qkv = [tuple(t.transpose(1, 2).contiguous() for t in (x.q, x.k, x.v)) for x in xs]

    def sdpa(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return [lambda t=t: sdpa(*t) for t in qkv]


def shared_indices(F, x, T: int, scale: float):
    """The block indices every selection kernel gets: the in-house importance of ``x`` and the torch top-n."""
    import torch
    kc, vc = F.mean_pool(x.k, x.v, 64, 64)
    imp = F.compression(x.q, kc, vc, T, 64, 64, "end_inclusive", scale, want_importance=True)[2]
    return F.top_n(imp, torch.arange(T, device="cuda"), 16, 64, "initial_local")


def time_parts(F, hb, run, case, case_nw, xs: list, idx32) -> None:
    """The kernels of the in-house full forward one by one: pooling, compression + importance (one pass up to 16k),
    the top-n of the 13 non-forced blocks, the selection over the other 14 blocks (+ its LSE), the window kernel
    that also takes the 2 forced local blocks and applies the gates; and the separate gate kernel."""
    T, scale, x0 = case.seq_len, case.softmax_scale, xs[0]
    gates = [(x.g_cmp, x.g_slc, x.g_swa) for x in xs]
    kc, vc = F.mean_pool(x0.k, x0.v, 64, 64)
    imp = F.compression(x0.q, kc, vc, T, 64, 64, "end_inclusive", scale, want_importance=True)[2]
    idx14 = idx32[..., :14].contiguous()
    o_s, lse_s = F.selection_partial(x0.q, x0.k, x0.v, idx14, 64, scale)

    def part(case_, name: str, branches: tuple, fns: list, cost=None) -> None:     # one group each: no ratios
        run(case_, f"inhouse_cutile.{name}", "kernel", branches, fns, f"{PARTS}: {name}", cost=cost)
    part(case, "pool", (), [lambda x=x: F.mean_pool(x.k, x.v, 64, 64) for x in xs],
         cost=hb.Cost(0.0, 2.0 * T * 4 * 256 * 2))
    part(case, "cmp+importance", ("cmp_o", "cmp_lse"),
         [lambda x=x: F.compression(x.q, kc, vc, T, 64, 64, "end_inclusive", scale, want_importance=True,
                                    importance_fill=None) for x in xs], cost=hb.cost_of(case, ("topk_idx",)))
    part(case, "top_n (13 non-forced blocks)", ("topk_idx",),
         [lambda: F.top_n_cutile(imp, 0, 13, 64, "initial_local", canonical=False, others=True)],
         cost=hb.Cost(0.0, imp.numel() * 4.0 / 2))
    part(case_nw, "selection_partial (14 blocks)", ("slc_o",),
         [lambda x=x: F.selection_partial(x.q, x.k, x.v, idx14, 64, scale) for x in xs])
    part(case, "window_forced (window + 2 local blocks + gates)", ("swa_o",),
         [lambda x=x, g=g: F.window_forced(x.q, x.k, x.v, o_s, lse_s, x.q, g, 2, 64, case.window, case.window_keys,
                                           scale) for x, g in zip(xs, gates)])
    part(case, "gates", ("o",), [lambda x=x, g=g: F.combine_gates(x.q, x.q, x.q, g) for x, g in zip(xs, gates)],
         cost=hb.Cost(0.0, 4.0 * x0.q.numel() * 2))


def tables(recs: list[dict]) -> str:
    """Markdown: every timing (per T and group, fastest first) and the speed-ups the targets are stated in."""
    by_t: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        by_t[r["group"].split("|", 1)[0]].append(r)
    first = recs[0]
    lines = [f"Card: {first['device']}; ceilings measured in the run: bf16 matmul {first['ceilings']['matmul_tflops']} "
             f"TFLOP/s, D2D copy {first['ceilings']['copy_gbps']} GB/s. Versions: {first['versions']}", "",
             "| T | group | implementation | ms | ratio to fastest in group | % of roofline floor |",
             "|---|---|---|---|---|---|"]
    for t, rs in by_t.items():
        for r in sorted(rs, key=lambda r: (r["group"], r["ms"])):
            lines.append(f"| {t[1:]} | {r['group'].split('|', 1)[-1]} | {r['oracle']} | {r['ms']:.3f} | "
                         f"{r['ratio_to_fastest']:.2f} | {r['pct_of_floor']:.1f} |")
    lines += ["", "| T | FLA parallel_nsa / in-house (w/o window both) | dense SDPA / in-house full fwd | "
              "TileLang selection / in-house selection (fp16) |", "|---|---|---|---|"]
    for t, rs in by_t.items():
        def get(name: str, group: str):
            return next((r["ms"] for r in rs if r["oracle"] == name and r["group"].endswith("|" + group)), None)

        def ratio(a, b) -> str:
            return f"{a / b:.2f}x ({a:.2f} / {b:.2f} ms)" if a and b else "n/a"
        lines.append(f"| {t[1:]} | {ratio(get('fla.parallel_nsa', NO_WINDOW), get('inhouse_cutile', NO_WINDOW))} | "
                     f"{ratio(get('dense causal SDPA (GQA)', DENSE), get('inhouse_cutile', FULL))} | "
                     f"{ratio(get('tilelang_fwd', SELECTION_FP16), get('inhouse_cutile.selection', SELECTION_FP16))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="4096,16384,65536", help="comma-separated sequence lengths")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    ap.add_argument("--skip", default="", help="comma list of: fla,tilelang,dense")
    ap.add_argument("--table", metavar="FILE", help="only print the tables of an earlier run's bench.jsonl")
    args = ap.parse_args(argv)
    if args.table:
        print(tables([json.loads(line) for line in open(args.table) if line.strip()]))
        return 0
    try:
        Ts = [int(t) for t in args.T.split(",")]
    except ValueError:
        print(f"bench_paper: error: --T {args.T!r} is not a comma list of int", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"fla", "tilelang", "dense"}:
        print(f"bench_paper: error: --skip {', '.join(sorted(skip - {'fla', 'tilelang', 'dense'}))}: "
              "known are fla, tilelang, dense", file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("bench_paper: error: needs a CUDA GPU (--table FILE prints an earlier run's tables)", file=sys.stderr)
        return 2
    from nsaconf.harness import bench as hb
    from nsaconf.harness.environment import versions
    from nsaconf.oracles.base import get_oracle
    from nsaconf.oracles.inhouse_cutile import forward as F
    from nsaconf.oracles.inhouse_cutile.config import DEFAULT
    from nsaconf.reports.performance import write_performance

    ceil = hb.measure_ceilings()
    vers = {**versions(), **get_oracle("inhouse_cutile").versions()}
    print(f"device {ceil.device}: bf16 matmul {ceil.matmul_tflops:.0f} TFLOP/s, D2D copy {ceil.copy_gbps:.0f} GB/s",
          flush=True)
    config = " ".join(f"{k}={v}".replace(" ", "") for k, v in dataclasses.asdict(DEFAULT).items())
    print(f"in-house kernels: KernelConfig({config})", flush=True)
    records: list[hb.BenchRecord] = []

    def run(case, name: str, layer: str, branches: tuple, fns: list, group: str, note: str = "", cost=None):
        try:
            ms = hb.time_fn(fns[0], reps=args.reps, warmup=args.warmup, rotate=fns)
        except Exception as e:  # noqa: BLE001 (one failing implementation does not stop the others)
            print(f"FAIL {name} T={case.seq_len}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=3)
            return
        rec = hb.make_record(case, name, layer, branches, ms, args.reps, cost or hb.cost_of(case, branches), ceil,
                             vers, note, group)
        records.append(rec)
        print(f"T={case.seq_len:6d} {name:40s} {ms:9.3f} ms  {rec.pct_of_floor:5.1f} % of floor  [{group}]", flush=True)

    for T in Ts:
        case, case_nw = paper_case(T), paper_case(T, window=0)
        base = gpu_inputs(case, seed=T)
        xs = [base] + [hb.clone_inputs(base) for _ in range(hb.input_copies(case, base) - 1)]
        scale = case.softmax_scale
        idx = shared_indices(F, base, T, scale)
        idx32 = idx.to(torch.int32).contiguous()

        run(case, "inhouse_cutile", "e2e", ("o",), [lambda x=x: F.nsa_forward(case, x, branches=("o",)) for x in xs],
            FULL, note=config)
        run(case_nw, "inhouse_cutile", "e2e", ("o",),
            [lambda x=x: F.nsa_forward(case_nw, x, branches=("o",)) for x in xs], NO_WINDOW, note=config)

        def cmp_topk(x):
            kc, vc = F.mean_pool(x.k, x.v, 64, 64)
            imp = F.compression(x.q, kc, vc, T, 64, 64, "end_inclusive", scale, want_importance=True)[2]
            return F.top_n_cutile(imp, 0, 16, 64, "initial_local")
        run(case, "inhouse_cutile.cmp+topk", "kernel", ("cmp_o", "cmp_lse", "topk_idx"),
            [lambda x=x: cmp_topk(x) for x in xs], CMP_TOPK)
        run(case, "inhouse_cutile.selection", "kernel", ("slc_o",),
            [lambda x=x: F.selection_chunked(x.q, x.k, x.v, idx, 64, scale) for x in xs], SELECTION)
        time_parts(F, hb, run, case, case_nw, xs, idx32)
        if "fla" not in skip:
            try:
                from nsaconf.oracles.fla import _triton_modules
                par, compression, mean_pooling = _triton_modules()
                run(case_nw, "fla.parallel_nsa", "e2e", ("o",),
                    [lambda x=x: par.parallel_nsa(x.q, x.k, x.v, x.g_cmp, x.g_slc, None, block_counts=16,
                                                  block_size=64, window_size=0, scale=scale) for x in xs],
                    NO_WINDOW, note=FLA_NOTE, cost=hb.cost_of(case_nw, ("o",)))
                run(case, "fla.parallel_nsa_fwd (selection)", "kernel", ("slc_o",),
                    [lambda x=x: par.ParallelNSAFunction.apply(x.q, x.k, x.v, idx32, 16, 64, scale, None) for x in xs],
                    SELECTION)

                def fla_cmp_topk(x):
                    kc, vc = mean_pooling(x.k, 64, None), mean_pooling(x.v, 64, None)
                    _, lse = compression(q=x.q, k=kc, v=vc, TK=T, block_size=64, scale=scale, cu_seqlens=None)
                    return par.parallel_nsa_topk(q=x.q, k=kc, TK=T, lse=lse, block_counts=16, block_size=64,
                                                 scale=scale, cu_seqlens=None)
                run(case, "fla.cmp+topk", "kernel", ("cmp_o", "cmp_lse", "topk_idx"),
                    [lambda x=x: fla_cmp_topk(x) for x in xs], CMP_TOPK)
            except Exception as e:  # noqa: BLE001
                print(f"FLA unavailable: {type(e).__name__}: {e}", flush=True)
        if "tilelang" not in skip:
            try:
                from nsaconf.cases.tensors import Inputs
                from nsaconf.oracles.base import get_oracle
                tl = get_oracle("tilelang_fwd")
                case16 = paper_case(T, "float16")
                x16 = [Inputs(**{k: (None if v is None else (v.half() if v.is_floating_point() else v))
                                 for k, v in vars(x).items()}) for x in xs]
                run(case16, "inhouse_cutile.selection", "kernel", ("slc_o",),
                    [lambda x=x: F.selection_chunked(x.q, x.k, x.v, idx, 64, scale) for x in x16], SELECTION_FP16)
                why = tl.check_support(case16, "cuda")
                if why:
                    print(f"SKIP tilelang_fwd: {why}", flush=True)
                else:
                    run(case16, "tilelang_fwd", "kernel", ("slc_o",),
                        [lambda x=x: tl.run(case16, x, "cuda", block_indices=idx) for x in x16], SELECTION_FP16)
                del x16
            except Exception as e:  # noqa: BLE001
                print(f"TileLang unavailable: {type(e).__name__}: {e}", flush=True)
        if "dense" not in skip:
            run(case, "dense causal SDPA (GQA)", "e2e", ("o",), dense_sdpa_fns(xs), DENSE,
                cost=hb.dense_causal_cost(case), note=DENSE_NOTE)
        del xs, base
        torch.cuda.empty_cache()
    if not records:
        print("bench_paper: no timing succeeded", file=sys.stderr)
        return 1
    hb.fill_ratios(records)
    path = hb.write_records(Path(args.out), records)
    write_performance(args.out)
    print("\n" + tables([dataclasses.asdict(r) for r in records]))
    print(f"\nwrote {path} and {Path(args.out) / 'performance.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
