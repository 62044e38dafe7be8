"""Paper-configuration benchmark (issue 6): in-house cuTile NSA forward vs FLA ``parallel_nsa`` vs the
TileLang fwd selection kernel vs dense causal SDPA, T = 4k/16k/64k, one run, one card.

    source .device/env.sh   # both bundles (cutile + oracles) unpacked on the warm machine
    PYTHONPATH=. python benchmarks/bench_paper.py --out $OUT --T 4096,16384,65536

Config: B=1, HQ=64, H=4 (G=16), D=DV=128, n=16, l=d=l'=64, w=512, bf16 (TileLang: fp16 only, so the
selection comparison is run in fp16 for both). Inputs are drawn on the GPU (q, v ~ N(0,1); k = a
moving-average-correlated N(0,1) so that neighbouring blocks look alike, as in cases.tensors).
All selection kernels get the same block indices: the in-house top-n of the same inputs.
Timing: harness.bench.time_fn (CUDA events, warm-up, median of --reps, inputs rotated past L2).
Writes OUT/bench.jsonl + OUT/performance.html (harness.bench schema) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nsaconf.cases.model import Case  # noqa: E402
from nsaconf.cases.tensors import Inputs  # noqa: E402
from nsaconf.harness import bench as hb  # noqa: E402


def paper_case(T: int, dtype: str = "bfloat16", window: int = 512) -> Case:
    return Case(batch=1, seq_len=T, heads_q=64, heads_kv=4, head_dim=128, block_size=64, top_n=16, window=window,
                dtype=dtype, forced_blocks="initial_local", cmp_mask="end_inclusive")


def gpu_inputs(case: Case, seed: int) -> Inputs:
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


DENSE_NOTE = "layout pre-transposed to [B,H,T,D]"
FLA_NOTE = "FLA has no window without flash-attn"


def dense_sdpa_fns(xs: list) -> list:
    """The dense baseline, one closure per input copy: causal torch SDPA with GQA (FlashAttention-2 backend
    first), q/k/v pre-transposed to ``[B,H,T,D]`` outside the timed call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qkv = [tuple(t.transpose(1, 2).contiguous() for t in (x.q, x.k, x.v)) for x in xs]

    def sdpa(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return [lambda t=t: sdpa(*t) for t in qkv]


def fla_parallel_nsa_fns(par, xs: list, scale: float) -> list:
    """FLA ``parallel_nsa`` at the paper configuration without its window branch (no flash-attn), one closure per
    input copy (``par``: FLA's ``parallel`` module, ``oracles.fla._triton_modules()[0]``)."""
    return [lambda x=x: par.parallel_nsa(x.q, x.k, x.v, x.g_cmp, x.g_slc, None, block_counts=16, block_size=64,
                                         window_size=0, scale=scale) for x in xs]


TUNABLES = ("DEFAULT_SELECTION", "CHUNK_BLOCKS", "SEL_OCCUPANCY", "SEL_LATENCY", "UNION_ROWS", "UNION_OCCUPANCY",
            "SEL_WORKER_WARPS", "TOPN_FORCED_BY_RULE", "DENSE_MASK_ALL", "CMP_TILE", "CMP_HINTS", "WINDOW_TILE",
            "WINDOW_HINTS", "TOPN_STREAM_TILE", "TOPN_HINTS", "TOPN_SLOT_BY_VALUE", "FORCED_LOCAL_IN_WINDOW",
            "SEL_IDX_ONCE", "SEL_QUERIES_PER_PROGRAM")


def device_ceilings() -> tuple:
    """The run's measured ceilings (bf16 matmul, D2D copy; printed) and the versions, for every record."""
    ceil = hb.measure_ceilings()
    print(f"device {ceil.device}: bf16 matmul {ceil.matmul_tflops:.0f} TFLOP/s, D2D copy {ceil.copy_gbps:.0f} GB/s", flush=True)
    return ceil, hb.versions()


def finish(records: list, out: str, header: str, row) -> None:
    """Fill the ratios, write ``out/bench.jsonl`` (+ HTML) and print a markdown table: ``header`` (its first
    column is T) and one line per record, ``| T `` + ``row(record)``."""
    hb.fill_ratios(records)
    hb.write_records(__import__("pathlib").Path(out), records)
    cols = header.count("|") - 1
    print("\n" + header + "\n" + "|---" * cols + "|")
    for r in records:
        print(f"| {r.case.split('-')[2]} " + row(r))


def config_note() -> str:
    """The in-house kernel configuration in effect (module flags of ``forward``)."""
    from nsaconf.oracles.inhouse_cutile import forward as F
    return " ".join(f"{n}={getattr(F, n)!r}".replace(" ", "") for n in TUNABLES)


def tune(case: Case, xs: list, idx, run, tiles: bool = False, quick: bool = False) -> None:
    """Time a few configurations of each in-house kernel on this case and keep the fastest
    (``forward`` module flags; every timing is a record of group "tuning"); prints ``TUNED ...``.
    ``tiles``: also the compression and window tiles; ``quick``: not the union kernel (slower in every
    earlier H100 run)."""
    from nsaconf.oracles.inhouse_cutile import forward as F
    T, scale = case.seq_len, case.softmax_scale
    kc, vc = F.mean_pool(xs[0].k, xs[0].v, 64, 64)

    def best_of(names: tuple, options: list, label: str, fns) -> None:
        times = {}
        for k, opt in enumerate(options):
            with F.flags(**dict(zip(names, opt))):
                ms = run(case, f"tune {label} {opt}", "kernel", (), fns, group="tuning", note="tuning")
            if ms is not None:
                times[k] = ms
        if not times:
            print(f"TUNED {label}: every option failed; flags unchanged", flush=True)
            return
        win = min(times, key=times.get)
        F.set_flags(**dict(zip(names, options[win])))
        print(f"TUNED {label}: {options[win]} ({times[win]:.3f} ms of {len(times)} tried)", flush=True)

    best_of(("CHUNK_BLOCKS", "SEL_OCCUPANCY", "SEL_LATENCY", "SEL_WORKER_WARPS"),
            [(2, 2, (2, 4), None), (2, 2, (3, 3), None), (2, 2, (2, 4), 8), (2, 1, (2, 4), 8)],
            "selection (CH, occupancy, latency, worker warps)",
            [lambda x=x: F.selection_chunked(x.q, x.k, x.v, idx, 64, scale) for x in xs])
    imp = F.compression(xs[0].q, kc, vc, T, 64, 64, "end_inclusive", scale, want_importance=True)[2]
    best_of(("TOPN_HINTS",), [({},), ({"num_worker_warps": 8},), ({"occupancy": 4},)], "top-n (hints)",
            [lambda: F.top_n_cutile(imp, 0, 13, 64, "initial_local", canonical=False, others=True)])
    chunked = (F.CHUNK_BLOCKS, F.SEL_OCCUPANCY, F.SEL_LATENCY)
    if not quick:
        best_of(("DEFAULT_SELECTION", "UNION_ROWS", "UNION_OCCUPANCY"),
                [("chunked", 64, 2), ("union", 64, None), ("union", 64, 2), ("union", 128, None), ("union", 128, 2)],
                f"selection kernel (chunked = {chunked}, or union of UNION_ROWS // 16 queries)",
                [lambda x=x: F.SELECTION_IMPL[F.DEFAULT_SELECTION](x.q, x.k, x.v, idx, 64, scale) for x in xs])
    if not tiles:
        return
    tiles_hints = [((64, 64), {}), ((64, 64), {"num_worker_warps": 8}), ((128, 64), {"num_worker_warps": 8}),
                   ((128, 64), {"occupancy": 1, "num_worker_warps": 8}), ((128, 128), {"occupancy": 1, "num_worker_warps": 8}),
                   ((64, 128), {"num_worker_warps": 8})]
    best_of(("CMP_TILE", "CMP_HINTS"), tiles_hints, "compression+importance (tile, hints)",
            [lambda x=x: F.compression(x.q, kc, vc, T, 64, 64, "end_inclusive", scale, want_importance=True,
                                       importance_fill=None) for x in xs])
    best_of(("WINDOW_TILE", "WINDOW_HINTS"), tiles_hints, "window (tile, hints)",
            [lambda x=x: F.sliding_window(x.q, x.k, x.v, 512, "w", scale) for x in xs])


def selection_variants(case, case_nw, xs, idx, idx32, gw, run, both_forwards, g_sel) -> None:
    """The selection kernel variants and probes of earlier runs (not with --quick)."""
    from nsaconf.oracles.inhouse_cutile import forward as F
    scale = case.softmax_scale
    # where the selection kernel's time goes: same loads with less arithmetic (benchmarks/selection_probes.py)
    try:
        from selection_probes import run_probe  # benchmarks/ is sys.path[0]
        for with_mma, what in ((False, "loads only"), (True, "loads + 2 MMA, no softmax")):
            run(case, f"probe: selection {what}", "kernel", ("slc_o",),
                [lambda x=x, m=with_mma: run_probe(x.q, x.k, x.v, idx, 64, m) for x in xs], group=g_sel,
                note="probe kernel, not a result")
    except Exception as e:  # noqa: BLE001
        print(f"probe unavailable: {type(e).__name__}: {e}", flush=True)
    with F.flags(SEL_KEY_ROWS=True):     # the heads-on-rows twin of both runs is timed in main()
        run(case_nw, "inhouse_cutile.selection (keys on MMA rows) + gates in the epilogue", "kernel",
            ("o",), [lambda x=x, g=g: F.selection_chunked(x.q, x.k, x.v, idx, 64, scale, gated=g, want_slc=False)
                     for x, g in zip(xs, gw)], group=g_sel, cost=hb.cost_of(case_nw, ("slc_o",)))
        run(case, "inhouse_cutile.selection (keys on MMA rows)", "kernel", ("slc_o",),
            [lambda x=x: F.selection_chunked(x.q, x.k, x.v, idx, 64, scale) for x in xs], group=g_sel)
    for ch, tma, occ in ((2, True, None), (4, True, None), (1, True, None), (2, False, None), (2, True, 1),
                         (2, True, 2), (2, True, 3), (2, True, 4)):
        with F.flags(CHUNK_BLOCKS=ch, SEL_TMA=tma, SEL_OCCUPANCY=occ):
            run(case, f"inhouse_cutile.selection (chunked CH={ch} tma={tma} occ={occ})", "kernel", ("slc_o",),
                [lambda x=x: F.selection_chunked(x.q, x.k, x.v, idx, 64, scale) for x in xs], group=g_sel)
    for occ in (None, 1, 2, 3, 4):
        with F.flags(UNION_OCCUPANCY=occ):
            run(case, f"inhouse_cutile.selection (union of 4 queries, occ={occ})", "kernel", ("slc_o",),
                [lambda x=x: F.selection_union(x.q, x.k, x.v, idx, 64, scale) for x in xs], group=g_sel)
    with F.flags(DEFAULT_SELECTION="chunked" if F.DEFAULT_SELECTION == "union" else "union"):
        both_forwards(f"inhouse_cutile ({F.DEFAULT_SELECTION} selection)")
    run(case, "inhouse_cutile.selection (per query)", "kernel", ("slc_o",),
        [lambda x=x: F.selection(x.q, x.k, x.v, idx32, 64, scale) for x in xs], group=g_sel)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="4096,16384,65536")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    ap.add_argument("--quick", action="store_true", help="default variants only")
    ap.add_argument("--skip", default="", help="comma list of: fla,tilelang,dense")
    ap.add_argument("--tune", action="store_true",
                    help="time kernel configurations on the first --T and keep the fastest for every T")
    ap.add_argument("--tune-tiles", action="store_true", help="--tune also the compression and window tiles")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="set a module flag of oracles.inhouse_cutile.forward (Python literal) before timing")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    from nsaconf.oracles.inhouse_cutile import forward as F
    try:
        F.set_flags(**F.parse_flags(args.set))
    except ValueError as e:
        print(f"bench_paper: error: {e}", file=sys.stderr)
        return 2
    ceil, vers = device_ceilings()
    records: list[hb.BenchRecord] = []

    def run(case: Case, name: str, layer: str, branches: tuple, fns: list, note: str = "", group: str = "",
            cost: hb.Cost | None = None):
        try:
            ms = hb.time_fn(fns[0], reps=args.reps, warmup=args.warmup, rotate=fns)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {name} T={case.seq_len}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=3)
            return None
        rec = hb.make_record(case, name, layer, branches, ms, args.reps, cost or hb.cost_of(case, branches), ceil,
                             vers, note, group)
        records.append(rec)
        print(f"T={case.seq_len:6d} {name:34s} {ms:9.3f} ms  {rec.pct_of_floor:5.1f} % of floor  [{group}]", flush=True)
        return ms

    Ts = [int(t) for t in args.T.split(",")]
    for T in Ts:
        case = paper_case(T)
        case_nw = paper_case(T, window=0)
        base = gpu_inputs(case, seed=T)
        ncopy = hb.input_copies(case, base)
        xs = [base] + [hb.clone_inputs(base) for _ in range(ncopy - 1)]
        scale = case.softmax_scale
        pos = torch.arange(T, device="cuda")
        # shared block indices: the in-house top-n
        kc, vc = F.mean_pool(base.k, base.v, 64, 64)
        _, _, imp = F.compression(base.q, kc, vc, T, 64, 64, "end_inclusive", scale, want_importance=True)
        idx = F.top_n(imp, pos, 16, 64, "initial_local")
        del kc, vc, imp
        idx32 = idx.to(torch.int32).contiguous()
        g_full, g_nw, g_sel, g_cmp, g_dense = "full fwd (cmp+topk+slc+swa+gates)", "fwd w/o window (cmp+topk+slc+gates)", \
            "selection on given idx (bf16)", "cmp+topk", "dense causal"
        if args.tune and T == Ts[0]:     # tune once, on the first (largest) T; later T use the same flags
            tune(case, xs, idx, run, tiles=args.tune_tiles, quick=args.quick)
        cfg = config_note()
        print(f"T={T} config: {cfg}", flush=True)
        run(case, "inhouse_cutile", "e2e", ("o",), [lambda x=x: F.nsa_forward(case, x, branches=("o",)) for x in xs],
            group=g_full, note=cfg)
        run(case_nw, "inhouse_cutile", "e2e", ("o",), [lambda x=x: F.nsa_forward(case_nw, x, branches=("o",)) for x in xs],
            group=g_nw, cost=hb.cost_of(case_nw, ("o",)), note=cfg)
        # the previous path (separate gate pass, whole-row top-n, zero-filled importance), same run
        def both_forwards(label: str) -> None:
            """The full forward and the one without window, under the flags in effect."""
            run(case, label, "e2e", ("o",), [lambda x=x: F.nsa_forward(case, x, branches=("o",)) for x in xs],
                group=g_full)
            run(case_nw, label, "e2e", ("o",), [lambda x=x: F.nsa_forward(case_nw, x, branches=("o",)) for x in xs],
                group=g_nw, cost=hb.cost_of(case_nw, ("o",)))
        # the previous path, same run: the top-n extracts the forced blocks too, every key tile of the dense
        # kernels masked; then each of the two changes alone
        with F.flags(TOPN_FORCED_BY_RULE=False, DENSE_MASK_ALL=True):
            both_forwards("inhouse_cutile (previous: forced blocks extracted by the top-n, all key tiles masked)")
        for name in ("TOPN_FORCED_BY_RULE", "DENSE_MASK_ALL", "TOPN_SLOT_BY_VALUE", "SEL_IDX_ONCE"):   # each switch alone
            flip = not getattr(F, name)
            with F.flags(**{name: flip}):
                both_forwards(f"inhouse_cutile ({name}={flip})")
        with F.flags(SEL_QUERIES_PER_PROGRAM=1):
            both_forwards("inhouse_cutile (SEL_QUERIES_PER_PROGRAM=1)")
        # the window kernel taking the forced local blocks off the selection kernel (w/o window: unchanged)
        flip = not F.FORCED_LOCAL_IN_WINDOW
        with F.flags(FORCED_LOCAL_IN_WINDOW=flip):
            run(case, f"inhouse_cutile (FORCED_LOCAL_IN_WINDOW={flip})", "e2e", ("o",),
                [lambda x=x: F.nsa_forward(case, x, branches=("o",)) for x in xs], group=g_full)
        idx14 = idx32[..., :14].contiguous()
        for hint in ({}, {"SEL_IDX_ONCE": not F.SEL_IDX_ONCE}, {"SEL_QUERIES_PER_PROGRAM": 1}, {"SEL_LATENCY": (2, 3)}):
            with F.flags(**hint):
                run(case_nw, "inhouse_cutile.selection_partial (14 blocks, + base-2 LSE)" + (f" {hint}" if hint else ""),
                    "kernel", ("slc_o",), [lambda x=x: F.selection_partial(x.q, x.k, x.v, idx14, 64, scale) for x in xs],
                    group=g_sel)
        o_s, lse_s = F.selection_partial(base.q, base.k, base.v, idx14, 64, scale)
        run(case, "inhouse_cutile.window_forced (window + 2 local blocks + gates)", "kernel", ("swa_o",),
            [lambda x=x: F.window_forced(x.q, x.k, x.v, o_s, lse_s, x.q, (x.g_cmp, x.g_slc, x.g_swa), 2, 64,
                                         case.window, case.window_keys, scale) for x in xs], group="window w=512")
        del o_s, lse_s
        if not args.quick:
            # the previous paths of earlier runs (separate gate pass, whole-row top-n, zero-filled importance)
            with F.flags(FUSE_GATES=False, TOPN_KERNEL="packed", LAZY_IMPORTANCE=False):
                both_forwards("inhouse_cutile (unfused: gate pass, whole-row top-n, zero fill)")
            flip = not F.SEL_KEY_ROWS
            with F.flags(SEL_KEY_ROWS=flip):
                both_forwards(f"inhouse_cutile ({'keys' if flip else 'heads'}-on-rows selection)")
        gw = [(x.q, None, x.g_cmp, x.g_slc, x.g_swa) for x in xs]
        run(case_nw, "inhouse_cutile.selection (heads on MMA rows) + gates in the epilogue", "kernel",
            ("o",), [lambda x=x, g=g: F.selection_chunked(x.q, x.k, x.v, idx, 64, scale, gated=g, want_slc=False)
                     for x, g in zip(xs, gw)], group=g_sel, cost=hb.cost_of(case_nw, ("slc_o",)))
        run(case, "inhouse_cutile.selection (chunked)", "kernel", ("slc_o",),
            [lambda x=x: F.selection_chunked(x.q, x.k, x.v, idx, 64, scale) for x in xs], group=g_sel)
        if not args.quick:       # variants measured slower in earlier runs, and the probes
            selection_variants(case, case_nw, xs, idx, idx32, gw, run, both_forwards, g_sel)
        uni, cnt = F.block_union(idx, 4)
        print(f"T={T}: mean union size per 4-query tile {cnt.float().mean().item():.1f} blocks (of 64 selections)", flush=True)

        def cmp_topk(x):
            kc, vc = F.mean_pool(x.k, x.v, 64, 64)
            _, _, imp = F.compression(x.q, kc, vc, T, 64, 64, "end_inclusive", scale, want_importance=True)
            return F.top_n_cutile(imp, 0, 16, 64, "initial_local")
        run(case, "inhouse_cutile.cmp+topk", "kernel", ("cmp_o", "cmp_lse", "topk_idx"),
            [lambda x=x: cmp_topk(x) for x in xs], group=g_cmp)
        kc0, vc0 = F.mean_pool(base.k, base.v, 64, 64)
        imp0 = F.compression(base.q, kc0, vc0, T, 64, 64, "end_inclusive", scale, want_importance=True)[2]
        run(case, "inhouse_cutile.pool", "kernel", (), [lambda x=x: F.mean_pool(x.k, x.v, 64, 64) for x in xs],
            group="parts", cost=hb.Cost(0.0, 2.0 * T * 4 * 256 * 2))
        for mask_all in (False, True):
            with F.flags(DENSE_MASK_ALL=mask_all):
                how = " (every key tile masked)" if mask_all else ""
                run(case, "inhouse_cutile.cmp (o+lse)" + how, "kernel", ("cmp_o", "cmp_lse"),
                    [lambda x=x: F.compression(x.q, kc0, vc0, T, 64, 64, "end_inclusive", scale) for x in xs],
                    group="parts")
                run(case, "inhouse_cutile.cmp+importance (uninitialised beyond started blocks)" + how, "kernel",
                    ("cmp_o", "cmp_lse"), [lambda x=x: F.compression(x.q, kc0, vc0, T, 64, 64, "end_inclusive", scale,
                                                                     want_importance=True, importance_fill=None)
                                           for x in xs], group="parts", cost=hb.cost_of(case, ("topk_idx",)))
                run(case, "inhouse_cutile.window" + how, "kernel", ("swa_o",),
                    [lambda x=x: F.sliding_window(x.q, x.k, x.v, 512, "w", scale) for x in xs], group="window w=512")
        def topn_others(label: str) -> None:
            """Time the top-n of the 13 non-forced blocks (what the forward runs) under the flags in effect."""
            run(case, f"inhouse_cutile.top_n (streaming, others only{label})", "kernel", ("topk_idx",),
                [lambda: F.top_n_cutile(imp0, 0, 13, 64, "initial_local", canonical=False, others=True)],
                group="top-n", cost=hb.Cost(0.0, imp0.numel() * 4.0 / 2))
        topn_others(": 13 of the non-forced blocks")
        for occ in (2, 8):
            with F.flags(TOPN_HINTS={"occupancy": occ}):
                topn_others(f", occupancy {occ}")
        for sbv, tile in ((not F.TOPN_SLOT_BY_VALUE, F.TOPN_STREAM_TILE), (True, (16, 128)), (True, (16, 64)),
                          (True, (32, 32)), (True, (64, 16)), (True, (64, 8))):
            with F.flags(TOPN_SLOT_BY_VALUE=sbv, TOPN_STREAM_TILE=tile):
                topn_others(f", TOPN_SLOT_BY_VALUE={sbv}, TR={tile[0]} CW={tile[1]}")
        for kern, tile in (("stream", (16, 128)), ("stream", (8, 128)), ("stream", (32, 128)), ("stream", (16, 256)),
                           ("stream", (16, 64)), ("packed", None), ("argmax", None)):
            if args.quick and (kern == "argmax" or tile not in (None, (16, 128))):
                continue
            label = f"streaming, causal chunks, TR={tile[0]} CW={tile[1]}" if tile else f"{kern}, whole row"
            with F.flags(TOPN_KERNEL=kern, **({"TOPN_STREAM_TILE": tile} if tile else {})):
                run(case, f"inhouse_cutile.top_n ({label})", "kernel", ("topk_idx",),
                    [lambda: F.top_n_cutile(imp0, 0, 16, 64, "initial_local")], group="top-n",
                    cost=hb.Cost(0.0, imp0.numel() * 4.0 / 2))
        run(case, "inhouse_cutile.gates", "kernel", ("o",),
            [lambda x=x: F.combine_gates(x.q, x.q, x.q, (x.g_cmp, x.g_slc, x.g_swa)) for x in xs], group="parts",
            cost=hb.Cost(0.0, 4.0 * base.q.numel() * 2))
        if not args.quick:
            run(case, "inhouse_cutile.top_n (torch ops)", "kernel", ("topk_idx",),
                [lambda: F.top_n(imp0, pos, 16, 64, "initial_local")], group="top-n", cost=hb.Cost(0.0, imp0.numel() * 4.0))
        del kc0, vc0, imp0
        if "fla" not in skip:
            try:
                from nsaconf.oracles.fla import _triton_modules
                par, compression, mean_pooling = _triton_modules()
                run(case_nw, "fla.parallel_nsa", "e2e", ("o",), fla_parallel_nsa_fns(par, xs, scale), group=g_nw,
                    cost=hb.cost_of(case_nw, ("o",)), note=FLA_NOTE)
                run(case, "fla.parallel_nsa_fwd (selection)", "kernel", ("slc_o",),
                    [lambda x=x: par.ParallelNSAFunction.apply(x.q, x.k, x.v, idx32, 16, 64, scale, None) for x in xs],
                    group=g_sel)

                def fla_cmp_topk(x):
                    kc, vc = mean_pooling(x.k, 64, None), mean_pooling(x.v, 64, None)
                    _, lse = compression(q=x.q, k=kc, v=vc, TK=T, block_size=64, scale=scale, cu_seqlens=None)
                    return par.parallel_nsa_topk(q=x.q, k=kc, TK=T, lse=lse, block_counts=16, block_size=64, scale=scale,
                                                 cu_seqlens=None)
                run(case, "fla.cmp+topk", "kernel", ("cmp_o", "cmp_lse", "topk_idx"), [lambda x=x: fla_cmp_topk(x) for x in xs],
                    group=g_cmp)
            except Exception as e:  # noqa: BLE001
                print(f"FLA unavailable: {type(e).__name__}: {e}", flush=True)
        if "tilelang" not in skip:
            try:
                from nsaconf.oracles.base import get_oracle
                tl = get_oracle("tilelang_fwd")
                case16 = paper_case(T, "float16")
                why = tl.check_support(case16, "cuda")
                x16 = [Inputs(**{k: (None if v is None else (v.half() if v.is_floating_point() else v))
                                 for k, v in vars(x).items()}) for x in xs]
                run(case16, "inhouse_cutile.selection (chunked, fp16)", "kernel", ("slc_o",),
                    [lambda x=x: F.selection_chunked(x.q, x.k, x.v, idx, 64, scale) for x in x16], group="selection (fp16)")
                if why:
                    print(f"SKIP tilelang_fwd: {why}", flush=True)
                else:
                    run(case16, "tilelang_fwd (selection, fp16)", "kernel", ("slc_o",),
                        [lambda x=x: tl.run(case16, x, "cuda", block_indices=idx) for x in x16], group="selection (fp16)")
                del x16
            except Exception as e:  # noqa: BLE001
                print(f"TileLang unavailable: {type(e).__name__}: {e}", flush=True)
        if "dense" not in skip:
            run(case, "dense causal SDPA (GQA)", "e2e", ("o",), dense_sdpa_fns(xs), group=g_dense,
                cost=hb.dense_causal_cost(case), note=DENSE_NOTE)
        del xs, base
        torch.cuda.empty_cache()
    finish(records, args.out, "| T | what | ms | % of floor |",
           lambda r: f"| {r.oracle} [{r.group}] | {r.ms:.3f} | {r.pct_of_floor:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
